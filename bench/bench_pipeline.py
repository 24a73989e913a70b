"""Pipeline Hessian-vector products on a GPT-2-small-shaped Hugging Face model (124M parameters, CPU).

Writes the model once with random weights (``--model hf-gpt2``, default: transformers'
``GPT2LMHeadModel`` from ``GPT2Config`` defaults, 12 layers, width 768, vocabulary 50,257,
head tied to the token embedding; ``save_pretrained`` safetensors in 100 MB shards), then
starts ``--stages`` workers (torch.multiprocessing, gloo on loopback). Each worker builds
the skeleton on the meta device (:func:`cluster.hf.hf_skeleton`), cuts it into pipeline
pieces (:func:`cluster.hf_stages.pipeline_pieces`: embedding, one piece per layer, final
norm + head), reads only its stage's tensors from the checkpoint and stages them with
:func:`cluster.pipeline.build_stage`: the tied head is a parameter the last stage borrows
from stage 0. The loss is the token-mean next-token cross-entropy
(:func:`probe.gpt.lm_loss`, ``weighting="tokens"``). ``--model gpt`` runs this project's own
:func:`probe.gpt.gpt` instead (the issue-6 model: ``--vocab 8192 --layers 14``).

Each worker measures the time per Hessian-vector product (best of ``--products`` after
the first, which builds the kept graphs), the process CPU time per product, and peak
memory (RSS); without ``--compare`` also the top eigenvalue (Lanczos, tol 1e-3) and an
SLQ density (1 run × ``--steps`` steps). ``--baseline`` adds the single process
(:class:`probe.hessian.HessianOperator` on the Hugging Face model itself).

    python bench/bench_pipeline.py --compare                  # the issue-14 table (~15 min on 2 cores)
    python bench/bench_pipeline.py --baseline --json out.json
    python bench/bench_pipeline.py --model gpt --vocab 8192 --layers 14 --seq 64 --batch 4

``--compare`` measures, in one invocation: the single process with ``--baseline-threads``
(default 2) and with 1 thread (its forward and gradient too, for the product ÷ gradient
ratio), ``--stages`` stages with ``schedule="sequential"`` and one micro-batch, and
``--stages`` stages with ``schedule="overlap"`` for each of ``--micro-list`` (default 2 4 8)
micro-batches; each stage process runs ``--threads`` (default 1) torch threads; ``--balance``
cuts the stages by matmul work (``compute``, default) or by parameters held. It prints
each run's time per product, CPU time per product and peak RSS per process, each stage's
share of the matmul work, and the ratios overlapped/sequential and overlapped/single.

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
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.basis import DiskBasis  # noqa: E402
from cluster.checkpoints import ReadStats, load_checkpoint, save_sharded  # noqa: E402
from cluster.pipeline import PipelineHessian, build_stage, grid_groups, stage_bounds, stage_parameter_names  # noqa: E402
from probe.batches import outputs_of  # noqa: E402
from probe.eigen import eigenvalues  # noqa: E402
from probe.gpt import gpt, lm_loss  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.model_operator import double_backward_attention  # noqa: E402
from probe.slq import spectral_density  # noqa: E402

MB = 1 << 20
# per model: vocab, dim, layers, heads when not given (hf-gpt2: GPT2Config's defaults)
DEFAULTS = {
    "hf-gpt2": dict(vocab=50257, dim=768, layers=12, heads=12),
    "gpt": dict(vocab=8192, dim=768, layers=14, heads=12),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def batches(a) -> list:
    """``--batches`` batches of ``--batch`` random sequences: inputs ``--seq`` tokens, targets the next tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(a.batches):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


# ------------------------------------------------------------------ the models and their checkpoints


def write_checkpoint(a, folder: Path) -> tuple[Path, int]:
    """Write the model with random weights (seed 0); ``(checkpoint index, parameter count)``."""
    torch.manual_seed(0)
    if a.model == "gpt":
        model = gpt(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=a.heads, max_len=a.seq)
        n = sum(p.numel() for p in model.parameters())
        return save_sharded(model.state_dict(), folder, max_shard_bytes=64 * MB), n
    from transformers import GPT2Config, GPT2LMHeadModel

    special = min(50256, a.vocab - 1)  # GPT-2's end-of-text id, inside a smaller test vocabulary
    config = GPT2Config(vocab_size=a.vocab, n_embd=a.dim, n_layer=a.layers, n_head=a.heads)
    config.n_positions, config.bos_token_id, config.eos_token_id = max(1024, a.seq), special, special
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, max_shard_size="100MB")
    index = folder / "model.safetensors.index.json"
    return (index if index.exists() else folder / "model.safetensors"), sum(p.numel() for p in model.parameters())


def checkpoint_keys(index: Path) -> set[str]:
    """The tensor names a checkpoint holds, from its index or file header (no tensor is read)."""
    if index.name.endswith(".index.json"):
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(index), "pt") as f:
        return set(f.keys())


def hf_pieces(a, index: Path) -> tuple[nn.Module, nn.Sequential, dict[str, str]]:
    """The Hugging Face skeleton (meta parameters), its pipeline pieces and their checkpoint names."""
    from cluster.hf import hf_skeleton
    from cluster.hf_stages import piece_state_names, pipeline_pieces

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_skeleton(index.parent / "config.json", "auto", a.attn, getattr(torch, a.dtype))
    pieces = pipeline_pieces(model)
    return model, pieces, piece_state_names(model, pieces, checkpoint_keys(index))


def load_children(a, index: Path, stats: ReadStats | None = None) -> tuple[nn.Module, nn.Sequential, tuple[int, int]]:
    """The model with the children of this process's stage loaded (every child: ``a.stage is None``):
    ``(model, staged pieces, (start, stop))``."""
    dtype = getattr(torch, a.dtype)
    if a.model == "gpt":
        with torch.device("meta"):
            skeleton = gpt(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=a.heads, max_len=a.seq)
        lo, hi = (0, len(skeleton)) if a.stage is None else stage_bounds(skeleton, a.stages, a.balance)[a.stage]
        keep = nn.Sequential(*[skeleton[i] for i in range(lo, hi)]).to_empty(device="cpu")
        state, _ = load_checkpoint(index, keys=stage_parameter_names(skeleton, (lo, hi)), stats=stats)
        keep.load_state_dict({f"{int(k.split('.', 1)[0]) - lo}.{k.split('.', 1)[1]}": v for k, v in state.items()})
        for i, child in zip(range(lo, hi), keep, strict=True):
            skeleton[i] = child.to(dtype)
        return skeleton, skeleton, (lo, hi)
    from cluster.hf_stages import load_stage_state, stage_state_keys

    model, pieces, names = hf_pieces(a, index)
    lo, hi = (0, len(pieces)) if a.stage is None else stage_bounds(pieces, a.stages, a.balance)[a.stage]
    wanted = stage_state_keys(names, range(lo, hi)) & checkpoint_keys(index)  # buffers the file lacks: computed
    state, _ = load_checkpoint(index, keys=sorted(wanted), stats=stats)
    for i in range(lo, hi):  # one child per call: a call spanning both places of a tie fails (KeyError)
        load_stage_state(pieces, names, state, [i], dtype=dtype)  # the borrowed tied head too
    return model, pieces, (lo, hi)


def matmul_mflop_per_token(pieces: nn.Sequential, lo: int, hi: int) -> float:
    """Forward matmul MFLOP per token of children ``[lo, hi)``: 2 × the weights of ≥ 2-D parameters each
    child uses (a borrowed tied head counted where it is used), the first child (embedding lookups) excluded."""
    total = 0
    for i in range(max(lo, 1), hi):
        total += sum(2 * p.numel() for p in pieces[i].parameters() if p.ndim >= 2)
    return total / 1e6


# ------------------------------------------------------------------ measurements


@contextmanager
def basis_store(a):
    """Where the Lanczos basis lives: ``disk`` (a memory-mapped file under ``--scratch``) keeps a
    100M-parameter basis out of RAM; ``device``/``host`` keep it in memory."""
    if a.basis != "disk":
        yield a.basis
        return
    with DiskBasis(a.scratch) as store:
        yield store


def measure(op, a) -> dict:
    g = torch.Generator().manual_seed(7)
    V = op.random_vectors(1, generator=g, kind="gaussian")
    t = time.perf_counter()
    op.matmat(V)  # builds (and keeps, if they fit) the sweeps' graphs
    first = time.perf_counter() - t
    times, cpu, hv = [], [], V
    for _ in range(a.products):
        t, c = time.perf_counter(), time.process_time()
        hv = op.matmat(V)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    # peak RSS so far: parameters, data and graphs (before any Lanczos basis, which a disk store maps into RSS)
    out = {
        "first_product_s": first,
        "product_s": min(times),
        "product_times_s": times,
        "cpu_s": min(cpu),
        "hv_sq": float(hv.double().pow(2).sum()),  # this process's part of ‖Hv‖²: pipeline and single agree
        "dtype": str(op.dtype),
        "rss_products_mb": peak_rss_mb(),
    }
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
    """One pipeline stage: load its tensors, stage them, measure."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(a.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, pipe, data_group, stage, _ = grid_groups(world, 1)
        stats = ReadStats()
        t = time.perf_counter()
        _, pieces, (lo, hi) = load_children(argparse.Namespace(**{**vars(a), "stage": stage}), Path(index), stats)
        load_s = time.perf_counter() - t
        part, _, _ = build_stage(pieces, world, stage, a.balance)  # carries its layout: owned and borrowed parameters
        mflop = matmul_mflop_per_token(pieces, lo, hi)
        del pieces
        op = PipelineHessian(
            part,
            lm_loss,
            batches(a),
            stage_index=stage,
            ranks=ranks,
            pipe_group=pipe,
            data_group=data_group,
            weighting="tokens",
            graph_memory_bytes=a.graph_budget_mb * MB,
            schedule=a.schedule,
            micro_batches=a.micro_batches,
        )
        result = measure(op, a)
        assert op.layout is not None
        result.update(
            schedule=a.schedule,
            micro_batches=op.num_micro_batches,
            threads=a.threads,
            rank=rank,
            stage_children=[lo, hi],
            params=op.local_dim,
            borrowed=sum(b.numel for b in op.layout.borrowed),
            matmul_mflop_per_token=mflop,
            dim=op.dim,
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
    model, _, _ = load_children(argparse.Namespace(**{**vars(a), "stage": None}), Path(index))
    model.eval()
    data = batches(a)
    fwd, grad = [], []
    with double_backward_attention():  # the kernels the product differentiates (MATH attention)
        for _ in range(3):  # forward and gradient of the same loss, for the product ÷ gradient ratio
            t = time.perf_counter()
            with torch.no_grad():
                sum(lm_loss(outputs_of(model(x)), y) for x, y in data)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            loss = torch.stack([lm_loss(outputs_of(model(x)), y) for x, y in data]).sum()
            torch.autograd.grad(loss, list(model.parameters()))
            grad.append(time.perf_counter() - t)
    op = HessianOperator(model, lm_loss, data, weighting="tokens", graph_memory_bytes=a.graph_budget_mb * MB)
    res = measure(op, argparse.Namespace(**{**vars(a), "eig": False, "steps": 0}))
    res.update(forward_s=min(fwd), gradient_s=min(grad))
    res.update(params=op.dim, graph_mb=op.graph_bytes / MB, peak_rss_mb=peak_rss_mb(), threads=a.baseline_threads)
    Path(out_dir, "baseline.json").write_text(json.dumps(res))


def run_pipeline(a, index, out: Path, schedule: str, micro: int | None, *, eig: bool = False) -> list[dict]:
    """One pipeline run (``a.stages`` fresh processes); each rank's measurements."""
    b = argparse.Namespace(**{**vars(a), "schedule": schedule, "micro_batches": micro})
    if not eig:
        b.eig, b.steps = False, 0
    mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
        worker, args=(a.stages, free_port(), b, str(index), str(out)), nprocs=a.stages, join=True, start_method="spawn"
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.stages)]


def run_single(a, index, out: Path, threads: int) -> dict:
    """The single-process product in a fresh process with ``threads`` torch threads."""
    b = argparse.Namespace(**{**vars(a), "baseline_threads": threads})
    mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
        baseline, args=(b, str(index), str(out)), nprocs=1, join=True, start_method="spawn"
    )
    return json.loads((out / "baseline.json").read_text())


# ------------------------------------------------------------------ reports


def compare(a, index, out: Path) -> dict:
    """Time per product: single process (``--baseline-threads`` and 1 thread), sequential and overlapped stages."""
    single, sequential = f"single, {a.baseline_threads} threads", f"{a.stages} stages sequential"
    runs: dict[str, list[dict]] = {}

    def done(name: str, ranks: list[dict]) -> None:
        runs[name] = ranks
        times = ", ".join(f"{r['product_s']:.2f}" for r in ranks)
        print(f"  {name}: product {times} s ({time.strftime('%H:%M:%S')})", flush=True)

    done(single, [run_single(a, index, out, a.baseline_threads)])
    if a.baseline_threads != 1:
        done("single, 1 thread", [run_single(a, index, out, 1)])
    done(sequential, run_pipeline(a, index, out, "sequential", 1))
    for m in a.micro_list:
        done(f"{a.stages} stages overlap M={m}", run_pipeline(a, index, out, "overlap", m))
    print(
        f"\nthread policy: the single process runs with {a.baseline_threads} threads (and 1), "
        f"each of the {a.stages} stage processes with {a.threads} thread(s); {os.cpu_count()} CPUs"
    )
    print(f"{'run':<28} {'micro':>5} {'product s':>9} {'first s':>8} {'CPU s per rank':>16}  peak RSS MB per process")
    for name, ranks in runs.items():
        micro = ranks[0].get("micro_batches", a.batches)
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in ranks)
        cpu = ", ".join(f"{r['cpu_s']:.1f}" for r in ranks)
        print(
            f"{name:<28} {micro:>5} {max(r['product_s'] for r in ranks):>9.2f} "
            f"{max(r['first_product_s'] for r in ranks):>8.1f} {cpu:>16}  {rss}"
        )
    for name in [k for k in runs if k.startswith("single")]:
        base = runs[name][0]
        print(
            f"{name}: forward {base['forward_s']:.2f} s, gradient {base['gradient_s']:.2f} s; "
            f"product = {base['product_s'] / base['gradient_s']:.2f}× gradient"
        )
    stages = runs[sequential]
    total = sum(r["matmul_mflop_per_token"] for r in stages)
    print(
        f"stages ({a.balance}-balanced): "
        + "; ".join(
            f"stage {r['rank']} children {r['stage_children']}, {r['params']:,} parameters "
            f"(+{r['borrowed']:,} borrowed), {r['matmul_mflop_per_token'] / total:.0%} of the matmul FLOPs"
            for r in stages
        )
    )
    norm = {name: sum(r["hv_sq"] for r in ranks) ** 0.5 for name, ranks in runs.items()}
    spread = max(abs(v / norm[single] - 1) for v in norm.values())
    print(f"‖Hv‖ of the same vector: {norm[single]:.6g}; largest relative difference between runs {spread:.1e}")
    t = {name: max(r["product_s"] for r in ranks) for name, ranks in runs.items()}
    t1 = t.get("single, 1 thread", t[single])
    ratios = {"sequential/single(1 thread)": t[sequential] / t1}
    for m in a.micro_list:
        o = t[f"{a.stages} stages overlap M={m}"]
        ratios[f"M={m} overlap/sequential"] = o / t[sequential]
        ratios[f"M={m} overlap/single({a.baseline_threads} threads)"] = o / t[single]
        ratios[f"M={m} overlap/single(1 thread)"] = o / t1
    for k, v in ratios.items():
        print(f"  {k:<36} {v:.2f}")
    return {
        "runs": runs,
        "ratios": ratios,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }


def report(a, ranks: list[dict], wall: float, base: dict | None) -> None:
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
            f"= {base['product_s'] / base['forward_s']:.1f}× forward = {base['product_s'] / base['gradient_s']:.2f}× "
            f"gradient; peak RSS {base['peak_rss_mb']:.0f} MB, graph {base['graph_mb']:.0f} MB"
        )
        rss_ratio = max(r["rss_products_mb"] for r in ranks) / base["rss_products_mb"]
        print(
            f"ratios pipeline/single: product time {r0['product_s'] / base['product_s']:.2f}×, "
            f"largest worker RSS during products {rss_ratio:.2f}×"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="hf-gpt2", choices=sorted(DEFAULTS))
    p.add_argument("--vocab", type=int, default=None, help="default: the model's (50257 for hf-gpt2)")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="hf-gpt2 attention")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--balance", default="compute", choices=["compute", "parameters"], help="how stages are cut")
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
        help="where Lanczos vectors live (default disk: 33 vectors of a 60M-parameter stage are 8 GB)",
    )
    p.add_argument("--scratch", default=None, help="folder for --basis disk (default: a temporary folder)")
    p.add_argument("--eig-max-steps", type=int, default=40)
    p.add_argument("--json", default=None)
    p.add_argument("--schedule", default="overlap", choices=["overlap", "sequential"])
    p.add_argument("--micro-batches", type=int, default=None, help="per probe batch (default: the library's)")
    p.add_argument("--compare", action="store_true", help="single process, sequential and overlapped stages")
    p.add_argument("--micro-list", type=int, nargs="+", default=[2, 4, 8], help="--compare: overlap micro-batches")
    a = p.parse_args()
    for k, v in DEFAULTS[a.model].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        t = time.perf_counter()
        index, n = write_checkpoint(a, Path(tmp) / "ckpt")
        print(
            f"{a.model}: vocab {a.vocab}, dim {a.dim}, {a.layers} layers, {a.heads} heads: {n:,} parameters; "
            f"{a.batches} batch(es) of {a.batch} sequences × {a.seq} tokens; {a.dtype}; {a.stages} stage(s); "
            f"checkpoint written in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        out = Path(tmp) / "out"
        out.mkdir()
        if a.scratch is None:
            a.scratch = str(Path(tmp) / "scratch")
            Path(a.scratch).mkdir()
        meta: dict[str, Any] = {"args": vars(a), "parameters": n}
        if a.compare:
            result = compare(a, index, out)
            if a.json:
                Path(a.json).write_text(json.dumps({**meta, **result}, indent=1))
            return
        t = time.perf_counter()
        ranks = run_pipeline(a, index, out, a.schedule, a.micro_batches, eig=True)
        wall = time.perf_counter() - t
        base = run_single(a, index, out, a.baseline_threads) if a.baseline else None
    report(a, ranks, wall, base)
    if a.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        Path(a.json).write_text(
            json.dumps({**meta, "ranks": ranks, "baseline": base, "wall_s": wall, "machine": machine}, indent=1)
        )


if __name__ == "__main__":
    main()
