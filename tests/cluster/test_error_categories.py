"""Every failure category of cluster/errors.py is emitted by a real failure: the category
comes from the error's type (across the worker boundary, in-process and in worker
processes), lands in the ``failures/`` row and the ``landscape_probe_failures_total`` metric, and
sets the CLI's exit code. Messages are never parsed."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch.nn.functional as F
import yaml

from cluster.cli import main
from cluster.errors import CATEGORIES, EXIT_CODES, NonFiniteError, TaskFailed, category_of
from cluster.job import run_job
from cluster.metrics import Metrics
from cluster.spec import load_spec
from cluster.store import ResultStore


def failure_count(metrics: Metrics, job: str, category: str) -> float:
    return metrics.failures.labels(job_name=job, reason=category)._value.get()


def exploding_loss():
    """A loss factory whose loss fails in a way no category names (a bug in user code)."""

    def loss(outputs, targets):
        raise RuntimeError("the loss function has a bug")

    return loss


def exiting_loss():
    """A loss factory whose worker processes die as the loss is first evaluated (only inside the
    workers' process group: the driver's own estimate evaluates it too)."""
    import torch.distributed as dist

    def loss(outputs, targets):
        if dist.is_initialized():
            os._exit(17)
        return F.cross_entropy(outputs, targets)

    return loss


def nan_loss():
    """A loss that is NaN at every point."""

    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")

    return loss


def job(make_spec, tmp_path, **changes):
    spec = load_spec(make_spec(probes=[{"kind": "trace", "matvecs": 6}]))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    return dataclasses.replace(spec, **changes)


def failed_category(spec, metrics, backend="local") -> str:
    summary = run_job(spec, backend=backend, progress=lambda m: None, metrics=metrics)
    assert summary.num_failed == 1 and summary.num_done == 0
    rows = ResultStore(spec.output.path).read("failures").to_pylist()
    assert len(rows) == 1 and not ResultStore(spec.output.path).read("trace").num_rows
    assert failure_count(metrics, spec.name, rows[0]["category"]) == 1
    return rows[0]["category"]


def test_bad_checkpoint_is_a_truncated_file(make_spec, tmp_path):
    spec = job(make_spec, tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    data = open(spec.model.checkpoints[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=(str(truncated),)))
    assert failed_category(spec, Metrics()) == "bad_checkpoint"


def test_non_finite_is_a_nan_loss_at_the_checkpoint(make_spec, tmp_path):
    spec = job(make_spec, tmp_path, loss={"factory": "test_error_categories:nan_loss"})
    assert failed_category(spec, Metrics()) == "non_finite"


def test_other_is_an_unexpected_error_in_user_code(make_spec, tmp_path):
    spec = job(make_spec, tmp_path, loss={"factory": "test_error_categories:exploding_loss"})
    assert failed_category(spec, Metrics()) == "other"


def test_worker_lost_is_a_worker_process_that_exits(make_spec, tmp_path):
    spec = job(make_spec, tmp_path, loss={"factory": "test_error_categories:exiting_loss"})
    spec = dataclasses.replace(
        spec, cluster=dataclasses.replace(spec.cluster, num_workers=2, backend="process", max_restarts=0)
    )
    assert failed_category(spec, Metrics(), backend="process") == "worker_lost"


def test_bad_spec_raised_inside_a_worker_keeps_its_type_across_processes(tmp_path):
    """A barrier from 'init' on a Hugging Face model: the worker processes refuse it with a
    SpecError (an hf model has no factory initialization), and the category crosses the
    process boundary with it."""
    import hf_files

    model_dir = tmp_path / "llama"
    hf_files.write_model("llama_tied", model_dir)
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "init-barrier",
                "model": {"hf": str(model_dir)},
                "data": hf_files.token_data(tmp_path, batch_size=4),
                "loss": "causal_lm",
                "probes": [
                    {
                        "kind": "barrier",
                        "between": ["init", str(model_dir / "model.safetensors.index.json")],
                        "points": 3,
                    }
                ],
                "cluster": {"num_workers": 2, "backend": "process"},
                "output": {"path": str(tmp_path / "results")},
            }
        )
    )
    spec = load_spec(path)
    metrics = Metrics()
    summary = run_job(spec, backend="process", progress=lambda m: None, metrics=metrics)
    rows = ResultStore(spec.output.path).read("failures").to_pylist()
    assert summary.num_failed == 1 and [r["category"] for r in rows] == ["bad_spec"]
    assert "checkpoint 'init' is not available with model.hf" in rows[0]["reason"]
    assert failure_count(metrics, spec.name, "bad_spec") == 1


def test_write_failed_is_a_result_folder_that_cannot_be_written(make_spec, tmp_path):
    spec = job(make_spec, tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "trace").write_text("a file where the trace dataset's folder should be")
    spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=str(out)))
    metrics = Metrics()
    with pytest.raises(Exception) as caught:
        run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    assert category_of(caught.value) == "write_failed"
    assert failure_count(metrics, spec.name, "write_failed") == 1


def test_placement_is_a_group_the_cluster_cannot_place(make_spec, tmp_path, ray_head):
    spec = job(make_spec, tmp_path)
    spec = dataclasses.replace(
        spec,
        cluster=dataclasses.replace(
            spec.cluster,
            num_workers=2,
            backend="ray",
            cpus_per_worker=64,
            placement_timeout_s=2,
            address=ray_head["address"],
        ),
    )
    metrics = Metrics()
    with pytest.raises(Exception) as caught:
        run_job(spec, backend="ray", progress=lambda m: None, metrics=metrics)
    assert category_of(caught.value) == "placement"
    assert failure_count(metrics, spec.name, "placement") == 1


def test_every_category_has_an_exit_code_and_crosses_a_task_boundary():
    assert set(EXIT_CODES) == set(CATEGORIES)
    assert category_of(TaskFailed("x", category="non_finite")) == "non_finite"
    assert category_of(TaskFailed("x", category="no such category")) == "other"
    assert category_of(NonFiniteError("x")) == "non_finite" and NonFiniteError("x").exit_code == 1


def test_the_cli_exit_code_is_the_error_type(tmp_path, make_spec, capsys):
    path = make_spec(probes=[{"kind": "trace", "matvecs": 6}])
    raw = yaml.safe_load(open(path).read())
    raw["model"]["checkpoints"] = [str(tmp_path / "missing-folder")]
    open(path, "w").write(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == EXIT_CODES["bad_checkpoint"] == 2
