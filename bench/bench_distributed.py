"""Data-parallel scaling of an HVP-bound SLQ spectrum on a model of 1M+ parameters.

Each worker is pinned to one core and one thread (as each would be given one
GPU) and runs the same code as a Ray worker: a ``HessianOperator`` on its data
shard inside a ``ShardedOperator`` over gloo on loopback. Configurations:

- 1 worker, 1 thread (the unit of comparison);
- N workers, 1 thread each (N = 2 on this machine);
- 1 process using every core (torch's own intra-op threads).

Reported per configuration: wall time of the spectrum, time per Lanczos step,
the share of step time spent inside collectives (coordination overhead, which
includes waiting for the slower peer), and the Lanczos basis memory per worker.

    python bench/bench_distributed.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cluster.data import digits_tensors  # noqa: E402
from cluster.distributed import ShardedOperator  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.lanczos import LanczosProcess  # noqa: E402
from probe.models import wide_mlp  # noqa: E402


def _setup(hidden: int, examples: int):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = wide_mlp(hidden=hidden)
    x, y = digits_tensors(split="all")
    reps = -(-examples // len(y))  # tile the 1,797 digits when more examples are asked for
    return model, x.repeat(reps, 1)[:examples], y.repeat(reps)[:examples]


def _run(rank: int, world: int, threads: int, port: int, cfg: dict, q) -> None:
    if hasattr(os, "sched_setaffinity") and threads == 1:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(threads)
    model, x, y = _setup(cfg["hidden"], cfg["examples"])
    idx = torch.arange(len(y)).tensor_split(world)[rank]
    batches = [
        (x[idx][i : i + cfg["batch_size"]], y[idx][i : i + cfg["batch_size"]])
        for i in range(0, len(idx), cfg["batch_size"])
    ]
    local = HessianOperator(model, F.cross_entropy, batches, total_examples=len(y))
    if world > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        op = ShardedOperator(local)
    else:
        op = local
    start = op.random_vectors(cfg["runs"], generator=torch.Generator().manual_seed(0))
    proc = LanczosProcess(op, start, reorth="full")
    proc.step()  # warm-up step (first-touch allocations), not timed
    if world > 1:
        dist.barrier()
    collective0 = getattr(op, "collective_s", 0.0)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        proc.step()
    wall = time.perf_counter() - t0
    collective = getattr(op, "collective_s", 0.0) - collective0
    basis_bytes = proc.basis.numel() * proc.basis.element_size()
    transfer = 0.0
    if world > 1:
        # The same collectives alone (no compute between them, peers in step): the
        # cost of coordination itself, apart from waiting for a slower peer.
        from cluster.distributed import _reduce_scatter

        block = proc.basis[:, -1, :].T.contiguous()
        dist.barrier()
        t1 = time.perf_counter()
        for _ in range(cfg["steps"]):
            full = op.gather(block)
            out = full.new_empty(op._max_shard, full.shape[1])
            _reduce_scatter(out, op._pad(full))
            op.allreduce(torch.zeros(4, 3, dtype=torch.float64))
        transfer = time.perf_counter() - t1
        dist.barrier()
    report = {
        "rank": rank,
        "wall_s": wall,
        "collective_s": collective,
        "transfer_s": transfer,
        "basis_bytes": basis_bytes,
        "local_dim": op.local_dim,
        "dim": op.dim,
        "alpha0": float(proc.alphas[-1][0]),
    }
    q.put(report)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, threads: int, cfg: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(r, world, threads, port, cfg, q)) for r in range(world)]
    for p in procs:
        p.start()
    reports = sorted((q.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    wall = max(r["wall_s"] for r in reports)
    return {
        "workers": world,
        "threads_per_worker": threads,
        "wall_s": wall,
        "step_s": wall / cfg["steps"],
        "collective_share": max(r["collective_s"] for r in reports) / wall,
        "transfer_share": max(r["transfer_s"] for r in reports) / wall,
        "basis_mib_per_worker": max(r["basis_bytes"] for r in reports) / 2**20,
        "dim": reports[0]["dim"],
        "alpha_last": reports[0]["alpha0"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--json", help="write results here")
    parser.add_argument(
        "--examples", type=int, default=1797, help="probe examples (default: all 1,797 digits; more are tiled copies)"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    cfg = {"hidden": 1024, "runs": 4, "steps": 8 if args.quick else 20, "batch_size": 1024, "examples": args.examples}
    print(
        f"# data-parallel SLQ scaling: wide_mlp(hidden={cfg['hidden']}), {cfg['examples']} digits examples, "
        f"float32, {cfg['runs']} runs x {cfg['steps']} timed steps, full reorthogonalization"
    )
    print(f"# machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}")
    rows = [measure(1, 1, cfg)]
    for n in range(2, cores + 1):
        rows.append(measure(n, 1, cfg))
    rows.append(measure(1, cores, cfg))
    base = rows[0]["wall_s"]
    print(
        f"{'config':<28}{'wall s':>9}{'s/step':>9}{'speed-up':>10}{'in colls':>10}{'transfer':>10}"
        f"{'basis MiB/worker':>18}"
    )
    for r in rows:
        name = f"{r['workers']} worker(s) x {r['threads_per_worker']} thread(s)"
        print(
            f"{name:<28}{r['wall_s']:>9.2f}{r['step_s']:>9.3f}{base / r['wall_s']:>9.2f}x"
            f"{100 * r['collective_share']:>9.1f}%{100 * r['transfer_share']:>9.1f}%{r['basis_mib_per_worker']:>18.1f}"
        )
        r["speedup_vs_1x1"] = base / r["wall_s"]
    print(
        "# in colls: step time inside collectives, waiting for the slower peer included; "
        "transfer: the same collectives timed alone"
    )
    agree = max(abs(r["alpha_last"] - rows[0]["alpha_last"]) / abs(rows[0]["alpha_last"]) for r in rows)
    print(f"# last Lanczos alpha agrees across configurations to {agree:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "cores": cores, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
