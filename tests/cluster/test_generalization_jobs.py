"""The generalization and noise probes (pacbayes, noise, critical) through specs, worker
groups and Parquet: one process and a 2-worker group agree, and the stored values equal
the probe functions run directly on the whole probe set."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compare import assert_close, by_task  # tests/cluster/compare.py
from safetensors.torch import load_file

from cluster.job import run_job
from cluster.spec import load_spec
from cluster.store import ResultStore
from cluster.worker import probe_subset
from probe.models import digits_mlp
from probe.noise import gradient_moments, noise_statistics

PROBES = [
    {"kind": "pacbayes", "samples": 8, "target": 0.05},
    {"kind": "noise", "batch_size": 32, "chunk_size": 16},
    {"kind": "critical", "runs": 4, "steps": 20},
]
COLUMNS = {
    "pacbayes": ["sigma", "expected_loss_increase", "kl"],  # the bound rests on 0-1 errors: see below
    "noise": ["grad_norm", "noise_trace", "noise_scale", "temperature"],
    "critical": ["grad_norm", "lambda_min", "lambda_max", "negative_mass"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoints):
    import yaml

    tmp = tmp_path_factory.mktemp("gen")
    out = {}
    for backend, workers in (("local", 1), ("process", 2)):
        spec = {
            "name": "generalization",
            "model": {
                "factory": "probe.models:digits_mlp",
                "kwargs": {"hidden": 16},
                "checkpoints": [str(p) for p in checkpoints],
            },
            "data": {"factory": "cluster.data:digits", "num_examples": 150, "batch_size": 40},
            "precision": "float64",
            "probes": PROBES,
            "cluster": {"num_workers": workers},
            "output": {"path": str(tmp / backend)},
            "seed": 5,
        }
        path = tmp / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(spec))
        summary = run_job(load_spec(path), backend=backend, progress=lambda m: None)
        assert summary.num_done == 6 and summary.num_failed == 0, summary.failures
        out[backend] = (load_spec(path), ResultStore(tmp / backend))
    return out


def test_two_workers_agree_with_one_process(runs):
    (_, one), (_, two) = runs["local"], runs["process"]
    for kind, cols in COLUMNS.items():
        assert set(two.read(kind).column("world_size").to_pylist()) == {2}
        assert_close(by_task(two.read(kind), cols), by_task(one.read(kind), cols), 1e-9)
        assert [r["label"] for r in two.read("critical").to_pylist()] == [
            r["label"] for r in one.read("critical").to_pylist()
        ]
    # 0-1 errors at perturbed points are discontinuous (a near-tie argmax may flip with the shards' summation
    # order): the posterior error may differ by a few flips out of n × samples, not more
    flip = 1 / (150 * 8)
    errs = by_task(two.read("pacbayes"), ["expected_error"]), by_task(one.read("pacbayes"), ["expected_error"])
    for key in errs[1]:
        assert abs(errs[0][key]["expected_error"] - errs[1][key]["expected_error"]) <= 3 * flip


def test_noise_rows_equal_the_probe_function_on_the_whole_probe_set(runs, checkpoints):
    spec, store = runs["process"]
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 40].tolist()])
        for j in range(0, len(indices), 40)
    ]
    for path in checkpoints:
        model = digits_mlp(hidden=16)
        model.load_state_dict(load_file(str(path)))
        direct = noise_statistics(gradient_moments(model.double(), F.cross_entropy, batches), lr=0.1, batch_size=32)
        (row,) = [r for r in store.read("noise").to_pylist() if r["checkpoint"] == str(path)]
        assert row["lr"] == 0.1 and row["lr_source"] == "metadata" and row["batch_size_source"] == "spec"
        for col in ("grad_norm", "noise_trace", "noise_scale", "temperature", "sgd_regularizer"):
            assert row[col] == pytest.approx(getattr(direct, col), rel=1e-10), col
        assert row["temperature"] == pytest.approx(0.1 / 64, rel=1e-15)
        assert row["method"] == "linear"  # an all-Linear MLP: the layer identity


def test_pacbayes_and_critical_rows_state_their_conventions(runs):
    _, store = runs["local"]
    for r in store.read("pacbayes").to_pylist():
        assert r["variant"] == "isotropic" and r["samples"] == 8 and r["target"] == 0.05
        assert 0 < r["sigma"] and r["expected_loss_increase"] <= 0.05
        assert r["expected_error"] <= r["bound"] <= 1 and "posterior's std" in r["prior"]
        assert json.loads(r["probe_config"])["delta"] == 0.05
    for r in store.read("critical").to_pylist():
        assert r["label"] in ("near_minimum", "saddle", "not_critical")
        assert r["grad_norm_threshold"] == 1e-3 and r["negative_mass_threshold"] == 0.01 and "saddle if" in r["rule"]
        # the checkpoints are untrained initializations: the gradient is far from zero
        assert r["grad_norm"] > 1e-2 and r["label"] == "not_critical"


def test_noise_without_batch_size_says_how_to_give_it(tmp_path, checkpoints, make_spec):
    spec = load_spec(make_spec(name="nobatch", probes=[{"kind": "noise"}]))
    run_job(spec, backend="local", progress=lambda m: None)
    row = ResultStore(spec.output.path).read("noise").to_pylist()[0]
    assert row["temperature"] is None and row["lr"] == 0.1 and row["batch_size"] is None
    assert "set probes[noise].batch_size or save 'batch_size' in the checkpoint's metadata" in row["note"]


def test_noise_without_chunk_size_uses_and_records_the_default_chunk(tmp_path, make_spec):
    """No probes[noise].chunk_size: probe.noise.default_chunk_size() (lowered on CPU), not a fixed 64."""
    from safetensors.torch import save_file

    from probe.models import digits_cnn
    from probe.noise import default_chunk_size
    from probe.params import ParameterSpace

    torch.manual_seed(0)
    model = digits_cnn(channels=96)  # a Conv2d: per-example gradients by vmap, in chunks
    path = tmp_path / "cnn.safetensors"
    save_file(model.state_dict(), str(path), metadata={"lr": "0.1"})
    want = default_chunk_size(ParameterSpace.of(model), torch.float64, "cpu")
    assert want != 64  # the 96×96×3×3 kernel's per-example block (0.66 MB in float64) lowers it on CPU
    spec = load_spec(
        make_spec(
            name="chunks",
            probes=[{"kind": "noise", "batch_size": 16}],
            num_examples=64,
            model={"factory": "probe.models:digits_cnn", "kwargs": {"channels": 96}, "checkpoints": [str(path)]},
        )
    )
    summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_done == 1, summary.failures
    (row,) = ResultStore(spec.output.path).read("noise").to_pylist()
    assert row["method"] == "vmap" and row["chunk_size"] == want
    assert json.loads(row["probe_config"])["chunk_size"] is None
    # the statistics do not depend on the chunking
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 50].tolist()])
        for j in range(0, len(indices), 50)
    ]
    direct = gradient_moments(model.double(), F.cross_entropy, batches, chunk_size=64)
    assert row["noise_trace"] == pytest.approx(noise_statistics(direct).noise_trace, rel=1e-9)
