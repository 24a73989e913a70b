"""Language-model jobs end to end: a tiny probe.gpt model on cluster.data:tokens, weighted by tokens.

The probe sequences are right-padded to unequal lengths, so batches hold token
counts that are not proportional to their sequence counts, and the worker must
weigh every batch by the token count of the *whole* probe set (not its shard's).
The exact reference is one batch of every probe sequence: its loss is the mean
over all probe tokens whatever the weighting.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.dataset as ds
import pytest
import torch
import yaml
from compare import assert_close, by_task  # tests/cluster/compare.py
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import default_collate

from cluster.data import tokens_tensors
from cluster.job import run_job
from cluster.spec import PROBE_OPTIONS, load_spec
from cluster.worker import probe_subset, task_seed
from probe.eigen import eigenvalues
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator
from probe.trace import trace

CONFIG = {"vocab": 16, "dim": 8, "layers": 2, "heads": 2, "max_len": 8}
DATA = {"num_sequences": 40, "seq_len": 8, "vocab": 16, "min_len": 2, "seed": 0}
PROBES = [{"kind": "eigenvalues", "k": 2}, {"kind": "trace", "matvecs": 12}]
COLUMNS = {"eigenvalues": ["eigenvalues"], "trace": ["trace", "trace_stderr"]}
RTOL = 1e-10


class KeywordGPT(nn.Sequential):
    """probe.gpt's stages behind a Hugging Face style call: keywords in, an object with ``.logits`` out."""

    def forward(self, input_ids, attention_mask=None):  # right padding and causal attention: no mask needed
        return SimpleNamespace(logits=super().forward(input_ids))


def keyword_gpt(**kwargs) -> nn.Module:
    """:func:`probe.gpt.gpt` as a :class:`KeywordGPT` (the same parameter names)."""
    return KeywordGPT(*gpt(**kwargs))


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    """A float64 GPT after 30 Adam steps on other sequences of the same chain, as safetensors."""
    ids, targets = tokens_tensors(**{**DATA, "seed": 1})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = gpt(**CONFIG).to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        lm_loss(model(ids), targets).backward()
        opt.step()
    path = tmp_path_factory.mktemp("lm") / "gpt.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def lm_spec(tmp_path, lm_checkpoint):
    """``lm_spec(out, **changes) -> JobSpec``: 24 of the 40 sequences in batches of 5, lm_cross_entropy,
    float64 unless ``precision`` says otherwise."""

    def make(out: str, *, cluster=None, model_factory="probe.gpt:gpt", as_dict=False, precision="float64"):
        raw = {
            "name": "lm-test",
            "model": {"factory": model_factory, "kwargs": CONFIG, "checkpoints": [str(lm_checkpoint)]},
            "data": {
                "factory": "cluster.data:tokens",
                "kwargs": {**DATA, "as_dict": as_dict},
                "num_examples": 24,
                "batch_size": 5,
            },
            "loss": "lm_cross_entropy",
            "precision": precision,
            "probes": PROBES,
            "cluster": cluster or {},
            "output": {"path": str(tmp_path / out)},
            "seed": 7,
        }
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_spec(path)

    return make


def read(root, kind):
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table()


def probe_set(spec):
    """Every probe sequence of the spec, as one ``(ids, targets)`` batch, in the job's order."""
    dataset, indices, _ = probe_subset(spec)
    return default_collate([dataset[i] for i in indices.tolist()])


def test_local_job_is_the_token_mean_hessian_of_the_whole_probe_set(lm_spec, lm_checkpoint, tmp_path):
    """Also: the float64 checkpoint keeps its float64 digits in the worker's model (1e-7 off otherwise)."""
    spec = lm_spec("local")
    assert spec.weighting == "tokens"
    summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_done == 2 and summary.num_failed == 0

    ids, targets = probe_set(spec)
    counted = (targets != -100).sum(1)
    assert counted.min() < counted.max()  # sequences of unequal length: token and example weights differ
    model = gpt(**CONFIG).to(torch.float64)
    model.load_state_dict(load_file(str(lm_checkpoint)))
    whole = HessianOperator(model, lm_loss, [(ids, targets)])  # one batch: the mean over all probe tokens
    eig = eigenvalues(
        whole,
        2,
        **{k: PROBE_OPTIONS["eigenvalues"][k] for k in ("which", "tol", "max_steps")},
        generator=torch.Generator().manual_seed(task_seed(7, 0)),
    )
    tr = trace(whole, num_matvecs=12, generator=torch.Generator().manual_seed(task_seed(7, 1)))
    rows = {kind: read(tmp_path / "local", kind).to_pylist() for kind in COLUMNS}
    assert rows["eigenvalues"][0]["eigenvalues"] == pytest.approx(eig.eigenvalues.tolist(), rel=RTOL)
    assert rows["trace"][0]["trace"] == pytest.approx(tr.trace, rel=RTOL)

    # Weighted by sequences, the job's batches (5, 5, 5, 5, 4) would give another trace.
    batches = [(ids[j : j + 5], targets[j : j + 5]) for j in range(0, 24, 5)]
    by_examples = trace(
        HessianOperator(model, lm_loss, batches),
        num_matvecs=12,
        generator=torch.Generator().manual_seed(task_seed(7, 1)),
    )
    assert abs(by_examples.trace - tr.trace) / abs(tr.trace) > 1e-3  # measured 0.14


@pytest.mark.usefixtures("single_thread_children")
def test_process_backend_with_two_workers_matches_local(lm_spec, tmp_path):
    """Two shards of 12 sequences (batches 5, 5, 2 each) weighted by the global token count."""
    local = run_job(lm_spec("local"), backend="local", progress=lambda m: None)
    spec = lm_spec("process", cluster={"num_workers": 2})
    summary = run_job(spec, backend="process", progress=lambda m: None)
    assert local.num_done == summary.num_done == 2 and summary.num_failed == 0
    for kind, cols in COLUMNS.items():
        table = read(tmp_path / "process", kind)
        assert set(table.column("world_size").to_pylist()) == {2}
        assert_close(by_task(table, cols), by_task(read(tmp_path / "local", kind), cols), RTOL)


def test_dict_items_and_a_keyword_model_give_the_same_results(lm_spec, tmp_path):
    """Items {input_ids, attention_mask, labels} collate into dict batches; the model gets keywords."""
    pairs = run_job(lm_spec("pairs"), backend="local", progress=lambda m: None)
    dicts = run_job(
        lm_spec("dicts", model_factory="test_lm_jobs:keyword_gpt", as_dict=True),
        backend="local",
        progress=lambda m: None,
    )
    assert pairs.num_done == dicts.num_done == 2 and dicts.num_failed == 0
    for kind, cols in COLUMNS.items():
        got = read(tmp_path / "dicts", kind).to_pylist()[0]
        want = read(tmp_path / "pairs", kind).to_pylist()[0]
        for col in cols:
            assert got[col] == pytest.approx(want[col], rel=RTOL)


@pytest.fixture
def single_thread_children(monkeypatch):
    """Spawned workers inherit one OpenMP thread each (two cores, shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def test_bfloat16_job_runs_its_estimators_in_float32(lm_spec, tmp_path):
    """precision: bfloat16 gives bf16 products summed into float32 vectors: λ's within bf16 accuracy."""
    exact = run_job(lm_spec("f64"), backend="local", progress=lambda m: None)
    half = run_job(lm_spec("bf16", precision="bfloat16"), backend="local", progress=lambda m: None)
    assert exact.num_done == half.num_done == 2 and half.num_failed == 0
    got = read(tmp_path / "bf16", "eigenvalues").to_pylist()[0]
    want = read(tmp_path / "f64", "eigenvalues").to_pylist()[0]
    assert got["dtype"] == "bfloat16" and got["converged"]
    assert got["eigenvalues"] == pytest.approx(want["eigenvalues"], rel=5e-2)  # measured 6.9e-3
