"""The per-checkpoint gauges (one value per training step, for the dashboard's trends over
training) and ``landscape_probe_build_info``."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from checkpoint_files import save_step  # tests/cluster/checkpoint_files.py
from prometheus_client import generate_latest

import cluster.metrics
from cluster.audit import Auditor
from cluster.metrics import STEP_WINDOW, Metrics
from cluster.spec import load_spec
from cluster.store import ResultStore

ROOT = Path(__file__).resolve().parents[2]


def by_step(metrics: Metrics, name: str, **labels: str) -> dict[int, float]:
    return {
        int(s.labels["step"]): s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == name and labels.items() <= s.labels.items()
    }


def test_lambda_max_per_step_prefers_the_eigenvalues_row_in_any_order():
    eig = {"step": 7, "which": "largest", "eigenvalues": [3.0, 1.0]}
    eos = {"step": 7, "optimizer": "gd", "lambda_max": 2.9, "ratio": 0.29}
    adam = {"step": 8, "optimizer": "adam", "lambda_max": 50.0, "ratio": 2.0}  # λ_max(P⁻¹H): not the Hessian's
    for order in ((("eigenvalues", eig), ("eos", eos)), (("eos", eos), ("eigenvalues", eig))):
        m = Metrics()
        for kind, row in order:
            m.checkpoint_values("run", kind, [row])
        m.checkpoint_values("run", "eos", [adam])
        assert by_step(m, "landscape_probe_checkpoint_lambda_max") == {7: 3.0}
        assert by_step(m, "landscape_probe_checkpoint_eos_ratio") == {7: 0.29, 8: 2.0}


def test_rows_without_a_step_set_nothing_and_a_rerun_of_a_step_replaces_it():
    m = Metrics()
    m.checkpoint_values("run", "trace", [{"step": None, "trace": 1.0}, {"trace": 2.0}])
    assert by_step(m, "landscape_probe_checkpoint_hessian_trace") == {}
    m.checkpoint_values("run", "trace", [{"step": 3, "trace": 1.0}, {"step": 3, "trace": 1.5}])
    assert by_step(m, "landscape_probe_checkpoint_hessian_trace") == {3: 1.5}


def test_sharpness_and_barrier_keep_their_measure_and_path_apart():
    m = Metrics()
    m.checkpoint_values(
        "run",
        "sharpness",
        [
            {"step": 4, "measure": "sam", "steps": 1, "value": 0.1},
            {"step": 4, "measure": "sam", "steps": 5, "value": 0.3},
            {"step": 4, "measure": "lambda_max", "steps": None, "value": 9.0},
        ],
    )
    assert by_step(m, "landscape_probe_checkpoint_sharpness", measure="sam", ascent_steps="1") == {4: 0.1}
    assert by_step(m, "landscape_probe_checkpoint_sharpness", measure="sam", ascent_steps="5") == {4: 0.3}
    assert by_step(m, "landscape_probe_checkpoint_sharpness", measure="lambda_max") == {4: 9.0}
    assert by_step(m, "landscape_probe_checkpoint_lambda_max") == {4: 9.0}
    barrier = [
        {"step": 4, "eval_set": "probe", "path": "linear", "barrier_height": 0.5},
        {"step": 4, "eval_set": "probe", "path": "bezier", "barrier_height": 0.2},
        {"step": 4, "eval_set": "test", "path": "linear", "barrier_height": 0.9},  # headlines: the probe set's
    ]
    m.checkpoint_values("run", "barrier", barrier)
    assert by_step(m, "landscape_probe_checkpoint_barrier_height", path="linear") == {4: 0.5}
    assert by_step(m, "landscape_probe_checkpoint_barrier_height", path="bezier") == {4: 0.2}


def test_each_series_exports_only_its_latest_steps():
    m = Metrics()
    steps = range(10, 10 * (STEP_WINDOW + 6), 10)  # STEP_WINDOW + 5 checkpoints
    for step in steps:
        m.checkpoint_values("run", "trace", [{"step": step, "trace": float(step)}])
        m.checkpoint_values("run", "eos", [{"step": step, "optimizer": "gd", "lambda_max": 1.0, "ratio": 0.1}])
    m.checkpoint_values("other", "trace", [{"step": 10, "trace": 1.0}])  # series have their own windows
    latest = list(steps)[-STEP_WINDOW:]
    for name in ("landscape_probe_checkpoint_hessian_trace", "landscape_probe_checkpoint_eos_ratio"):
        assert sorted(by_step(m, name, series="run")) == latest, name
    assert by_step(m, "landscape_probe_checkpoint_hessian_trace", series="other") == {10: 1.0}
    m.checkpoint_values("run", "trace", [{"step": 10, "trace": 1.0}])  # older than the window: dropped
    assert sorted(by_step(m, "landscape_probe_checkpoint_hessian_trace", series="run")) == latest
    text = generate_latest(m.registry).decode()
    assert 'step="10"' not in text.replace('series="other",step="10"', "")


def test_build_info_names_this_package_python_torch_and_the_checkout(monkeypatch):
    (sample,) = [s for m in Metrics().registry.collect() for s in m.samples if s.name == "landscape_probe_build_info"]
    assert sample.value == 1.0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert sample.labels == {
        "version": importlib.metadata.version("landscape-probe"),
        "revision": head.stdout.strip(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
    }


def test_git_revision_reads_a_branch_a_packed_ref_a_detached_head_and_nothing(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "a" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert cluster.metrics._git_revision(tmp_path / "a") == sha
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")
    assert cluster.metrics._git_revision(tmp_path / "a") == sha
    (git / "HEAD").write_text(sha[::-1] + "\n")
    assert cluster.metrics._git_revision(tmp_path / "a") == sha[::-1]
    assert cluster.metrics._git_revision(tmp_path / "none") is None


def test_an_audit_sets_each_steps_values_from_the_stored_rows_of_deleted_checkpoints_too(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    paths = [save_step(folder, step, hidden=8) for step in (10, 20, 30)]
    spec_path = tmp_path / "trend.yaml"
    spec_path.write_text(
        "name: trend\n"
        "model: {factory: 'probe.models:digits_mlp', kwargs: {hidden: 8}, checkpoints: ['" + str(folder) + "']}\n"
        "data: {factory: 'cluster.data:digits', num_examples: 96, batch_size: 48}\n"
        "precision: float64\n"
        "probes: [{kind: eigenvalues, k: 1}, {kind: trace, matvecs: 12}, {kind: eos}]\n"
        f"output: {{path: '{tmp_path / 'results'}'}}\n"
        "seed: 3\n"
    )
    spec = load_spec(spec_path)
    Auditor(spec, progress=lambda m: None).run_pass()
    paths[0].unlink()  # a training run rotated its oldest checkpoint away (save_total_limit)
    metrics = Metrics()  # a restarted audit: its gauges come from the stored rows
    Auditor(spec, metrics=metrics, progress=lambda m: None).run_pass()
    store = ResultStore(spec.output.path)
    eig = {r["step"]: r["eigenvalues"][0] for r in store.read("eigenvalues").to_pylist()}
    trace = {r["step"]: r["trace"] for r in store.read("trace").to_pylist()}
    # eos reads the whole series: the shorter series is a new task, whose newer rows win
    ratio = {r["step"]: r["ratio"] for r in sorted(store.read("eos").to_pylist(), key=lambda r: r["created_at"])}
    assert sorted(eig) == [10, 20, 30]
    assert by_step(metrics, "landscape_probe_checkpoint_lambda_max", series="trend") == eig  # not eos's λ_max
    assert by_step(metrics, "landscape_probe_checkpoint_hessian_trace", series="trend") == trace
    assert by_step(metrics, "landscape_probe_checkpoint_eos_ratio", series="trend") == ratio
