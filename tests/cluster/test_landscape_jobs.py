"""Landscape probes (sharpness, barrier, surface, eos) through specs, workers and Parquet.

Each runs from a real spec over real safetensors checkpoints; the data-parallel
run (2 worker processes over gloo) must equal the single-process one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from cluster.data import digits_tensors
from cluster.job import run_job
from cluster.spec import load_spec
from cluster.store import ResultStore
from probe.models import digits_mlp

SERIES_LR = 0.5


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A short full-batch GD run (lr 0.5) saved every 100 steps, with lr and step in the metadata."""
    folder = tmp_path_factory.mktemp("series")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(hidden=16).double()
    x, y = digits_tensors()
    x, y = x[:256].double(), y[:256]
    opt = torch.optim.SGD(model.parameters(), lr=SERIES_LR)
    paths = []
    for step in range(301):
        if step % 100 == 0:
            path = folder / f"step{step:04d}.safetensors"
            save_file(
                {k: v.float() for k, v in model.state_dict().items()},
                str(path),
                metadata={"lr": str(SERIES_LR), "step": str(step)},
            )
            paths.append(path)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return paths


def _spec(tmp_path, series, name, probes, **cluster):
    spec = {
        "name": name,
        "model": {
            "factory": "probe.models:digits_mlp",
            "kwargs": {"hidden": 16},
            "checkpoints": [str(p) for p in series],
        },
        "data": {
            "factory": "cluster.data:digits",
            "num_examples": 192,
            "batch_size": 64,
            "eval_sets": {"test": {"factory": "cluster.data:digits", "kwargs": {"split": "test"}, "num_examples": 128}},
        },
        "precision": "float64",
        "probes": probes,
        "cluster": cluster,
        "output": {"path": str(tmp_path / f"{name}-{cluster.get('num_workers', 1)}")},
        "seed": 3,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


PROBES = [
    {
        "kind": "sharpness",
        "measures": ["lambda_max", "keskar", "sam", "adaptive", "average"],
        "sigma": 0.01,
        "steps": 4,
        "num_samples": 4,
    },
    {"kind": "surface", "dims": 2, "resolution": 5},
    {"kind": "surface", "dims": 1, "resolution": 5, "directions": "eigen"},
    {"kind": "eos"},
]


def _values(store: ResultStore, kind: str, column: str) -> list[float]:
    table = store.read(kind).sort_by([("checkpoint", "ascending"), ("task_key", "ascending")])
    out = []
    for v in table.column(column).to_pylist():
        out.extend(v if isinstance(v, list) else [v])
    return out


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, series):
    tmp = tmp_path_factory.mktemp("landscape")
    one = run_job(_spec(tmp, series, "landscape", PROBES), backend="local", progress=lambda m: None)
    two = run_job(_spec(tmp, series, "landscape", PROBES, num_workers=2), backend="process", progress=lambda m: None)
    return one, two


def test_landscape_rows_are_written_per_kind(runs):
    one, _ = runs
    assert one.num_failed == 0 and one.num_done == 4 * 3 + 1
    store = ResultStore(one.output)
    sharp = store.read("sharpness")
    # per checkpoint: lambda_max, keskar, sam (one step and multi-step), adaptive, average
    assert sharp.num_rows == 4 * 6
    assert set(sharp.column("measure").to_pylist()) == {"lambda_max", "keskar", "sam", "adaptive", "average"}
    params = [json.loads(p) for p in sharp.column("params").to_pylist()]
    assert all(isinstance(p, dict) and p for p in params)
    surf = store.read("surface").to_pylist()
    two_d = [r for r in surf if r["dims"] == 2]
    assert all(len(r["loss"]) == 25 and len(r["beta"]) == 5 and r["normalization"] == "filter" for r in two_d)
    eig = [r for r in surf if r["directions"] == "eigen"]
    assert all(len(r["loss"]) == 5 and r["beta"] == [] and len(r["eigenvalues"]) == 1 for r in eig)


def test_eos_series_reads_learning_rates_and_warm_starts(runs):
    one, _ = runs
    rows = sorted(ResultStore(one.output).read("eos").to_pylist(), key=lambda r: r["step"])
    assert [r["step"] for r in rows] == [0, 100, 200, 300]
    assert all(r["lr"] == SERIES_LR and r["lr_source"] == "metadata" for r in rows)
    assert all(math.isclose(r["threshold"], 2 / SERIES_LR) for r in rows)
    assert [r["warm_started"] for r in rows] == [False, True, True, True]
    # the eos λ_max equals the sharpness probe's λ_max at every checkpoint
    sharp = {
        r["checkpoint_sha256"]: r["value"]
        for r in ResultStore(one.output).read("sharpness").to_pylist()
        if r["measure"] == "lambda_max"
    }
    for r in rows:
        assert math.isclose(r["lambda_max"], sharp[r["checkpoint_sha256"]], rel_tol=1e-8)
        assert math.isclose(r["ratio"], r["lambda_max"] / r["threshold"], rel_tol=1e-12)


@pytest.mark.parametrize("kind, column", [("sharpness", "value"), ("surface", "loss"), ("eos", "lambda_max")])
def test_two_data_parallel_workers_equal_one_process(runs, kind, column):
    one, two = runs
    assert two.num_failed == 0
    a, b = _values(ResultStore(two.output), kind, column), _values(ResultStore(one.output), kind, column)
    assert _close(a, b, 1e-10), kind


def test_barrier_between_two_checkpoints_on_two_eval_sets(tmp_path, series):
    probes = [
        {
            "kind": "barrier",
            "between": [str(series[0]), str(series[-1])],
            "path": ["linear", "bezier"],
            "points": 9,
            "train_steps": 10,
            "eval_sets": ["probe", "test"],
        }
    ]
    one = run_job(_spec(tmp_path, series, "barrier", probes), backend="local", progress=lambda m: None)
    two = run_job(_spec(tmp_path, series, "barrier", probes, num_workers=2), backend="process", progress=lambda m: None)
    assert one.num_done == two.num_done == 1
    rows = ResultStore(one.output).read("barrier").to_pylist()
    assert {(r["path"], r["eval_set"]) for r in rows} == {
        (p, e) for p in ("linear", "bezier") for e in ("probe", "test")
    }
    for r in rows:
        assert len(r["t"]) == len(r["loss"]) == 9 and r["endpoint_b"] == str(series[-1])
        assert r["barrier_height"] == pytest.approx(max(r["loss"]) - max(r["loss_a"], r["loss_b"]), abs=1e-12)
    assert _close(
        _values(ResultStore(two.output), "barrier", "loss"), _values(ResultStore(one.output), "barrier", "loss"), 1e-9
    )


def test_eos_without_a_learning_rate_fails_naming_the_fix(tmp_path):
    path = tmp_path / "nolr.safetensors"
    save_file(digits_mlp(hidden=16).state_dict(), str(path))
    summary = run_job(_spec(tmp_path, [path], "nolr", [{"kind": "eos"}]), backend="local", progress=lambda m: None)
    assert summary.num_failed == 1
    assert "set probes[eos].lr" in summary.failures[0]["reason"]
    (tmp_path / "nolr.json").write_text(json.dumps({"lr": 0.25}))
    summary = run_job(_spec(tmp_path, [path], "nolr", [{"kind": "eos"}]), backend="local", progress=lambda m: None)
    row = ResultStore(summary.output).read("eos").to_pylist()[0]
    assert row["lr"] == 0.25 and row["lr_source"] == "sidecar" and row["threshold"] == pytest.approx(8.0)


def test_eos_with_adam_reads_second_moments_from_both_checkpoint_layouts(tmp_path):
    from safetensors.torch import save_file as save_st

    from cluster.worker import build_loss
    from probe.eigen import eigenvalues
    from probe.eos import PreconditionedOperator, adam_preconditioner
    from probe.hessian import HessianOperator

    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = digits_mlp(hidden=16)
    x, y = digits_tensors()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x[:256]), y[:256]).backward()
        opt.step()
    sd = opt.state_dict()
    pt = tmp_path / "adam.pt"
    torch.save({"model": model.state_dict(), "optimizer": sd, "lr": 0.01, "step": 20}, pt)
    st = tmp_path / "adam.safetensors"
    tensors = dict(model.state_dict())
    for i, (name, _) in enumerate(model.named_parameters()):
        tensors[f"optimizer.exp_avg_sq.{name}"] = sd["state"][i]["exp_avg_sq"]
    save_st(tensors, str(st), metadata={"lr": "0.01", "step": "20", "adam_step": "20"})

    for path in (pt, st):
        spec = _spec(tmp_path, [path], f"adam-{path.suffix[1:]}", [{"kind": "eos", "optimizer": "adam"}])
        summary = run_job(spec, backend="local", progress=lambda m: None)
        assert summary.num_failed == 0, summary.failures
        row = ResultStore(summary.output).read("eos").to_pylist()[0]
        assert row["threshold"] == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 0.01))
        # reference: λ_max(P⁻¹H) from the same probe set, built directly
        from cluster.worker import ProbeWorker

        worker = ProbeWorker(spec.to_dict())
        worker.setup()
        m64, _ = worker.build_model(str(path))
        v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in sd["state"].values()]).double()
        diag = adam_preconditioner(v, 20)
        op = PreconditionedOperator(HessianOperator(m64, build_loss("cross_entropy"), worker.batches), diag)
        ref = eigenvalues(op, 1, generator=torch.Generator().manual_seed(0), tol=1e-10).eigenvalues[0].item()
        assert row["lambda_max"] == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("kind, p, rho", [("average", "inf", 0.2), ("worst", "inf", 0.005), ("average", 2, 0.1)])
def test_adaptive_sharpness_kind_and_norm_come_from_the_spec(make_spec, checkpoints, kind, p, rho):
    import dataclasses

    from safetensors.torch import load_file

    from cluster.worker import probe_subset, task_seed
    from probe.evaluate import Evaluator
    from probe.sharpness import adaptive_sharpness

    probe = {
        "kind": "sharpness",
        "measures": ["adaptive"],
        "adaptive_kind": kind,
        "adaptive_p": p,
        "adaptive_rho": rho,
        "steps": 5,
        "num_samples": 6,
    }
    spec = load_spec(make_spec(name="adaptive", probes=[probe]))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    assert run_job(spec, backend="local", progress=lambda m: None).num_done == 1
    (row,) = ResultStore(spec.output.path).read("sharpness").to_pylist()
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 50].tolist()])
        for j in range(0, len(indices), 50)
    ]
    model = digits_mlp(hidden=16)
    model.load_state_dict(load_file(str(checkpoints[0])))
    direct = adaptive_sharpness(
        Evaluator(model.double(), F.cross_entropy, batches),
        kind=kind,
        p=p,
        rho=rho,
        steps=5,
        num_samples=6,
        generator=torch.Generator().manual_seed(task_seed(spec.seed, 0)),
    )
    assert row["measure"] == "adaptive" and row["value"] == pytest.approx(direct.value, rel=1e-9, abs=1e-12)
    assert row["norm"] == {2: "l2", "inf": "linf"}[p] and row["rho"] == rho
    params = json.loads(row["params"])
    assert params["kind"] == kind and params["norm"] == row["norm"]
    assert (row["num_samples"], row["steps"]) == ((6, None) if kind == "average" else (None, 5))
    assert (row["stderr"] is not None) == (kind == "average")
