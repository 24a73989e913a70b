"""The operator's symmetry defect through jobs: the ``symmetry_check`` option (null: on for float64),
the ``symmetry_defect`` column of every Hessian kind, its two products in ``num_matvecs``, and the
note a model computing partly in float32 gets."""

from __future__ import annotations

import dataclasses
import warnings

import pyarrow.dataset as ds
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cluster.job import run_job
from cluster.spec import SpecError, load_spec
from cluster.worker import probe_subset, task_seed
from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.symmetry import SymmetryWarning
from probe.trace import trace

LIGHT = [{"kind": "eigenvalues", "k": 2}, {"kind": "trace", "matvecs": 12}]


def rows(root, kind) -> list[dict]:
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table().to_pylist()


class _Float32Tanh(nn.Module):
    """tanh computed in float32 whatever the input's dtype, as Hugging Face's RMSNorm and rotary
    embeddings compute in float32 inside a float64 model."""

    def forward(self, x):
        return torch.tanh(x.float()).to(x.dtype)


def float32_inside_mlp(**kwargs) -> nn.Module:
    """digits_mlp (same state dict) whose activations compute in float32."""
    model = digits_mlp(**kwargs)
    return nn.Sequential(*[_Float32Tanh() if isinstance(m, nn.Tanh) else m for m in model])


def test_a_float64_job_records_a_small_defect_and_counts_its_two_products(make_spec, checkpoints, tmp_path):
    spec = load_spec(make_spec(probes=LIGHT))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SymmetryWarning)
        summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_done == 2 and summary.num_failed == 0
    (eig_row,) = rows(tmp_path / "results", "eigenvalues")
    (trace_row,) = rows(tmp_path / "results", "trace")
    for r in (eig_row, trace_row):
        assert r["symmetry_defect"] is not None and 0 <= r["symmetry_defect"] <= 1e-12  # measured ~1e-15
    assert eig_row["note"] == ""

    # the estimates are those of the estimators run directly (the check draws from its own stream),
    # and num_matvecs holds the estimator's products plus the check's two
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 50].tolist()])
        for j in range(0, len(indices), 50)
    ]
    model = digits_mlp(hidden=16)
    model.load_state_dict(load_file(str(checkpoints[0])))
    op = HessianOperator(model.to(torch.float64), F.cross_entropy, batches)
    eig = eigenvalues(op, 2, generator=torch.Generator().manual_seed(task_seed(7, 0)))
    tr = trace(op, num_matvecs=12, generator=torch.Generator().manual_seed(task_seed(7, 1)))
    assert eig_row["eigenvalues"] == eig.eigenvalues.tolist() and eig_row["num_matvecs"] == eig.num_matvecs + 2
    assert trace_row["trace"] == tr.trace and trace_row["num_matvecs"] == tr.num_matvecs + 2


def test_a_float32_job_measures_nothing_by_default_and_measures_when_asked(make_spec, tmp_path):
    spec = load_spec(make_spec(probes=LIGHT, output=tmp_path / "default"), ["precision=float32"])
    run_job(spec, backend="local", progress=lambda m: None)
    for kind in ("eigenvalues", "trace"):
        got = rows(tmp_path / "default", kind)
        assert len(got) == 2 and all(r["symmetry_defect"] is None for r in got)

    forced = [{**p, "symmetry_check": True} for p in LIGHT]
    spec = load_spec(make_spec(probes=forced, output=tmp_path / "forced"), ["precision=float32"])
    run_job(spec, backend="local", progress=lambda m: None)
    default_eig = {r["checkpoint"]: r for r in rows(tmp_path / "default", "eigenvalues")}
    for r in rows(tmp_path / "forced", "eigenvalues"):
        assert 1e-10 < r["symmetry_defect"] < 1e-4  # float32 rounding (measured ~1e-7); no warning level
        assert r["note"] == ""
        assert r["num_matvecs"] == default_eig[r["checkpoint"]]["num_matvecs"] + 2
        assert r["eigenvalues"] == default_eig[r["checkpoint"]]["eigenvalues"]  # the estimate is unchanged
        assert r["task_key"] != default_eig[r["checkpoint"]]["task_key"]  # the option is part of the key


def test_every_hessian_kind_records_the_defect_in_every_row(make_spec, tmp_path):
    probes = [
        {"kind": "spectrum", "runs": 2, "steps": 10},
        {"kind": "sharpness", "measures": ["keskar", "lambda_max"], "steps": 2},
        {"kind": "sharpness", "measures": ["keskar"], "steps": 2},
        {"kind": "eos"},
        {"kind": "critical", "runs": 2, "steps": 10},
    ]
    spec = load_spec(make_spec(probes=probes))
    summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_failed == 0
    out = tmp_path / "results"
    for kind in ("spectrum", "eos", "critical"):
        got = rows(out, kind)
        assert len(got) == 2 and all(0 <= r["symmetry_defect"] <= 1e-12 for r in got), kind
    eos = sorted(rows(out, "eos"), key=lambda r: r["step"])
    assert eos[0]["symmetry_defect"] == eos[1]["symmetry_defect"]  # once per task, in every row
    sharp = rows(out, "sharpness")
    with_hessian = [r for r in sharp if "lambda_max" in r["probe_config"]]
    without = [r for r in sharp if r not in with_hessian]
    assert len(with_hessian) == 4 and all(0 <= r["symmetry_defect"] <= 1e-12 for r in with_hessian)
    assert len(without) == 2 and all(r["symmetry_defect"] is None for r in without)  # no Hessian, no check
    keskar = [r for r in with_hessian if r["measure"] == "keskar"]
    assert all(r["num_matvecs"] == 0 for r in keskar)  # the two products are counted on the lambda_max row


def test_a_model_computing_in_float32_inside_a_float64_job_warns_and_notes_it(make_spec, tmp_path):
    path = make_spec(probes=[{"kind": "eigenvalues", "k": 2}, {"kind": "trace", "matvecs": 12}])
    spec = load_spec(path, [f"model.factory={__name__}:float32_inside_mlp"])
    with pytest.warns(SymmetryWarning, match=r"operator symmetric only to .* \(float64 rounding 1\.1e-16\)"):
        summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_failed == 0
    for r in rows(tmp_path / "results", "eigenvalues"):
        assert r["symmetry_defect"] > 1e-10  # float32 level
        assert "parts of the model compute in lower precision" in r["note"]
        assert f"{r['symmetry_defect']:.1e}" in r["note"]
    assert all(r["symmetry_defect"] > 1e-10 for r in rows(tmp_path / "results", "trace"))


@pytest.mark.usefixtures("single_thread_children")
def test_a_sharded_job_measures_the_same_small_defect(make_spec, tmp_path):
    spec = load_spec(make_spec(probes=LIGHT, cluster={"num_workers": 2}))
    summary = run_job(spec, backend="process", progress=lambda m: None)
    assert summary.num_failed == 0
    for kind in ("eigenvalues", "trace"):
        got = rows(tmp_path / "results", kind)
        assert len(got) == 2 and all(r["world_size"] == 2 for r in got)
        assert all(0 <= r["symmetry_defect"] <= 1e-12 for r in got)


@pytest.fixture
def single_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


@pytest.mark.parametrize("value", ["yes", 1])
def test_symmetry_check_must_be_true_false_or_null(make_spec, value):
    with pytest.raises(SpecError, match=r"probes\[trace\]\.symmetry_check must be true, false or null"):
        load_spec(make_spec(probes=[{"kind": "trace", "symmetry_check": value}]))
