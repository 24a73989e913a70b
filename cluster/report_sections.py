"""One HTML section per probe kind of the report, plus the runs table and the failed tasks."""

from __future__ import annotations

import math
from functools import partial

from cluster.records import floats
from cluster.report_data import run_failures as _run_failures
from cluster.report_html import (
    _barrier_png,
    _by,
    _cell,
    _ckpt,
    _ckpt_name,
    _code,
    _e,
    _eos_png,
    _Figures,
    _label,
    _num,
    _pm,
    _Raw,
    _spectrum_png,
    _surface_png,
    _table,
    _time,
    _values,
)


def _section_eigenvalues(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "which", "eigenvalues", "residuals", "converged", "matvecs", "note", "options"],
        [
            [
                r["job"],
                _cell(r),
                r.get("which"),
                _values(r.get("eigenvalues")),
                _values(r.get("residuals")),
                r.get("converged"),
                r.get("num_matvecs"),
                r.get("note") or "",
                _code(r.get("probe_config")),
            ]
            for r in rows
        ],
        numeric=[6],
    )


def _section_trace(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "method", "trace ± stderr", "matvecs", "options"],
        [
            [
                r["job"],
                _cell(r),
                r.get("method"),
                _pm(r.get("trace"), r.get("trace_stderr")),
                r.get("num_matvecs"),
                _code(r.get("probe_config")),
            ]
            for r in rows
        ],
        numeric=[3, 4],
    )


def _section_sharpness(rows, _figs) -> str:
    return _table(
        [
            "job",
            "checkpoint",
            "measure",
            "value ± stderr",
            "base loss",
            "perturbed loss",
            "parameters",
            "evaluations",
            "matvecs",
            "note",
        ],
        [
            [
                r["job"],
                _cell(r),
                r.get("measure"),
                _pm(r.get("value"), r.get("stderr")),
                _num(r.get("base_loss")),
                _num(r.get("perturbed_loss")),
                _code(r.get("params")),
                r.get("num_evaluations"),
                r.get("num_matvecs"),
                r.get("note") or "",
            ]
            for r in rows
        ],
        numeric=[3, 4, 5, 7, 8],
    )


def _section_pacbayes(rows, _figs) -> str:
    return _table(
        [
            "job",
            "checkpoint",
            "variant",
            "σ* ± stderr",
            "target",
            "E ΔL ± stderr",
            "E error",
            "KL",
            "prior",
            "δ",
            "bound (kl⁻¹)",
            "bound (√)",
            "note",
        ],
        [
            [
                r["job"],
                _cell(r),
                r.get("variant"),
                _pm(r.get("sigma"), r.get("sigma_stderr")),
                _num(r.get("target")),
                _pm(r.get("expected_loss_increase"), r.get("expected_loss_increase_stderr")),
                _pm(r.get("expected_error"), r.get("expected_error_stderr")),
                _num(r.get("kl")),
                r.get("prior") or "",
                _num(r.get("delta")),
                _num(r.get("bound")),
                _num(r.get("bound_sqrt")),
                r.get("note") or "",
            ]
            for r in rows
        ],
        numeric=[3, 4, 5, 6, 7, 9, 10, 11],
    )


def _section_noise(rows, _figs) -> str:
    return _table(
        [
            "job",
            "checkpoint",
            "‖∇L‖",
            "tr(Σ)",
            "noise scale",
            "η",
            "B",
            "temperature η/2B",
            "(η/4)‖∇L‖²",
            "(η/4B) tr(Σ)",
            "note",
        ],
        [
            [
                r["job"],
                _cell(r),
                _num(r.get("grad_norm")),
                _num(r.get("noise_trace")),
                _num(r.get("noise_scale")),
                _num(r.get("lr")),
                r.get("batch_size"),
                _num(r.get("temperature")),
                _num(r.get("gd_regularizer")),
                _num(r.get("sgd_regularizer")),
                r.get("note") or "",
            ]
            for r in rows
        ],
        numeric=[2, 3, 4, 5, 6, 7, 8, 9],
    )


def _section_critical(rows, _figs) -> str:
    return _table(
        [
            "job",
            "checkpoint",
            "label",
            "‖∇L‖ (threshold)",
            "λ_min",
            "λ_max",
            "negative mass ± stderr (threshold)",
            "matvecs",
            "rule",
        ],
        [
            [
                r["job"],
                _cell(r),
                r.get("label"),
                f"{_num(r.get('grad_norm'))} ({_num(r.get('grad_norm_threshold'))})",
                _num(r.get("lambda_min")),
                _num(r.get("lambda_max")),
                f"{_pm(r.get('negative_mass'), r.get('negative_mass_stderr'))} "
                f"({_num(r.get('negative_mass_threshold'))})",
                r.get("num_matvecs"),
                r.get("rule") or "",
            ]
            for r in rows
        ],
        numeric=[3, 4, 5, 6, 7],
    )


def _section_spectrum(rows, figs: _Figures) -> str:
    table = _table(
        ["job", "checkpoint", "runs", "σ", "λ_min (Ritz)", "λ_max (Ritz)", "negative mass", "reorth", "matvecs"],
        [
            [
                r["job"],
                _cell(r),
                len(r.get("ritz_values") or []),
                _num(r.get("sigma"), ".3g"),
                _num(r.get("lambda_min")),
                _num(r.get("lambda_max")),
                _pm(r.get("negative_mass"), r.get("negative_mass_stderr")),
                r.get("reorth"),
                r.get("num_matvecs"),
            ]
            for r in rows
        ],
        numeric=[2, 3, 4, 5, 6, 8],
    )
    parts = [table]
    for r in rows:
        title = f"{r['job']} · {_label(r)}: SLQ density, σ={_num(r.get('sigma'), '.3g')}"
        parts.append(figs.add("spectrum", (r["job"], r["checkpoint"]), title, partial(_spectrum_png, r, title)))
    return "".join(parts)


def _section_barrier(rows, figs: _Figures) -> str:
    table = _table(
        [
            "job",
            "path",
            "eval set",
            "endpoint a",
            "endpoint b",
            "loss a",
            "loss b",
            "barrier height",
            "above line",
            "non-finite",
            "bend steps",
        ],
        [
            [
                r["job"],
                r.get("path"),
                r.get("eval_set"),
                _ckpt(r.get("endpoint_a")),
                _ckpt(r.get("endpoint_b")),
                _num(r.get("loss_a")),
                _num(r.get("loss_b")),
                _num(r.get("barrier_height")),
                _num(r.get("barrier_above_line")),
                r.get("num_nonfinite"),
                r.get("train_steps"),
            ]
            for r in rows
        ],
        numeric=[5, 6, 7, 8, 9, 10],
    )
    parts = [table]
    for (job, _key), group in _by(rows, "job", "task_key").items():
        a, b = group[0].get("endpoint_a"), group[0].get("endpoint_b")
        title = f"{job}: {_ckpt_name(a)} → {_ckpt_name(b)}"
        parts.append(figs.add("barrier", (job, b), title, partial(_barrier_png, group, title)))
    return "".join(parts)


def _section_surface(rows, figs: _Figures) -> str:
    def min_loss(r):
        finite = [x for x in floats(r.get("loss")) if math.isfinite(x)]
        return min(finite) if finite else None

    table = _table(
        ["job", "checkpoint", "dims", "directions", "normalization", "grid points", "min loss", "non-finite", "note"],
        [
            [
                r["job"],
                _cell(r),
                r.get("dims"),
                r.get("directions"),
                r.get("normalization"),
                len(r.get("loss") or []),
                _num(min_loss(r)),
                r.get("num_nonfinite"),
                r.get("note") or "",
            ]
            for r in rows
        ],
        numeric=[2, 5, 6, 7],
    )
    parts = [table]
    for r in rows:
        dims = 2 if r.get("beta") else 1
        title = (
            f"{r['job']} · {_label(r)}: {dims}-D surface, {r.get('directions')} directions, "
            f"{r.get('normalization')} normalization"
        )
        parts.append(
            figs.add("surface", (r["job"], r["checkpoint"], f"{dims}d"), title, partial(_surface_png, r, title))
        )
    return "".join(parts)


def _section_eos(rows, figs: _Figures) -> str:
    table = _table(
        ["job", "checkpoint", "step", "lr", "lr from", "optimizer", "λ_max", "threshold", "ratio", "converged", "note"],
        [
            [
                r["job"],
                _cell(r),
                r.get("step"),
                _num(r.get("lr")),
                r.get("lr_source"),
                r.get("optimizer"),
                _num(r.get("lambda_max")),
                _num(r.get("threshold")),
                _num(r.get("ratio"), ".3f"),
                r.get("converged"),
                r.get("note") or "",
            ]
            for r in rows
        ],
        numeric=[2, 3, 6, 7, 8],
    )
    parts = [table]
    for (job, optimizer, _momentum), group in _by(rows, "job", "optimizer", "momentum").items():
        latest: dict = {}  # one point per checkpoint content: the newest (audits re-run series)
        for r in sorted(group, key=lambda r: str(r.get("created_at"))):
            latest[r.get("checkpoint_sha256")] = r
        series = sorted(latest.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))
        title = f"{job}: edge of stability ({optimizer}, {len(series)} checkpoints)"
        parts.append(figs.add("eos", (job, optimizer), title, partial(_eos_png, series, title)))
    return "".join(parts)


_SECTIONS = {
    "eigenvalues": ("Top and bottom eigenvalues", _section_eigenvalues),
    "trace": ("Hessian trace", _section_trace),
    "sharpness": ("Sharpness", _section_sharpness),
    "spectrum": ("Spectral density (SLQ)", _section_spectrum),
    "barrier": ("Interpolation barriers", _section_barrier),
    "surface": ("Loss surfaces", _section_surface),
    "eos": ("Edge of stability", _section_eos),
    "pacbayes": ("PAC-Bayes flatness and bound", _section_pacbayes),
    "noise": ("Gradient noise", _section_noise),
    "critical": ("Critical points", _section_critical),
}


def _runs_section(runs: list[dict]) -> str:
    def summary(r) -> str:
        items = _run_failures(r)
        if not items:
            return ""
        first = items[0]
        reason = str(first.get("reason", ""))
        more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
        return f"{len(items)}: {first.get('kind') or 'job'}: {reason[:160]}{'…' if len(reason) > 160 else ''}{more}"

    def status(s) -> _Raw:
        return _Raw(f'<span class="{"ok" if s == "succeeded" else "bad"}">{_e(s)}</span>')

    rows = sorted(runs, key=lambda r: (str(r.get("job")), str(r.get("started_at"))))
    return _table(
        [
            "job",
            "run_id",
            "status",
            "started",
            "finished",
            "tasks",
            "done",
            "skipped",
            "failed",
            "restarts",
            "failures",
        ],
        [
            [
                r["job"],
                _code(r.get("run_id")),
                status(r.get("status")),
                _time(r.get("started_at")),
                _time(r.get("finished_at")),
                r.get("num_tasks"),
                r.get("num_done"),
                r.get("num_skipped"),
                r.get("num_failed"),
                r.get("restarts"),
                summary(r),
            ]
            for r in rows
        ],
        numeric=[5, 6, 7, 8, 9],
    )


def _failures_section(failures: list[dict]) -> str:
    if not failures:
        return "<p class=ok>No failed tasks.</p>"
    return _table(
        ["job", "kind", "checkpoint", "category", "reason", "run_id", "from"],
        [
            [
                f.get("job"),
                f.get("kind") or "—",
                _ckpt(f.get("checkpoint")),
                f.get("category") or "",
                f.get("reason"),
                _code(f.get("run_id")),
                f.get("source"),
            ]
            for f in failures
        ],
    )
