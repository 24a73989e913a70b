"""GPU check: CUDA parity, the NCCL code path of the sharded operator, and HVP throughput.

Runs without Ray (the GPU machines this project borrows have PyTorch but no Ray):
the same ``ShardedOperator`` the Ray workers use, in this process or spawned
processes. Prints one line per check and a JSON summary (``--json PATH``).

    python bench/gpu_check.py [--json out.json] [--quick]

Checks:
1. float64 HVP on CUDA equals the CPU HVP (relative difference).
2. NCCL: a process group over every visible GPU (world size = GPU count; a
   one-GPU machine exercises the NCCL reduce-scatter path with world size 1);
   eigenvalues, Hutch++ trace and SLQ moments through ``ShardedOperator`` equal
   the plain CUDA operator to 1e-10 relative (float64).
3. Throughput: float32 gradient vs HVP with the graph kept, on MLPs of ~1M and
   ~17M parameters; HVPs per second, HVP/gradient time ratio, batched products.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cluster.distributed import ShardedOperator  # noqa: E402
from probe.eigen import eigenvalues  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.models import digits_mlp  # noqa: E402
from probe.slq import spectral_density  # noqa: E402
from probe.trace import hutchpp  # noqa: E402


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _model(hidden: int, dtype, device, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return digits_mlp(hidden=hidden).to(dtype=dtype, device=device)


def _estimates(op) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    e = eigenvalues(op, 3, generator=g).eigenvalues
    t = hutchpp(op, 30, generator=g).trace
    s = spectral_density(op, runs=3, steps=20, generator=g)
    return torch.cat([e, torch.tensor([t, s.moment(1)[0], s.moment(2)[0]], dtype=torch.float64)])


def check_parity() -> dict:
    x, y = _data(256)
    cpu = HessianOperator(_model(32, torch.float64, "cpu"), F.cross_entropy, [(x, y)])
    gpu = HessianOperator(_model(32, torch.float64, "cuda"), F.cross_entropy, [(x, y)])
    v = torch.randn(cpu.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = cpu @ v, (gpu @ v.cuda()).cpu()
    rel = float((a - b).norm() / a.norm())
    print(f"[parity] float64 HVP CUDA vs CPU: relative difference {rel:.2e} (dim {cpu.dim})", flush=True)
    return {"hvp_cuda_vs_cpu_rel": rel, "ok": rel < 1e-10}


def _nccl_worker(rank: int, world: int, port: int, q) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _data(300)
    idx = torch.arange(len(y)).tensor_split(world)[rank]
    model = _model(16, torch.float64, f"cuda:{rank}")
    local = HessianOperator(model, F.cross_entropy, [(x[idx], y[idx])], total_examples=len(y))
    op = ShardedOperator(local)
    est = _estimates(op)
    plain = _estimates(local) if world == 1 else est  # same process, no sharding
    if rank == 0:
        q.put((est.tolist(), plain.tolist(), op.num_collectives, dist.get_backend(), local.check_determinism()))
    dist.barrier()
    dist.destroy_process_group()


def check_nccl() -> dict:
    world = torch.cuda.device_count()
    x, y = _data(300)
    ref = _estimates(HessianOperator(_model(16, torch.float64, "cuda:0"), F.cross_entropy, [(x, y)]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nccl_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    est, plain, collectives, backend, determinism = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    per = ((torch.tensor(est) - ref).abs() / ref.abs()).tolist()
    rel = max(per)
    same = float(((torch.tensor(est) - torch.tensor(plain)).abs() / ref.abs()).max())
    print(
        f"[nccl] backend={backend}, world size {world}, {collectives} collectives: sharded vs plain operator "
        f"in the same process {same:.2e}; vs the driver process {rel:.2e} (per estimate "
        f"{', '.join(f'{x:.1e}' for x in per)}); operator determinism {determinism:.1e}",
        flush=True,
    )
    return {
        "world_size": world,
        "backend": backend,
        "max_rel": rel,
        "same_process_rel": same,
        "per_estimate_rel": per,
        "determinism": determinism,
        "collectives": collectives,
        "ok": same < 1e-10,
    }


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def check_throughput(quick: bool) -> list[dict]:
    rows = []
    for hidden, n in [(1024, 4096)] if quick else [(1024, 4096), (4096, 8192)]:
        x, y = _data(n)
        model = _model(hidden, torch.float32, "cuda")
        op = HessianOperator(model, F.cross_entropy, [(x, y)])
        grad_s = _time(op.loss_and_gradient, 10)
        v1 = torch.randn(op.dim, 1, device="cuda")
        v8 = torch.randn(op.dim, 8, device="cuda")
        hvp_s = _time(partial(op.matmat, v1), 10)
        hvp8_s = _time(partial(op.matmat, v8), 5) / 8
        row = {
            "params": op.dim,
            "examples": n,
            "grad_s": grad_s,
            "hvp_s": hvp_s,
            "hvp_per_s": 1 / hvp_s,
            "hvp_over_grad": hvp_s / grad_s,
            "hvp_batched8_s": hvp8_s,
        }
        print(
            f"[throughput] {op.dim:,} params, {n} examples, float32: gradient {grad_s * 1e3:.2f} ms, "
            f"HVP {hvp_s * 1e3:.2f} ms ({1 / hvp_s:.0f}/s, {hvp_s / grad_s:.2f}× gradient), "
            f"batched k=8 {hvp8_s * 1e3:.2f} ms per vector",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    info = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }
    print(f"[device] {info}", flush=True)
    summary = {"info": info, "parity": check_parity(), "nccl": check_nccl(), "throughput": check_throughput(args.quick)}
    ok = summary["parity"]["ok"] and summary["nccl"]["ok"]
    print(f"[result] {'PASS' if ok else 'FAIL'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
