"""GPU check of the pipeline Hessian-vector product (issue 6), without Ray.

Spawns one process per pipeline stage. With two or more visible GPUs each stage owns
a GPU and messages go over NCCL; with one GPU the stages share it and messages go
over gloo through host memory (NCCL refuses two ranks on one device). Checks, in
float64 on a small GPT-style model, that the pipeline product equals the
single-process product on the GPU (and on the CPU) to 1e-10 relative, over 2 and 3
stages; checks that a host-memory Lanczos basis bounds peak device memory; then
times float32 products of a ~110M-parameter model over 2 stages.
Prints one line per check and a JSON summary (``--json PATH``).

    python bench/gpu_pipeline_check.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.pipeline import PipelineHessian, build_stage, grid_groups  # noqa: E402
from probe.gpt import gpt, lm_loss  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402

SMALL = dict(vocab=32, dim=16, layers=3, heads=2, max_len=8)
LARGE = dict(vocab=8192, dim=768, layers=14, heads=12, max_len=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data(cfg: dict, n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab"], (n, cfg["max_len"] + 1), generator=g)
    half = n // 2
    return [(ids[:half, :-1], ids[:half, 1:]), (ids[half:, :-1], ids[half:, 1:])]


def device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count())


def worker(
    rank: int,
    world: int,
    port: int,
    cfg: dict,
    dtype: str,
    n: int,
    V,
    products: int,
    out: str,
    schedule: str = "overlap",
    micro: int | None = None,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    device = device_for(rank)
    torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    try:
        ranks, pipe, data_group, stage, _ = grid_groups(world, 1)
        torch.manual_seed(0)
        model = gpt(**cfg).to(getattr(torch, dtype))
        part, offset, dim = build_stage(model, world, stage)
        part = part.to(device)
        batches = [(x.to(device), y.to(device)) for x, y in data(cfg, n)]
        op = PipelineHessian(
            part,
            lm_loss,
            batches,
            stage_index=stage,
            ranks=ranks,
            offset=offset,
            dim=dim,
            pipe_group=pipe,
            data_group=data_group,
            schedule=schedule,
            micro_batches=micro,
        )
        v = (
            V[op.local_slice]
            if V is not None
            else op.random_vectors(1, generator=torch.Generator().manual_seed(2), kind="gaussian").cpu()
        ).to(device, op.dtype)
        hv = op.matmat(v.reshape(-1, 1))
        torch.cuda.synchronize()
        times = []
        for _ in range(products):
            t = time.perf_counter()
            op.matmat(v.reshape(-1, 1))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        torch.save(
            {
                "slice": (offset, offset + op.local_dim),
                "hv": hv.cpu(),
                "backend": backend,
                "product_s": min(times) if times else None,
                "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
                "params": op.local_dim,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def pipeline(
    world: int, cfg: dict, dtype: str, n: int, V, products: int, out: str, schedule="overlap", micro=None
) -> list[dict]:
    mp.start_processes(
        worker,
        args=(world, free_port(), cfg, dtype, n, V, products, out, schedule, micro),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return sorted((torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)), key=lambda p: p["slice"])


def host_basis_peak_check() -> dict:
    """A host-memory Lanczos basis bounds peak device memory (moved here from the CPU test suite: it needs CUDA).

    A diagonal operator with 2²¹ float64 entries (16 MiB a vector), 2 runs × 40 steps: the device basis holds
    2 × 41 vectors; the host basis, read in blocks of 4, should keep the device at blocks plus the recurrence.
    """
    from probe.basis import DeviceBasis, HostBasis
    from probe.lanczos import lanczos
    from probe.operators import CurvatureOperator

    dim, runs, steps = 2**21, 2, 40
    diag = torch.linspace(0.1, 2.0, dim, dtype=torch.float64, device="cuda")

    class Diagonal(CurvatureOperator):
        def __init__(self):
            self.dim = self.local_dim = dim
            self.dtype, self.device = diag.dtype, diag.device

        def _matmat(self, V):
            return diag[:, None] * V

    op = Diagonal()
    start = op.random_vectors(runs, generator=torch.Generator().manual_seed(13))

    def peak(store) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lanczos(op, start, steps, basis=store)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    vector = dim * 8
    host = HostBasis(block_size=4)
    device_peak, host_peak = peak(DeviceBasis()), peak(host)
    ok = (
        device_peak >= runs * (steps + 1) * vector
        and host_peak <= runs * (2 * 4 + 12) * vector
        and host.view(1).is_pinned()
    )
    return {"device_peak_vectors": device_peak / vector, "host_peak_vectors": host_peak / vector, "pass": bool(ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="skip the ~110M-parameter timing")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run this on a GPU machine")
    out = Path(a.json).parent if a.json else Path("out/gpu")
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
    }
    torch.manual_seed(0)
    model = gpt(**SMALL).double()
    batches = data(SMALL, 10)
    cpu = HessianOperator(model, lm_loss, batches)
    V = torch.randn(cpu.dim, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want_cpu = cpu.matmat(V)
    gpu = HessianOperator(model.cuda(), lm_loss, [(x.cuda(), y.cuda()) for x, y in batches])
    want = gpu.matmat(V.cuda()).cpu()
    summary["cuda_vs_cpu_rel"] = float((want - want_cpu).abs().max() / want_cpu.abs().max())
    print(f"single-process HVP, CUDA vs CPU (float64): {summary['cuda_vs_cpu_rel']:.2e} relative", flush=True)
    ok = summary["cuda_vs_cpu_rel"] < 1e-10
    for world in (2, 3):
        parts = pipeline(world, SMALL, "float64", 10, V, 0, str(out))
        got = torch.cat([q["hv"] for q in parts])
        rel = float((got - want).abs().max() / want.abs().max())
        summary[f"pipeline{world}_rel"] = rel
        summary[f"pipeline{world}_backend"] = parts[0]["backend"]
        ok &= rel < 1e-10
        print(
            f"pipeline HVP over {world} stages ({parts[0]['backend']}) vs single process: {rel:.2e} relative",
            flush=True,
        )
    basis = host_basis_peak_check()
    summary["host_basis"] = basis
    ok &= basis["pass"]
    print(
        f"host Lanczos basis: peak device memory {basis['host_peak_vectors']:.0f} vectors vs "
        f"{basis['device_peak_vectors']:.0f} with the device basis ({'ok' if basis['pass'] else 'FAIL'})",
        flush=True,
    )
    if not a.quick:  # the schedules side by side (issue 14): one micro-batch at a time against overlapped
        for schedule, micro in (("sequential", 1), ("overlap", 4)):
            parts = pipeline(2, LARGE, "float32", 8, None, 3, str(out), schedule, micro)
            keys = ("params", "product_s", "peak_mem_mb", "backend")
            summary[f"large_{schedule}"] = [{k: q[k] for k in keys} for q in parts]
            for q in parts:
                print(
                    f"~110M GPT, {schedule} ({micro} micro-batches), stage {q['slice']}: {q['params']:,} parameters, "
                    f"product {q['product_s']:.3f} s, peak GPU memory {q['peak_mem_mb']:.0f} MiB ({q['backend']})",
                    flush=True,
                )
        ratio = max(q["product_s"] for q in summary["large_overlap"]) / max(
            q["product_s"] for q in summary["large_sequential"]
        )
        summary["overlap_over_sequential"] = ratio
        print(f"overlapped / sequential time per product: {ratio:.2f}", flush=True)
    summary["pass"] = bool(ok)
    print("PASS" if ok else "FAIL", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
