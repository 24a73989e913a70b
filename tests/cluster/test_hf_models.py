"""Hugging Face checkpoints without a factory: ``model: {hf: FOLDER}`` through ``probe run``.

Each family's tiny random model is saved by ``save_pretrained`` as sharded float64
safetensors (a tied embedding/head pair written once, as transformers writes it) and
probed by ``probe run`` on two worker processes; λ_max, λ_min and a Hutch++ trace
equal those of the independent dense Hessian of :mod:`hf_files` (transformers' own
loading and loss, ``jacfwd(grad)``), within the operator's measured symmetry defect.
"""

from __future__ import annotations

import json
import math

import pyarrow.dataset as ds
import pytest
import torch
import yaml

import hf_files
from cluster.cli import main
from cluster.worker import task_seed
from probe.operators import DenseOperator
from probe.trace import trace


TRACE_MATVECS = 30


def read(root, kind):
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table().to_pylist()


def write_spec(tmp_path, family: str, *, workers: int = 2, probes=None, extra=None) -> tuple:
    model_dir = tmp_path / family
    model = hf_files.write_model(family, model_dir)
    tokens = hf_files.write_tokens(tmp_path / "tokens.parquet")
    raw = {
        "name": f"hf-{family.replace('_', '-')}",
        "model": {"hf": str(model_dir)},
        "data": {"factory": "cluster.data:token_windows",
                 "kwargs": {"path": str(tokens), "window": hf_files.WINDOW, "count": hf_files.WINDOWS},
                 "num_examples": hf_files.WINDOWS, "batch_size": 4},
        "loss": hf_files.FAMILIES[family][3],
        "probes": probes or [
            {"kind": "eigenvalues", "k": 1, "which": "largest", "tol": 1e-10},
            {"kind": "eigenvalues", "k": 1, "which": "smallest", "tol": 1e-10},
            {"kind": "trace", "method": "hutch++", "matvecs": TRACE_MATVECS},
        ],
        "cluster": {"num_workers": workers, "backend": "process"},
        "output": {"path": str(tmp_path / "results")},
        **(extra or {}),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, model, model_dir, tokens


@pytest.mark.parametrize("family", list(hf_files.FAMILIES))
def test_probe_run_on_a_saved_hf_model_equals_its_dense_hessian(tmp_path, family):
    spec_path, model, model_dir, tokens = write_spec(tmp_path, family)
    assert not any(k.startswith("lm_head") for k in json.loads(
        (model_dir / "model.safetensors.index.json").read_text())["weight_map"]) or family == "llama_untied"
    assert main(["run", str(spec_path)]) == 0

    H, dim = hf_files.dense_hessian(model_dir, hf_files.all_windows(tokens))
    evals = torch.linalg.eigvalsh((H + H.T) / 2)
    scale = evals.abs().max().item()
    eig = read(tmp_path / "results", "eigenvalues")
    tr = read(tmp_path / "results", "trace")[0]
    assert len(eig) == 2
    for row in eig + [tr]:
        assert row["num_parameters"] == dim == sum(p.numel() for p in model.parameters())  # tied counted once
        assert row["dtype"] == "float64" and row["world_size"] == 2
        assert row["checkpoint_name"] == family if "checkpoint_name" in row else True
        assert row["attention"] == "sdpa (math kernel)"
        assert row["model_factory"] == f"hf:{model_dir}"
    defect = max(r.get("symmetry_defect") or 0.0 for r in eig + [tr])
    # the floor: float64 rounding, or the operator's own asymmetry (RMSNorm and rotary in float32)
    tol = max(100 * defect, 1e-9)
    top = next(r for r in eig if r["which"] == "largest")["eigenvalues"][0]
    low = next(r for r in eig if r["which"] == "smallest")["eigenvalues"][0]
    assert abs(top - evals[-1].item()) <= tol * scale, (top, evals[-1].item(), defect)
    assert abs(low - evals[0].item()) <= tol * scale, (low, evals[0].item(), defect)
    # the same Hutch++ estimator on the dense matrix, with the job's random vectors
    g = torch.Generator().manual_seed(task_seed(0, 2))
    expected = trace(DenseOperator(H, symmetry_tol=1e-5), method="hutch++", num_matvecs=TRACE_MATVECS, generator=g).trace
    assert math.isclose(tr["trace"], expected, rel_tol=0, abs_tol=tol * scale * 10), (tr["trace"], expected)
