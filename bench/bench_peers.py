"""Peer benchmark: this project against PyHessian, curvlinops-for-pytorch and hessian-eigenthings.

In one process, on the same trained model, the same probe data (the digits
training split as one batch of 1,348 examples, which every peer accepts and which
lets PyHessian keep its gradient graph), the same cross-entropy loss and float32,
it times each tool to a stated accuracy, reached from each of three seeds:

  eig      the top Hessian eigenvalue within 1e-3 (relative). Each tool's knob (our
           residual ``tol``, PyHessian's power-iteration ``tol``, the ``tol`` of SciPy's
           ``eigsh`` on curvlinops' operator, hessian-eigenthings' Lanczos ``max_iter``)
           walks a ladder from loose to tight.
  trace    the Hessian trace within 1% of the exact trace (measured error). Every
           estimator (ours: Hutch++, XTrace, Krylov-aware Hutch++; PyHessian:
           Hutchinson; curvlinops: Hutchinson, Hutch++, XTrace; hessian-eigenthings:
           Hutchinson, Hutch++) walks a ladder of product budgets.
  density  a spectral density by SLQ whose first and second moments are within 2%,
           whose negative mass tr(H-)/tr|H| is within 0.02 and whose smoothed density
           is within L1 0.01 of the exact spectrum's (ours: plain and deflated SLQ;
           every peer: its SLQ), on a ladder of (runs, steps).
  hvp      one Hessian-vector product against one gradient, the graph reused.

The ladders and the pruning rule are in ``peer_accuracy.py``; a tool that reaches
nothing within a model's cap gets the time of its costliest setting as a lower bound.

Accuracy is measured against references that do not come from the timed runs:
dense float64 Hessians (``torch.func``, then ``eigvalsh``) for the digits models;
for the 1.1M-parameter model a float64 Lanczos run of ours with ``tol=1e-9`` for
lambda_max and BackPACK's exact Hessian diagonal (float64) for the trace (its
density is checked on the first moment only: no exact spectrum exists for it). The real
all-MiniLM-L6-v2 checkpoint (``peer_minilm.py``, 22.6M parameters) runs eig against the same
kind of float64 Lanczos reference, and hvp; its trace and density are not run, since no reference
within 1% is affordable on a CPU (``peer_common.MINILM``, docs/benchmarks.md).

PyHessian's ``density()`` calls ``torch.eig``, which PyTorch removed; it runs here
with the smallest shim that restores it (``torch.linalg.eigh`` on the symmetric
tridiagonal, returned in ``torch.eig``'s old format). That is said in the output.

Run ``bash bench/setup_env.sh`` first, then
``.venv-bench/bin/python bench/bench_peers.py [--quick] [--json PATH]``.

Modules: ``peer_common.py`` (targets, ladders, model specs, the run record),
``peer_tools.py`` (one adapter per tool), ``peer_tasks.py`` (references, eig and hvp),
``peer_accuracy.py`` (trace and density to accuracy); this file summarizes and prints.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import traceback
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np
import torch
from peer_accuracy import run_density, run_trace
from peer_common import FULL_MODELS, QUICK_MODELS, SEED, Record, say, short_reason, timed
from peer_tasks import dense_reference, large_reference, run_eig, run_hvp, train
from peer_tools import Curvlinops, Eigenthings, Ours, PyHessian

from cluster.data import digits_tensors

# --------------------------------------------------------------------------- summary


PEERS = ("pyhessian", "curvlinops", "eigenthings")


def best(records: list[Record], tool: str) -> Record | None:
    """The fastest record of ``tool`` that met its accuracy target, or else (for the
    time-to-accuracy tasks) its smallest lower bound: a tool's time to the target is at
    least the smallest of its methods' times or bounds."""
    ok = [r for r in records if r.tool == tool and r.status == "ok" and (r.reached is not False or r.lower_bound)]
    return min(ok, key=lambda r: r.time_s) if ok else None


def summarize(records: list[Record], models: list[str]) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    lines = []
    head = (
        f"{'model':11s} {'task':6s} {'ours':>10s} "
        + " ".join(f"{p:>24s}" for p in PEERS)
        + f" {'vs faster peer':>15s}  target"
    )
    lines += [head, "-" * len(head)]
    for model in models:
        for task in ("eig", "trace", "density", "hvp"):
            recs = [r for r in records if r.model == model and r.task == task]
            if not recs:
                continue
            if all(r.status.startswith("not run") for r in recs):
                lines.append(f"{model:11s} {task:6s} {recs[0].status}")
                rows.append({"model": model, "task": task, "not_run": recs[0].status})
                continue
            ours = best(recs, "ours")
            if ours is not None and ours.lower_bound:
                ours = None  # ours did not reach the target: no ratio
            if task == "hvp":
                ours = next((r for r in recs if r.tool == "ours" and r.status == "ok"), None)
            row: dict[str, Any] = {"model": model, "task": task, "ours_s": ours.time_s if ours else None}
            cells = []
            peer_times = {}
            for p in PEERS:
                r = best(recs, p)
                if r is None:
                    fail = next((q for q in recs if q.tool == p), None)
                    why = "failed" if fail and fail.status != "ok" else ("not reached" if fail else "n/a")
                    cells.append(f"{why:>24s}")
                    row[p] = why
                    continue
                peer_times[p] = r.time_s
                ratio = ours.time_s / r.time_s if ours else float("nan")
                mark = ">" if r.lower_bound else ""
                cells.append(f"{mark + _fmt_s(r.time_s):>11s} ({ratio:5.2f}x) {r.method[:5]:>5s}")
                row[p] = {"time_s": r.time_s, "ratio": ratio, "method": r.method, "lower_bound": r.lower_bound}
            if peer_times and ours:
                fastest = min(peer_times, key=peer_times.get)
                ratio = ours.time_s / peer_times[fastest]
                row["faster_peer_lower_bound"] = best(recs, fastest).lower_bound
                row["faster_peer"], row["ratio_vs_faster_peer"] = fastest, ratio
                bound = 1.0 if task == "eig" else 0.5  # eig: equal or better; trace, density: half
                met = ratio <= bound and ours.reached is not False
                if task == "hvp":
                    met = bool(ours.reached)
                    verdict = f"HVP/grad {ours.value:.2f} {'<=' if met else '>'} 1.6"
                else:
                    verdict = f"{'met' if met else 'NOT met'} (<= {bound})"
                row["target_met"] = met
                vs = f"{ratio:5.2f}x {fastest[:8]}"
            else:
                vs, verdict = "-", "-"
            our_cell = (_fmt_s(ours.time_s) + (f" {ours.method[:5]}" if task != "eig" else "")) if ours else "not met"
            lines.append(f"{model:11s} {task:6s} {our_cell:>10s} " + " ".join(cells) + f" {vs:>15s}  {verdict}")
            rows.append(row)
    lines.append(
        "ratios are ours / theirs (below 1: ours faster); > = not reached within the cap: the time of its "
        "costliest setting, a lower bound (the ratio is then an upper bound)"
    )
    return "\n".join(lines), rows


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f}ms" if t < 1 else f"{t:.2f}s"


def detail_table(records: list[Record]) -> str:
    lines = [
        f"{'model':11s} {'task':6s} {'tool':20s} {'method':11s} {'setting':46s} "
        f"{'time':>9s} {'prods':>6s}  accuracy / status"
    ]
    for r in records:
        acc = "  ".join(f"{k}={v:.2e}" for k, v in r.accuracy.items())
        if r.status != "ok":
            acc = r.status
        elif r.reached is False:
            acc += "  (target not reached)"
        lines.append(
            f"{r.model:11s} {r.task:6s} {r.tool:20s} {r.method[:11]:11s} {r.setting[:46]:46s} "
            f"{_fmt_s(r.time_s) if r.time_s == r.time_s else '-':>9s} "
            f"{r.num_matvecs if r.num_matvecs is not None else '-':>6}  {acc}" + (f"  [{r.note}]" if r.note else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {}
    for mod, dist in (
        ("pyhessian", "pyhessian"),
        ("curvlinops", "curvlinops-for-pytorch"),
        ("hessian_eigenthings", "hessian-eigenthings"),
        ("backpack", "backpack-for-pytorch"),
    ):
        try:
            from importlib.metadata import version

            versions[mod] = version(dist)
        except Exception:
            versions[mod] = "missing"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "probe"], capture_output=True, text=True, check=False
        ).stdout.strip()
        commit += " (probe/ modified)" if dirty else ""
    except OSError:
        commit = "unknown"
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "peers": versions,
        "loadavg_start": os.getloadavg(),
    }


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, trace_ref: str) -> dict[str, Any]:
    """The exact reference (dense Hessian) up to 10,000 parameters, else the large-model one
    (the float64 Lanczos basis capped at 40 vectors above 10M parameters: 7 GB at 22.6M)."""
    dim = sum(p.numel() for p in model.parameters())
    if dim <= 10_000:
        return dense_reference(model, x, y)
    return large_reference(model, x, y, trace_ref, max_steps=40 if dim > 10_000_000 else 300)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="digits models only, lower caps and one timed repeat (a few minutes)"
    )
    ap.add_argument("--json", metavar="PATH", help="save every record and the summary as JSON")
    ap.add_argument("--models", nargs="*", help="subset of model names to run")
    ap.add_argument(
        "--tasks", nargs="*", default=["eig", "trace", "density", "hvp"], help="subset of eig trace density hvp"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see docs/benchmarks.md)")
    ap.add_argument(
        "--reference-cache", metavar="PATH", help="reuse (or save) the references of identically trained models"
    )
    ap.add_argument(
        "--wide-trace-ref", choices=["backpack", "hutchpp"], default="backpack", help="reference trace of the 1M model"
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    specs = QUICK_MODELS if args.quick else FULL_MODELS
    if args.models:
        every = {s.name: s for s in FULL_MODELS}
        specs = [next((q for q in specs if q.name == n), every[n]) for n in args.models]

    env = machine()
    say(
        f"machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['threads']} thread(s), "
        f"load {env['loadavg_start']}"
    )
    say(f"peers: {env['peers']}; this project at commit {env['commit']}")

    tools: list[Any] = [Ours(), Ours(batched=True), Ours(batched=False)]
    tool_errors = {}
    for cls in (PyHessian, Curvlinops, Eigenthings):
        try:
            tools.append(cls())
        except Exception as exc:
            tool_errors[cls.name] = f"failed: {short_reason(exc)}"
            say(f"peer {cls.name} unavailable: {tool_errors[cls.name]}")
    if any(isinstance(t, PyHessian) and t.shim for t in tools):
        say(
            "note: PyHessian's density() calls torch.eig, removed from PyTorch; shimmed with torch.linalg.eigh "
            "on the symmetric tridiagonal, returned in torch.eig's (n, 2) real/imag format"
        )

    cache: dict[str, Any] = {}
    if args.reference_cache and os.path.exists(args.reference_cache):
        with open(args.reference_cache) as fh:
            cache = json.load(fh)
    digits = digits_tensors(split="train")
    records: list[Record] = []
    refs: dict[str, Any] = {}
    for spec in specs:
        x, y = spec.data() if spec.data else digits
        model, loss = train(spec, x, y)
        dim = sum(p.numel() for p in model.parameters())
        how = f"trained {spec.train_steps} Adam steps" if spec.train_steps else "the checkpoint as shipped"
        say(f"\n== {spec.name}: {dim:,} parameters, {how}, loss {loss:.4g}")
        cached = cache.get(spec.name)
        if cached and cached.get("dim") == dim and cached.get("train_loss") == loss:
            ref, dt = dict(cached), 0.0
            if "evals" in ref:
                ref["evals"] = torch.tensor(ref["evals"], dtype=torch.float64)
            ref["kind"] += " (from --reference-cache)"
        else:
            (ref, dt) = timed(partial(reference, model, x, y, spec.trace_ref or args.wide_trace_ref))
            if args.reference_cache:
                cache[spec.name] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in ref.items()} | {
                    "dim": dim,
                    "train_loss": loss,
                }
                with open(args.reference_cache, "w") as fh:
                    json.dump(cache, fh)
        say(
            f"   reference ({dt:.1f}s): lambda_max {ref['lambda_max']:.8g}, lambda_2 {ref['lambda_2']:.6g}, "
            f"trace {ref['trace']:.8g}  [{ref['kind']}]"
        )
        refs[spec.name] = {k: v for k, v in ref.items() if k != "evals"} | {"dim": dim, "train_loss": loss}
        for name, reason in tool_errors.items():
            for task in args.tasks:
                if task not in spec.skip:
                    records.append(Record(spec.name, task, name, "-", status=reason))
        for task in args.tasks:
            say(f"  -- {task}")
            if task in spec.skip:
                say(f"    not run on {spec.name}: {spec.skip[task]}")
                records.append(Record(spec.name, task, "-", "-", status=f"not run: {spec.skip[task]}"))
                continue
            try:
                if task == "eig":
                    records += run_eig(spec, model, x, y, ref, tools)
                elif task == "trace":
                    records += run_trace(spec, model, x, y, ref, tools)
                elif task == "density":
                    records += run_density(spec, model, x, y, ref, tools)
                elif task == "hvp":
                    records += run_hvp(spec, model, x, y, tools, reps=5 if dim > 100_000 else 30)
            except Exception:
                say(f"  task {task} crashed:\n{traceback.format_exc()}")
            gc.collect()
        del model
        gc.collect()

    env["loadavg_end"] = os.getloadavg()
    summary, rows = summarize(records, [s.name for s in specs])
    say("\n== all runs\n" + detail_table(records))
    say("\n== summary (time of the fastest method that met the accuracy target; ratio ours/theirs)\n" + summary)
    say(f"\nload average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": env,
                    "references": refs,
                    "records": [asdict(r) for r in records],
                    "summary": rows,
                },
                fh,
                indent=1,
                default=float,
            )
        say(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
