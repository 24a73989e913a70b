"""The embedded default job: the whole product on scikit-learn's digits, in minutes on a laptop.

``probe demo`` trains two small digits networks by full-batch gradient descent
(safetensors checkpoints carrying their learning rate and step), writes two job
specs, starts a local Ray instance with two workers, serves Prometheus metrics
while it works, and runs every probe kind through the same job driver as
``probe run``:

- ``geometry`` (the two final checkpoints): top-5 and bottom eigenvalues, trace
  (Krylov-aware Hutch++), deflated SLQ spectral density, sharpness (λ_max, Keskar, SAM, adaptive), a 2-D
  filter-normalized loss surface, the barrier between the two solutions along a
  straight line and a trained Bézier curve, PAC-Bayes σ* and bound, gradient noise,
  and the critical-point label;
- ``trajectory`` (run A's checkpoints along training): the edge-of-stability series
  λ_max against 2/η.

Results land in Parquet under ``OUT/results``; ``probe report`` renders them into
``OUT/results/report/index.html``. Checkpoints already under ``OUT`` are reused,
so a second ``probe demo`` finds every result stored and runs nothing.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from cluster.data import digits_tensors
from cluster.kinds.spectrum import spectrum_from_row
from probe.models import digits_mlp

__all__ = ["train_series", "run_demo", "DEMO_LR", "DEMO_STEPS"]

DEMO_HIDDEN = 32
DEMO_LR = 1.0  # full-batch GD; λ_max climbs to ≈ 2/η within 200 steps (progressive sharpening, Cohen et al. 2021)
DEMO_STEPS = (0, 25, 50, 100, 200, 400, 800)


def train_series(folder: Path, *, seed: int, lr: float = DEMO_LR, save_at=DEMO_STEPS) -> list[Path]:
    """Train ``digits_mlp`` by full-batch GD and save safetensors checkpoints at the steps in ``save_at``.

    Checkpoints already in ``folder`` are kept: safetensors writes its metadata in
    a per-process order, so re-saving equal weights would give new bytes, a new
    content hash, and results measured again.
    """
    wanted = [folder / f"step-{step}.safetensors" for step in sorted(save_at)]
    if all(p.is_file() for p in wanted):
        return wanted
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x, y = digits_tensors(split="train")
    model = digits_mlp(hidden=DEMO_HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    paths = []
    for step in range(max(save_at) + 1):
        if step in save_at:
            path = folder / f"step-{step}.safetensors"
            meta = {
                "lr": repr(lr),
                "step": str(step),
                "seed": str(seed),
                "optimizer": "gd",
                "batch_size": str(len(y)),
            }  # full batch
            tmp = path.with_name(f".{path.name}.tmp")  # never leave a half-written checkpoint under its name
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
            tmp.replace(path)
            paths.append(path)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return paths


def _accuracy(path: Path, split: str) -> float:
    from safetensors.torch import load_file

    model = digits_mlp(hidden=DEMO_HIDDEN)
    model.load_state_dict(load_file(str(path)))
    x, y = digits_tensors(split=split)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _specs(out: Path, a: list[Path], b: list[Path], num_workers: int, seed: int) -> dict[str, Path]:
    """Write the two demo specs under ``out/specs`` (paths relative to the spec files)."""
    folder = out / "specs"
    folder.mkdir(parents=True, exist_ok=True)
    rel = lambda p: str(Path("..") / p.relative_to(out))  # noqa: E731
    a_final, b_final = rel(a[-1]), rel(b[-1])
    common = {
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": DEMO_HIDDEN}},
        "data": {
            "factory": "cluster.data:digits",
            "num_examples": 512,
            "batch_size": 128,
            "eval_sets": {"test": {"factory": "cluster.data:digits", "kwargs": {"split": "test"}, "num_examples": 256}},
        },
        "loss": "cross_entropy",
        "precision": "float64",
        "mode": "eval",
        "cluster": {"num_workers": num_workers},
        "output": {"path": "../results"},
        "seed": seed,
    }
    geometry = {
        "name": "geometry",
        **common,
        "model": {**common["model"], "checkpoints": [a_final, b_final]},
        "probes": [
            {"kind": "eigenvalues", "k": 5, "which": "largest"},
            {"kind": "eigenvalues", "k": 1, "which": "smallest"},
            # Krylov-aware Hutch++ and deflated SLQ (the defaults) at fewer products than the
            # Hutch++ 99 and plain 10 × 80 SLQ of earlier demos, at no larger printed standard errors.
            {"kind": "trace", "matvecs": 80},
            {"kind": "spectrum", "runs": 4, "steps": 80},
            {"kind": "sharpness", "measures": ["lambda_max", "keskar", "sam", "adaptive"], "steps": 10},
            {"kind": "surface", "dims": 2, "resolution": 21, "span": 1.0},
            {
                "kind": "barrier",
                "between": [a_final, b_final],
                "path": ["linear", "bezier"],
                "points": 25,
                "train_steps": 200,
                "eval_sets": ["probe", "test"],
            },
            {"kind": "pacbayes", "target": 0.1, "samples": 32},
            {"kind": "noise"},
            {"kind": "critical"},
        ],
    }
    trajectory = {
        "name": "trajectory",
        **common,
        "model": {**common["model"], "checkpoints": [str(Path("..") / a[0].parent.relative_to(out))]},
        "probes": [{"kind": "eos", "optimizer": "gd"}],
    }
    paths = {}
    for spec in (geometry, trajectory):
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        paths[spec["name"]] = path
    return paths


def _serve_metrics(metrics, port: int | None):
    from cluster.metrics import serve

    for candidate in (port, 0) if port else (0,):
        try:
            server, _ = serve(metrics, port=candidate)
            return server
        except OSError:
            continue
    return None


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    seed: int = 0,
    num_workers: int = 2,
    metrics_port: int | None = 9464,
    stream: TextIO = sys.stdout,
) -> dict:
    """Run the demo under ``out_dir``; returns where everything is and the headline values."""
    from cluster.job import run_job
    from cluster.metrics import Metrics
    from cluster.raytools import connect
    from cluster.report import write_report
    from cluster.spec import load_spec
    from cluster.store import ResultStore

    out = Path(out_dir)
    say = lambda msg: print(msg, file=stream, flush=True)  # noqa: E731
    t0 = time.perf_counter()

    say(
        f"[1/5] training two digits MLPs (64-{DEMO_HIDDEN}-{DEMO_HIDDEN}-10, tanh) by full-batch GD, η = {DEMO_LR:g}, "
        f"{max(DEMO_STEPS)} steps ..."
    )
    a = train_series(out / "checkpoints" / "run-a", seed=seed)
    b = train_series(out / "checkpoints" / "run-b", seed=seed + 1, save_at=(max(DEMO_STEPS),))
    for name, path in (("A", a[-1]), ("B", b[-1])):
        say(
            f"      run {name}: train accuracy {_accuracy(path, 'train'):.3f}, "
            f"test accuracy {_accuracy(path, 'test'):.3f}"
            f"  ({path.relative_to(out)})"
        )
    specs = _specs(out, a, b, num_workers, seed)

    say(f"[2/5] starting a local Ray instance with {num_workers} workers and the metrics endpoint ...")
    connect(None, num_cpus=num_workers)
    metrics = Metrics()
    server = _serve_metrics(metrics, metrics_port)
    url = f"http://127.0.0.1:{server.server_port}/metrics" if server else None
    say(f"      metrics at {url}" if url else "      metrics: no free loopback port; skipped")

    summaries = {}
    try:
        for i, (name, spec_path) in enumerate(specs.items(), start=3):
            spec = load_spec(spec_path)
            say(
                f"[{i}/5] job {name!r} ({spec_path.relative_to(out)}): "
                f"{len(spec.probes)} probe(s) on a group of {num_workers} Ray workers ..."
            )
            summaries[name] = run_job(spec, backend="ray", metrics=metrics, progress=lambda m: say("      " + m))
        exposition = urllib.request.urlopen(url, timeout=10).read().decode() if url else ""
    finally:
        if server is not None:
            server.shutdown()
    say("[5/5] writing the report ...")
    results = out / "results"
    html = write_report(results)

    store = ResultStore(results)
    rows = {
        k: store.read(k).to_pylist()
        for k in ("eigenvalues", "trace", "sharpness", "barrier", "eos", "spectrum", "pacbayes", "noise", "critical")
    }
    a_name, b_name = a[-1].relative_to(out).as_posix(), b[-1].relative_to(out).as_posix()

    def of(kind, ckpt_suffix, **match):
        return [
            r for r in rows[kind] if r["checkpoint"].endswith(ckpt_suffix) and all(r[k] == v for k, v in match.items())
        ]

    say("")
    say("Hessian of the mean cross-entropy over 512 probe examples (float64, eval mode)")
    say(f"  {'':26s} {'run A':>12s} {'run B':>12s}")
    for label, kind, col, match in [
        ("λ_max", "eigenvalues", "eigenvalues", {"which": "largest"}),
        ("λ_min", "eigenvalues", "eigenvalues", {"which": "smallest"}),
        ("trace", "trace", "trace", {}),
        ("Keskar ε-sharpness", "sharpness", "value", {"measure": "keskar"}),
        ("SAM ρ-sharpness", "sharpness", "value", {"measure": "sam"}),
        ("adaptive sharpness", "sharpness", "value", {"measure": "adaptive"}),
        ("PAC-Bayes σ* (ΔL ≤ 0.1)", "pacbayes", "sigma", {}),
        ("‖∇L‖", "noise", "grad_norm", {}),
        ("gradient noise scale", "noise", "noise_scale", {}),
        ("critical point (‖∇L‖ ≤ 1e-3?)", "critical", "label", {}),
    ]:
        vals = []
        for ckpt in (a_name, b_name):
            got = of(kind, ckpt, **match)
            v = got[0][col] if got else None
            v = v[0] if isinstance(v, list) else v
            vals.append(f"{'—':>12s}" if v is None else f"{v:>12s}" if isinstance(v, str) else f"{v:12.5g}")
        say(f"  {label:26s} {vals[0]} {vals[1]}")
    for r in of("trace", a_name):
        say(
            f"  trace of run A ({r['method']}): {r['trace']:.5g} ± {r['trace_stderr']:.2g} "
            f"(1 s.e., {r['num_matvecs']} products)"
        )
    for r in of("spectrum", a_name):
        say("  " + spectrum_line(r))
    for r in sorted(rows["barrier"], key=lambda r: (r["path"], r["eval_set"])):
        say(f"  barrier A ↔ B, {r['path']:6s} path, {r['eval_set']:5s} set: {r['barrier_height']:.4g}")
    eos = sorted(rows["eos"], key=lambda r: r["step"])
    if eos:
        say(
            "  edge of stability, run A (λ_max · η / 2 by step): "
            + ", ".join(f"{r['step']}: {r['ratio']:.2f}" for r in eos)
        )
    hvps = sum(r.get("num_matvecs") or 0 for k in rows for r in rows[k])
    say("")
    say(f"done in {time.perf_counter() - t0:.0f} s; {hvps:,} Hessian-vector products stored")
    say(f"  checkpoints ... {out / 'checkpoints'}")
    say(f"  job specs ..... {', '.join(str(p) for p in specs.values())}   (re-run: probe run SPEC)")
    say(f"  Parquet ....... {results}/<kind>/<job>/   (pandas.read_parquet(path), cluster.results.load)")
    say(f"  report ........ {html}")
    if url:
        lines = [
            ln
            for ln in exposition.splitlines()
            if ln.startswith(
                (
                    "landscape_probe_lambda_max{",
                    "landscape_probe_eos_ratio{",
                    'landscape_probe_hvp_total{job_name="geometry",kind="spectrum"',
                )
            )
        ]
        say(f"  metrics ....... served at {url} while the jobs ran, e.g.")
        for ln in lines[:4]:
            say(f"                  {ln}")
    return {
        "out": str(out),
        "specs": {k: str(v) for k, v in specs.items()},
        "results": str(results),
        "report": str(html),
        "metrics_url": url,
        "summaries": {k: vars(v) for k, v in summaries.items()},
        "total_s": time.perf_counter() - t0,
    }


def spectrum_line(row: dict) -> str:
    """One line on a spectrum row: its first moment tr(H)/p and negative mass, each ± 1 s.e."""
    res = spectrum_from_row(row)
    if res is None:
        return "spectral density of run A: no Ritz values stored"
    m1, m1_se = res.moment(1)
    neg, neg_se = res.negative_mass()
    how = f"{row['estimator']}, {row['deflated']} deflated" if row.get("estimator") else "slq"
    return (
        f"spectral density of run A ({how}): tr(H)/p {m1:.4g} ± {m1_se:.2g}, "
        f"negative mass {neg:.3g} ± {neg_se:.2g} ({row['num_matvecs']} products)"
    )
