"""Non-finite results are failures (cluster.runners.check_headlines, with each kind's
Headline.finite): a task whose record holds
a NaN or infinite headline quantity stores no row and records a failure with a clear reason."""

from __future__ import annotations

import dataclasses
import re

import pytest

from cluster.errors import NonFiniteError
from cluster.job import run_job
from cluster.kinds import KINDS
from cluster.metrics import Metrics
from cluster.runners import check_headlines
from cluster.spec import load_spec
from cluster.store import ResultStore

NAN, INF = float("nan"), float("inf")


def test_every_kind_declares_its_headline_quantities():
    assert all(k.run is not None for k in KINDS.values())
    for name, k in KINDS.items():  # each headline quantity is one of the kind's columns
        assert set(k.headline.finite) <= set(k.column_names), name
    assert {n: KINDS[n].headline.finite for n in ("eigenvalues", "trace", "eos", "barrier", "surface")} == {
        "eigenvalues": ("eigenvalues",),
        "trace": ("trace",),
        "eos": ("lambda_max", "ratio"),
        "barrier": ("loss_a", "loss_b"),
        "surface": (),
    }


@pytest.mark.parametrize(
    "kind, record, message",
    [
        (
            "eigenvalues",
            {"eigenvalues": [2.0, NAN]},
            "non-finite result: eigenvalues eigenvalues[1] is nan at checkpoint 'c.pt'",
        ),
        ("trace", {"trace": INF}, "non-finite result: trace trace is inf at checkpoint 'c.pt'"),
        (
            "sharpness",
            {
                "rows": [
                    {"measure": "keskar", "value": 0.1, "base_loss": 1.0},
                    {"measure": "lambda_max", "value": NAN, "base_loss": NAN},
                ]
            },
            "non-finite result: sharpness value (measure lambda_max) is nan at checkpoint 'c.pt'",
        ),
        (
            "eos",
            {
                "rows": [
                    {"checkpoint": "a.pt", "lambda_max": 1.0, "ratio": 0.5},
                    {"checkpoint": "b.pt", "lambda_max": -INF, "ratio": 0.5},
                ]
            },
            "non-finite result: eos lambda_max is -inf at checkpoint 'b.pt'",
        ),
        (
            "barrier",
            {"rows": [{"path": "linear", "eval_set": "test", "loss_a": NAN, "loss_b": 1.0}]},
            "non-finite result: barrier loss_a (path linear, eval_set test) is nan at checkpoint 'c.pt'",
        ),
    ],
)
def test_a_non_finite_headline_names_the_kind_quantity_and_checkpoint(kind, record, message):
    with pytest.raises(NonFiniteError, match="^" + re.escape(message)) as info:
        check_headlines(kind, record, "c.pt")
    assert info.value.category == "non_finite" and "no row is stored" in str(info.value)


def test_finite_records_and_quantities_allowed_to_be_non_finite_pass():
    check_headlines("eigenvalues", {"eigenvalues": [3.0, -1.0]}, "c.pt")
    check_headlines("noise", {"grad_norm": 1.0, "noise_trace": 2.0, "loss": 0.5, "noise_scale": None}, "c.pt")
    # losses along a path and a surface grid report their NaNs in num_nonfinite: the rows are kept
    check_headlines(
        "barrier", {"rows": [{"loss_a": 1.0, "loss_b": 1.0, "barrier_height": INF, "loss": [1.0, NAN]}]}, "c.pt"
    )
    check_headlines("surface", {"loss": [NAN, 1.0], "num_nonfinite": 1}, "c.pt")
    check_headlines("sharpness", {"rows": [{"measure": "lambda_max", "value": 2.0, "base_loss": NAN}]}, "c.pt")
    check_headlines("critical", {"grad_norm": 1.0, "lambda_min": -1.0, "lambda_max": 2.0, "negative_mass": NAN}, "c.pt")


def test_a_nan_hessian_at_a_finite_loss_fails_its_tasks_and_stores_no_row(make_spec, checkpoints):
    """faulty_loss:nan_curvature is finite at every point but its gradient and Hessian products are NaN:
    eos (whose Lanczos failure becomes a note) and noise used to store rows of NaN as successes, never
    retried. (eigenvalues, trace, critical fail on such products inside LAPACK or torch already.)"""
    spec = load_spec(
        make_spec(
            name="nanhess",
            loss={"factory": "faulty_loss:nan_curvature"},
            num_examples=64,
            probes=[{"kind": "eos"}, {"kind": "noise"}],
        )
    )
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    metrics, lines = Metrics(), []
    summary = run_job(spec, backend="local", progress=lines.append, metrics=metrics)
    assert (summary.num_done, summary.num_failed) == (0, 2), summary.failures
    store = ResultStore(spec.output.path)
    for kind in ("eos", "noise"):
        assert store.read(kind).num_rows == 0, kind
    failures = store.read("failures").to_pylist()
    assert sorted(f["kind"] for f in failures) == ["eos", "noise"]
    want = {"eos": "eos lambda_max is nan", "noise": "noise grad_norm is nan"}
    for f in failures:
        assert f["reason"].startswith(f"non-finite result: {want[f['kind']]} at checkpoint {str(checkpoints[0])!r}")
        assert f["category"] == "non_finite"
    failures = {"job_name": "nanhess", "reason": "non_finite"}
    assert metrics.registry.get_sample_value("landscape_probe_failures_total", failures) == 2
    assert any("FAILED eos" in line and "non-finite result" in line for line in lines)
    # nothing stored: a second run tries every task again
    again = run_job(spec, backend="local", progress=lambda m: None)
    assert (again.num_skipped, again.num_failed) == (0, 2)
    assert store.read("failures").num_rows == 4
