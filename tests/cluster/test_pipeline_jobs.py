"""Pipeline-split models through specs and worker groups: a sharded GPT checkpoint, cluster.stages,
stage × data grids, token weighting; results equal the single-process job."""

from __future__ import annotations

import pytest
import torch
import yaml
from compare import assert_close, by_task  # tests/cluster/compare.py

from cluster.checkpoints import save_sharded
from cluster.job import run_job
from cluster.spec import SpecError, load_spec
from cluster.store import ResultStore
from probe.gpt import gpt

MODEL = {"vocab": 16, "dim": 8, "layers": 3, "heads": 2, "max_len": 8}
PROBES = [
    {"kind": "eigenvalues", "k": 1, "tol": 1e-4},
    {"kind": "trace", "matvecs": 6},
    {"kind": "spectrum", "runs": 2, "steps": 6},
]
COLUMNS = {
    "eigenvalues": ["eigenvalues"],
    "trace": ["trace", "trace_stderr"],
    "spectrum": ["ritz_values", "ritz_weights"],
}


@pytest.fixture(scope="module")
def sharded_gpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    index = save_sharded(gpt(**MODEL).double().state_dict(), folder, max_shard_bytes=4000)
    return index


def spec_file(tmp_path, index, name: str, cluster: dict, probes=PROBES):
    spec = {
        "name": name,
        "model": {"factory": "probe.gpt:gpt", "kwargs": MODEL, "checkpoints": [str(index)]},
        "data": {
            "factory": "cluster.data:tokens",
            "kwargs": {"num_sequences": 24, "seq_len": 8, "vocab": 16, "min_len": 5},
            "num_examples": 18,
            "batch_size": 6,
        },
        "loss": "lm_cross_entropy",
        "precision": "float64",
        "probes": probes,
        "cluster": cluster,
        "output": {"path": str(tmp_path / name)},
        "seed": 2,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


@pytest.fixture(scope="module")
def single(tmp_path_factory, sharded_gpt):
    tmp = tmp_path_factory.mktemp("single")
    summary = run_job(spec_file(tmp, sharded_gpt, "single", {}), backend="local", progress=lambda m: None)
    assert summary.num_done == 3, summary.failures
    return ResultStore(tmp / "single")


@pytest.mark.parametrize("workers, stages", [(2, 2), (4, 2)])  # 3 stages: tests/cluster/test_pipeline.py
def test_pipeline_job_equals_the_single_process_job(tmp_path, sharded_gpt, single, workers, stages):
    spec = spec_file(tmp_path, sharded_gpt, "piped", {"num_workers": workers, "stages": stages})
    summary = run_job(spec, backend="process", progress=lambda m: None)
    assert summary.num_done == 3 and summary.num_failed == 0, summary.failures
    got = ResultStore(tmp_path / "piped")
    for kind, cols in COLUMNS.items():
        assert set(got.read(kind).column("world_size").to_pylist()) == {workers}
        assert_close(by_task(got.read(kind), cols), by_task(single.read(kind), cols), 1e-9)


def test_pipeline_specs_refuse_what_needs_the_whole_model(tmp_path, sharded_gpt):
    with pytest.raises(
        SpecError, match=r"probes\[sharpness\] needs the whole model on every worker; with cluster.stages=2"
    ):
        spec_file(tmp_path, sharded_gpt, "bad", {"num_workers": 2, "stages": 2}, probes=[{"kind": "sharpness"}])
    with pytest.raises(SpecError, match=r"cluster.stages=2 must divide the workers of a group \(3\)"):
        spec_file(tmp_path, sharded_gpt, "bad", {"num_workers": 3, "stages": 2})


def test_a_model_that_is_not_a_sequence_of_stages_fails_naming_the_factory(tmp_path, checkpoints):
    spec = {
        "name": "notseq",
        "model": {
            "factory": "torch.nn:Bilinear",
            "kwargs": {"in1_features": 2, "in2_features": 2, "out_features": 1},
            "checkpoints": [str(checkpoints[0])],
        },
        "data": {"factory": "cluster.data:digits", "num_examples": 16, "batch_size": 8},
        "probes": [{"kind": "trace", "matvecs": 6}],
        "cluster": {"num_workers": 2, "stages": 2},
        "output": {"path": str(tmp_path / "out")},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_job(load_spec(path), backend="process", progress=lambda m: None)
    assert summary.num_failed == 1
    assert (
        "needs model.factory 'torch.nn:Bilinear' to return an nn.Sequential of stages" in summary.failures[0]["reason"]
    )
