"""Time to a stated accuracy for the trace and the spectral density (issue 17).

Every tool walks a ladder of its own knobs, cheapest first: trace estimators a ladder of
product budgets (``TRACE_BUDGETS``), SLQ a ladder of (runs, steps) (``DENSITY_LADDER``).
A setting counts only when it reaches the target from every seed in ``ACCURACY_SEEDS``,
the error being *measured* against the exact reference (not the tool's own standard
error). The first such setting is timed (mean over the seeds of each seed's fastest
repeat). A seed that misses ends the setting (the other seeds are not run).

Density pruning: the first and second moments of an SLQ estimate do not depend on the
number of Lanczos steps (per run they are exact from two steps on), so a setting that
misses a moment target rules out every setting with at most as many runs; the ladder
skips them. Applied to every tool alike.

A tool that reaches nothing within the model's cap is recorded with the time of the
costliest setting it ran (one seed) and ``lower_bound=True``: its time to the target is
at least that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from peer_common import (
    ACCURACY_SEEDS,
    DENSITY_L1_TARGET,
    DENSITY_LADDER,
    LONG_RUN_S,
    MOMENT_TARGET,
    NEG_MASS_TARGET,
    SEED_STRIDE,
    TRACE_BUDGETS,
    TRACE_TARGET,
    ModelSpec,
    Record,
    rel,
    say,
    short_reason,
    timed,
)
from peer_tools import Curvlinops, Eigenthings, Ours, PyHessian

from probe.slq import SIGMA_FRACTION

Run = Callable[[Any, int], Any]  # (setting, seed) -> tool output


def _walk(
    spec: ModelSpec,
    rec: Record,
    ladder: list[Any],
    run: Run,
    check: Callable[[Any], tuple[bool, dict[str, float], bool]],
    products: Callable[[Any, Any], float],
    describe: Callable[[Any], str],
    prune: Callable[[Any, Any], bool] = lambda setting, failed: False,
) -> Record:
    """Walk ``ladder``; ``check(output) -> (reached, accuracy, prunes_smaller)``."""
    last = None  # (setting, time, products, accuracy) of the costliest setting run
    failed: list[Any] = []
    for setting in ladder:
        if any(prune(setting, f) for f in failed):
            continue
        runs = []  # per seed: (time, products, accuracy)
        ok = True
        for seed in ACCURACY_SEEDS:
            out, dt = timed(partial(run, setting, seed * SEED_STRIDE))
            reached, acc, prunes = check(out)
            runs.append((dt, products(setting, out), acc))
            if not reached:
                ok = False
                if prunes:
                    failed.append(setting)
                break
        worst = {k: max(r[2][k] for r in runs) for k in runs[0][2]}
        say(
            f"    {rec.tool:20s} {rec.method:15s} {describe(setting):22s} {runs[0][0]:8.3f}s "
            f"{runs[0][1]:7.0f} products  "
            + "  ".join(f"{k} {v:.2e}" for k, v in worst.items())
            + ("  reached" if ok else f"  missed (seed {len(runs) - 1})")
        )
        last = (setting, runs[0][0], runs[0][1], worst)
        if ok:
            times = []
            for seed, r in zip(ACCURACY_SEEDS, runs, strict=True):
                ts = [r[0]]
                for _ in range(spec.repeats - 1 if r[0] < LONG_RUN_S else 0):
                    ts.append(timed(partial(run, setting, seed * SEED_STRIDE))[1])
                times.append(min(ts))
            rec.setting, rec.time_s = describe(setting), sum(times) / len(times)
            rec.num_matvecs = round(sum(r[1] for r in runs) / len(runs), 1)
            rec.accuracy, rec.reached = worst, True
            return rec
    rec.reached = False
    if last is not None:
        setting, dt, n, worst = last
        rec.setting, rec.time_s, rec.num_matvecs, rec.accuracy = describe(setting), dt, n, worst
        rec.lower_bound = True
        rec.note = (rec.note + "; " if rec.note else "") + (
            f"not reached within the cap; the costliest setting run ({describe(setting)}) is a lower bound"
        )
    return rec


# --------------------------------------------------------------------------- trace


def trace_methods(t: Any, model, x, y) -> list[tuple[str, Run]]:
    """(method, run(budget, seed) -> (estimate, stderr, products)) for each trace estimator of ``t``."""
    if isinstance(t, Ours):
        if t.batched is not None:
            return []
        return [(m, lambda b, s, m=m: t.trace(model, x, y, m, b, s)) for m in ("hutch++", "xtrace", "krylov-hutch++")]
    out: list[tuple[str, Run]] = [("hutchinson", lambda b, s: t.hutchinson(model, x, y, b, s))]
    if isinstance(t, Curvlinops | Eigenthings):
        out.append(("hutch++", lambda b, s: t.hutchpp(model, x, y, b, s)))
    if isinstance(t, Curvlinops):
        out.append(("xtrace", lambda b, s: t.xtrace(model, x, y, b, s)))
    return out


def run_trace(spec: ModelSpec, model, x, y, ref, tools) -> list[Record]:
    """Each trace estimator's smallest budget whose measured error is within 1% from every seed."""
    dim = sum(p.numel() for p in model.parameters())
    ladder = [b for b in TRACE_BUDGETS if b <= min(spec.trace_cap, dim - 1)]
    tr = ref["trace"]
    out = []
    for t in tools:
        for method, run in trace_methods(t, model, x, y):
            rec = Record(spec.name, "trace", t.name, method)
            try:

                def check(res):
                    err = rel(res[0], tr)
                    return err <= TRACE_TARGET, {"rel_err": err}, False

                out.append(_walk(spec, rec, ladder, run, check, lambda b, res: res[2], lambda b: f"{b} products"))
            except Exception as exc:
                rec.status = f"failed: {short_reason(exc)}"
                say(f"    {t.name:20s} {method:15s} FAILED {rec.status}")
                out.append(rec)
    return out


# --------------------------------------------------------------------------- density


def smoothed(nodes: list[torch.Tensor], weights: list[torch.Tensor], grid: torch.Tensor, sigma: float) -> torch.Tensor:
    dens = torch.zeros_like(grid)
    for v, w in zip(nodes, weights, strict=True):
        k = torch.exp(-0.5 * ((grid[:, None] - v[None].to(grid)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        dens += k @ w.to(grid)
    return dens / len(nodes)


def density_accuracy(nodes, weights, ref: dict[str, Any], dim: int, grid_info) -> dict[str, float]:
    """Errors of an SLQ estimate (per-run nodes and weights) against the exact references.

    ``moment1``/``moment2``: relative errors of ``tr H`` and ``tr H²`` (the quadrature's means
    times ``dim``); ``neg_mass``: absolute error of ``tr(H₋)/tr|H|`` (ratio of run means);
    ``density_l1``: L1 distance of the smoothed densities. Where the reference lacks the
    exact eigenvalues (models too wide for a dense Hessian) only ``moment1`` is measured.
    """
    per = [(w.double(), v.double()) for v, w in zip(nodes, weights, strict=True)]
    m1 = float(np.mean([float((w * v).sum()) for w, v in per]))
    acc = {"moment1": rel(m1 * dim, ref["trace"])}
    if "evals" not in ref:
        return acc
    m2 = float(np.mean([float((w * v**2).sum()) for w, v in per]))
    neg = float(np.mean([float((w * (-v).clamp_min(0)).sum()) for w, v in per]))
    tot = float(np.mean([float((w * v.abs()).sum()) for w, v in per]))
    grid, sigma, exact_density = grid_info
    diff = (smoothed(nodes, weights, grid, sigma) - exact_density).abs()
    acc["moment2"] = rel(m2 * dim, ref["fro2"])
    acc["neg_mass"] = abs(neg / max(tot, 1e-300) - ref["neg_mass"])
    acc["density_l1"] = float(torch.trapezoid(diff, grid))
    return acc


def density_methods(t: Any, model, x, y) -> list[tuple[str, Run]]:
    if isinstance(t, Ours):
        if t.batched is not None:
            return []
        return [
            ("slq", lambda rs, s: t.slq(model, x, y, *rs, s)),
            ("deflated slq", lambda rs, s: t.deflated_slq(model, x, y, *rs, s)),
        ]
    if isinstance(t, PyHessian | Curvlinops | Eigenthings):
        return [("slq", lambda rs, s: t.slq(model, x, y, *rs, s))]
    return []


def run_density(spec: ModelSpec, model, x, y, ref, tools) -> list[Record]:
    """Each SLQ's cheapest (runs, steps) meeting every density target from every seed."""
    dim = sum(p.numel() for p in model.parameters())
    ladder = [rs for rs in DENSITY_LADDER if rs[0] * rs[1] <= spec.density_cap and rs[1] < dim]
    grid_info = None
    if "evals" in ref:
        exact = ref["evals"]
        lo, hi = float(exact[0]), float(exact[-1])
        sigma = SIGMA_FRACTION * (hi - lo) / 2
        grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, 2000, dtype=torch.float64)
        grid_info = (grid, sigma, smoothed([exact], [torch.full_like(exact, 1 / len(exact))], grid, sigma))
    limits = {"moment1": MOMENT_TARGET, "moment2": MOMENT_TARGET, "neg_mass": NEG_MASS_TARGET}
    limits["density_l1"] = DENSITY_L1_TARGET

    def check(res):
        acc = density_accuracy(res[0], res[1], ref, dim, grid_info)
        moments_missed = any(acc.get(k, 0.0) > limits[k] for k in ("moment1", "moment2"))
        return all(v <= limits[k] for k, v in acc.items()), acc, moments_missed

    out = []
    for t in tools:
        for method, run in density_methods(t, model, x, y):
            rec = Record(spec.name, "density", t.name, method)
            if isinstance(t, PyHessian) and t.shim:
                rec.note = "torch.eig shimmed with torch.linalg.eigh (removed from PyTorch)"
            try:
                out.append(
                    _walk(
                        spec,
                        rec,
                        ladder,
                        run,
                        check,
                        lambda rs, res: res[2],
                        lambda rs: f"runs={rs[0]}, steps={rs[1]}",
                        prune=lambda rs, failed: rs[0] <= failed[0],
                    )
                )
            except Exception as exc:
                rec.status = f"failed: {short_reason(exc)}"
                say(f"    {t.name:20s} {method:15s} FAILED {rec.status}")
                out.append(rec)
    return out
