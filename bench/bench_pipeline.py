"""Pipeline Hessian-vector products on a generated GPT-style model of 100M+ parameters (CPU).

Writes the model once as a sharded safetensors checkpoint, then starts ``--stages``
workers (torch.multiprocessing, gloo on loopback). Each worker builds the model
skeleton on the meta device, materializes only its stage and reads only its stage's
tensors from the checkpoint, then measures: time per Hessian-vector product, the top
eigenvalue (Lanczos, tol 1e-3), an SLQ density (1 run × ``--steps`` steps, full
reorthogonalization), time per Lanczos step, and its peak memory (RSS) with the
parameter, vector and graph bytes. A single-process run of the same products gives
the baseline (``--baseline``).

    python bench/bench_pipeline.py                    # 2 stages, ~112M parameters, float32
    python bench/bench_pipeline.py --baseline --json out.json

Figures and the machine go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.basis import DiskBasis  # noqa: E402
from cluster.checkpoints import ReadStats, load_checkpoint, save_sharded  # noqa: E402
from cluster.pipeline import PipelineHessian, build_stage, grid_groups, stage_bounds, stage_parameter_names  # noqa: E402
from probe.eigen import eigenvalues  # noqa: E402
from probe.gpt import gpt, gpt_num_parameters, lm_loss  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.slq import spectral_density  # noqa: E402

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_kwargs(a) -> dict:
    return dict(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=a.heads, max_len=a.seq)


def batches(a) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(a.batches):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


@contextmanager
def basis_store(a):
    """Where the Lanczos basis lives: ``disk`` (a memory-mapped file under ``--scratch``) keeps a
    100M-parameter basis out of RAM; ``device``/``host`` keep it in memory."""
    if a.basis != "disk":
        yield a.basis
        return
    with DiskBasis(a.scratch) as store:
        yield store


def measure(op, a, rank_is_reporter: bool) -> dict:
    dtype = op.dtype
    g = torch.Generator().manual_seed(7)
    V = op.random_vectors(1, generator=g, kind="gaussian")
    t = time.perf_counter()
    op.matmat(V)  # builds (and keeps, if they fit) the sweeps' graphs
    first = time.perf_counter() - t
    times = []
    for _ in range(a.products):
        t = time.perf_counter()
        op.matmat(V)
        times.append(time.perf_counter() - t)
    # peak RSS so far: parameters, data and graphs (before any Lanczos basis, which a disk store maps into RSS)
    out = {"first_product_s": first, "product_s": min(times), "dtype": str(dtype), "rss_products_mb": peak_rss_mb()}
    if a.eig:
        t = time.perf_counter()
        with basis_store(a) as store:
            top = eigenvalues(
                op, 1, tol=1e-3, max_steps=a.eig_max_steps, generator=torch.Generator().manual_seed(3), basis=store
            )
        out.update(
            top_s=time.perf_counter() - t,
            top_matvecs=top.num_matvecs,
            lambda_max=float(top.eigenvalues[0]),
            top_residual=float(top.residuals[0]),
        )
    if a.steps:
        t = time.perf_counter()
        with basis_store(a) as store:
            spec = spectral_density(op, runs=1, steps=a.steps, generator=torch.Generator().manual_seed(4), basis=store)
        slq_s = time.perf_counter() - t
        out.update(
            basis=spec.basis_storage,
            slq_s=slq_s,
            slq_steps=a.steps,
            slq_step_s=slq_s / a.steps,
            slq_lambda_max=spec.lambda_max,
            slq_lambda_min=spec.lambda_min,
        )
    return out


def worker(rank: int, world: int, port: int, a, index: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(a.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, pipe, data_group, stage, _ = grid_groups(world, 1)
        with torch.device("meta"):
            skeleton = gpt(**model_kwargs(a))
        bounds = stage_bounds(skeleton, world)[stage]
        names = stage_parameter_names(skeleton, bounds)
        part, offset, dim = build_stage(skeleton, world, stage)
        del skeleton
        part = part.to_empty(device="cpu")
        stats = ReadStats()
        t = time.perf_counter()
        state, _ = load_checkpoint(index, keys=names, stats=stats)
        load_s = time.perf_counter() - t
        a0 = bounds[0]
        part.load_state_dict({f"{int(k.split('.', 1)[0]) - a0}.{k.split('.', 1)[1]}": v for k, v in state.items()})
        del state
        part = part.to(getattr(torch, a.dtype))
        op = PipelineHessian(
            part,
            lm_loss,
            batches(a),
            stage_index=stage,
            ranks=ranks,
            offset=offset,
            dim=dim,
            pipe_group=pipe,
            data_group=data_group,
            graph_memory_bytes=a.graph_budget_mb * MB,
        )
        result = measure(op, a, rank == 0)
        result.update(
            rank=rank,
            stage_children=list(bounds),
            params=op.local_dim,
            dim=dim,
            param_mb=op.local_dim * op.dtype.itemsize / MB,
            graph_mb=op.peak_graph_bytes / MB,
            kept_graph_mb=op.graph_bytes / MB,
            read_mb=stats.bytes / MB,
            read_tensors=stats.tensors,
            shards_opened=len(stats.files),
            load_s=load_s,
            peak_rss_mb=peak_rss_mb(),
        )
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def baseline(rank: int, a, index: str, out_dir: str) -> None:
    """The single-process product in a fresh process (so its peak RSS is its own)."""
    torch.set_num_threads(a.baseline_threads)
    with torch.device("meta"):
        model = gpt(**model_kwargs(a))
    model = model.to_empty(device="cpu")
    state, _ = load_checkpoint(index)
    model.load_state_dict(state)
    del state
    model = model.to(getattr(torch, a.dtype))
    data = batches(a)
    fwd, grad = [], []
    for _ in range(3):  # forward and gradient of the same loss, for the HVP/forward ratio of the projection
        t = time.perf_counter()
        with torch.no_grad():
            sum(lm_loss(model(x), y) for x, y in data)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.autograd.grad(sum(lm_loss(model(x), y) for x, y in data), list(model.parameters()))
        grad.append(time.perf_counter() - t)
    op = HessianOperator(model, lm_loss, data, graph_memory_bytes=a.graph_budget_mb * MB)
    res = measure(op, argparse.Namespace(**{**vars(a), "eig": False, "steps": 0}), True)
    res.update(forward_s=min(fwd), gradient_s=min(grad))
    res.update(params=op.dim, graph_mb=op.graph_bytes / MB, peak_rss_mb=peak_rss_mb(), threads=a.baseline_threads)
    Path(out_dir, "baseline.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per pipeline worker")
    p.add_argument("--baseline", action="store_true", help="also time the single-process product")
    p.add_argument("--baseline-threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--products", type=int, default=2, help="timed products after the first")
    p.add_argument("--eig", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=32, help="SLQ Lanczos steps (0: skip)")
    p.add_argument("--graph-budget-mb", type=int, default=8192)
    p.add_argument(
        "--basis",
        default="disk",
        choices=["device", "host", "disk"],
        help="where Lanczos vectors live (default disk: 33 vectors of a 56M-parameter stage are 7.4 GB)",
    )
    p.add_argument("--scratch", default=None, help="folder for --basis disk (default: a temporary folder)")
    p.add_argument("--eig-max-steps", type=int, default=40)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    n = gpt_num_parameters(vocab=a.vocab, dim=a.dim, layers=a.layers, max_len=a.seq)
    print(
        f"GPT-style model: vocab {a.vocab}, dim {a.dim}, {a.layers} layers, {a.heads} heads, seq {a.seq}: "
        f"{n:,} parameters; {a.batches} batch(es) of {a.batch} sequences; {a.dtype}; {a.stages} stage(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        torch.manual_seed(0)
        t = time.perf_counter()
        model = gpt(**model_kwargs(a))
        index = save_sharded(model.state_dict(), Path(tmp) / "ckpt", max_shard_bytes=64 * MB)
        del model
        print(f"wrote a sharded checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
        out = Path(tmp) / "out"
        out.mkdir()
        if a.scratch is None:
            a.scratch = str(Path(tmp) / "scratch")
            Path(a.scratch).mkdir()
        t = time.perf_counter()
        mp.start_processes(
            worker,
            args=(a.stages, free_port(), a, str(index), str(out)),
            nprocs=a.stages,
            join=True,
            start_method="spawn",
        )
        wall = time.perf_counter() - t
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.stages)]
        base = None
        if a.baseline:
            mp.start_processes(baseline, args=(a, str(index), str(out)), nprocs=1, join=True, start_method="spawn")
            base = json.loads((out / "baseline.json").read_text())
    r0 = ranks[0]
    print(f"\npipeline over {a.stages} workers ({a.threads} thread(s) each), wall {wall:.0f} s")
    print(
        f"{'rank':>4} {'children':>9} {'params':>12} {'param MB':>9} {'graph MB':>9} {'read MB':>8} "
        f"{'shards':>6} {'RSS@products MB':>15} {'peak RSS MB':>11}"
    )
    for r in ranks:
        print(
            f"{r['rank']:>4} {str(r['stage_children']):>9} {r['params']:>12,} {r['param_mb']:>9.0f} "
            f"{r['graph_mb']:>9.0f} {r['read_mb']:>8.0f} {r['shards_opened']:>6} {r['rss_products_mb']:>15.0f} "
            f"{r['peak_rss_mb']:>11.0f}"
        )
    print(f"product: {r0['product_s']:.2f} s (first, building graphs: {r0['first_product_s']:.2f} s)")
    if "top_s" in r0:
        print(
            f"top eigenvalue: {r0['lambda_max']:.6g} (residual {r0['top_residual']:.1e}) in {r0['top_s']:.1f} s, "
            f"{r0['top_matvecs']} products"
        )
    if "slq_s" in r0:
        print(
            f"SLQ 1 run × {r0['slq_steps']} steps: {r0['slq_s']:.1f} s = {r0['slq_step_s']:.2f} s per Lanczos step; "
            f"Ritz range [{r0['slq_lambda_min']:.3g}, {r0['slq_lambda_max']:.3g}]"
        )
    if base:
        print(
            f"\nsingle process ({base['threads']} threads): forward {base['forward_s']:.2f} s, gradient "
            f"{base['gradient_s']:.2f} s, product {base['product_s']:.2f} s "
            f"= {base['product_s'] / base['forward_s']:.1f}× "
            f"forward = {base['product_s'] / base['gradient_s']:.2f}× gradient"
        )
        print(
            f"single process ({base['threads']} threads): product {base['product_s']:.2f} s, "
            f"peak RSS {base['peak_rss_mb']:.0f} MB, graph {base['graph_mb']:.0f} MB"
        )
        rss_ratio = max(r["rss_products_mb"] for r in ranks) / base["rss_products_mb"]
        memory_ratio = max(r["param_mb"] + r["graph_mb"] for r in ranks) / (
            base["params"] * 4 / 2**20 + base["graph_mb"]
        )
        print(
            f"ratios pipeline/single: product time {r0['product_s'] / base['product_s']:.2f}×, "
            f"largest worker RSS during products {rss_ratio:.2f}×, parameters + graphs {memory_ratio:.2f}×"
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "parameters": n,
                    "ranks": ranks,
                    "baseline": base,
                    "wall_s": wall,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
