"""Training-run folders as trainers leave them (cluster/checkpoints.py, cluster/job.py, cluster/audit.py):
``checkpoint-N/`` subfolders with weights beside optimizer, scheduler, RNG and argument files and
``trainer_state.json``; discovery, run-relative names, steps and learning rates on every row, the
content hash over ``config.json``, and audits of a run that grows. Real files throughout."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file

from cluster.audit import Auditor
from cluster.checkpoints import (
    CheckpointError,
    checkpoint_info,
    checkpoint_sha256,
    expand_checkpoints,
    file_sha256,
    load_checkpoint,
    parse_step,
    save_sharded,
)
from cluster.cli import main
from cluster.job import run_job
from cluster.metrics import Metrics
from cluster.report_data import read_rows
from cluster.schema import COMMON_FIELDS, KIND_FIELDS, SCHEMA_VERSION
from cluster.spec import load_spec
from cluster.store import ResultStore
from probe.models import digits_mlp

HIDDEN = 8
PROBES = [{"kind": "eigenvalues", "k": 1}, {"kind": "trace", "matvecs": 12}, {"kind": "eos"}]
KINDS = ("eigenvalues", "trace", "eos")


def lr_at(step: int) -> float:
    """The run's learning-rate schedule (linear decay), as the Trainer logs it."""
    return round(0.5 - 0.005 * step, 6)


def model_state(step: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(step)
        model = digits_mlp(hidden=HIDDEN)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def trainer_checkpoint(run: Path, step: int, *, sharded: bool = False, log_every: int = 5) -> Path:
    """``run/checkpoint-{step}/`` as the Hugging Face Trainer writes it: config.json, the weights
    (``model.safetensors``, or an index and shards), optimizer.pt, scheduler.pt, rng_state.pth,
    training_args.bin and trainer_state.json (global_step, log_history with learning rates and an
    eval entry). Returns the weights file or index."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["DigitsMLP"], "hidden": HIDDEN}))
    state = model_state(step)
    if sharded:
        weights = save_sharded(state, folder, max_shard_bytes=1200, metadata={"format": "pt"})
    else:
        weights = folder / "model.safetensors"
        save_file(state, str(weights), metadata={"format": "pt"})  # what save_pretrained writes: no step, no lr
    torch.save(
        {"state": {}, "param_groups": [{"lr": lr_at(step), "params": [0, 1, 2, 3, 4, 5]}]}, folder / "optimizer.pt"
    )
    torch.save({"last_epoch": step, "_last_lr": [lr_at(step)]}, folder / "scheduler.pt")
    torch.save({"python": 1, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"output_dir": "run", "learning_rate": 0.5}, folder / "training_args.bin")
    history = [
        {"epoch": s / 100, "learning_rate": lr_at(s), "loss": 2.3 - s / 100, "step": s}
        for s in range(log_every, step + 1, log_every)
    ]
    history.append({"epoch": step / 100, "eval_loss": 1.5, "step": step})  # an eval entry: no learning rate
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "epoch": step / 100, "log_history": history, "best_metric": None}, indent=2)
    )
    return weights


def trainer_run(tmp_path: Path, steps=(10, 20, 30)) -> tuple[Path, list[Path]]:
    run = tmp_path / "run"
    return run, [trainer_checkpoint(run, s) for s in steps]


def write_spec(tmp_path: Path, checkpoints: list[str], *, name: str = "run-audit", cluster=None) -> Path:
    spec = {
        "name": name,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": HIDDEN}, "checkpoints": checkpoints},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "probes": PROBES,
        "cluster": cluster or {},
        "output": {"path": str(tmp_path / "results")},
        "seed": 3,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(spec_path: Path, kind: str) -> list[dict]:
    return ResultStore(load_spec(spec_path).output.path).read(kind).to_pylist()


quiet = dict(progress=lambda m: None)


# --- discovery ------------------------------------------------------------------------


def test_a_trainer_run_expands_to_exactly_its_weights_files_in_step_order(tmp_path):
    run, weights = trainer_run(tmp_path, steps=(10, 20, 30))
    trainer_checkpoint(run, 9)  # natural order: checkpoint-9 before checkpoint-10
    got = expand_checkpoints([str(run)])
    assert got == [str(run / "checkpoint-9" / "model.safetensors")] + [str(w) for w in weights]
    # a checkpoint folder given directly gives its weights only, not its optimizer, scheduler, RNG or argument files
    assert expand_checkpoints([str(run / "checkpoint-20")]) == [str(weights[1])]
    assert expand_checkpoints([str(run / "checkpoint-20") + "/"]) == [str(weights[1])]


def test_globs_over_checkpoint_folders_and_over_their_files(tmp_path):
    run, weights = trainer_run(tmp_path, steps=(100, 20, 3))
    want = [str(run / f"checkpoint-{s}" / "model.safetensors") for s in (3, 20, 100)]
    assert expand_checkpoints([str(run / "checkpoint-*")]) == want
    assert expand_checkpoints([str(run / "checkpoint-*" / "*")]) == want  # training-state files are left out
    assert expand_checkpoints([str(run / "checkpoint-*" / "model.safetensors")]) == want
    assert expand_checkpoints([str(run / "checkpoint-[12]*")]) == want[1:]
    with pytest.raises(CheckpointError, match=re.escape("matches no file")):
        expand_checkpoints([str(run / "checkpoint-*" / "optimizer.pt")])


def test_a_sharded_checkpoint_folder_gives_its_index_not_its_shards(tmp_path):
    run = tmp_path / "run"
    index = trainer_checkpoint(run, 10, sharded=True)
    single = trainer_checkpoint(run, 20)
    assert len(list(index.parent.glob("model-*.safetensors"))) > 1
    assert index.name == "model.safetensors.index.json"
    assert expand_checkpoints([str(run)]) == [str(index), str(single)]
    assert expand_checkpoints([str(index.parent)]) == [str(index)]
    info = checkpoint_info(index, str(run))
    assert (info.name, info.step, info.lr) == ("checkpoint-10", 10, lr_at(10))
    state, meta = load_checkpoint(index)
    assert all(torch.equal(state[k], v) for k, v in model_state(10).items())


@pytest.mark.parametrize(
    "folder, weights",
    [
        ("step-5", "model.safetensors"),
        ("step_5", "weights.safetensors"),
        ("global_step5", "model.pt"),
        ("epoch=0-step=5", "model.safetensors.index.json"),
        ("checkpoint-5", "pytorch_model.bin"),
    ],
)
def test_each_folder_naming_style_is_a_checkpoint_with_its_step(tmp_path, folder, weights):
    run = tmp_path / "run"
    sub = run / folder
    sub.mkdir(parents=True)
    if weights.endswith(".index.json"):
        path = save_sharded(model_state(5), sub, max_shard_bytes=1200)
    elif weights.endswith(".safetensors"):
        path = sub / weights
        save_file(model_state(5), str(path))
    else:
        path = sub / weights
        torch.save(model_state(5), path)
    torch.save({"state": {}}, sub / "optimizer.pt")
    assert expand_checkpoints([str(run)]) == [str(path)]
    for entry in (str(run), str(sub), str(run / "*"), None):
        info = checkpoint_info(path, entry)
        assert (info.name, info.step, info.lr) == (folder, 5, None), entry


@pytest.mark.parametrize(
    "name, step",
    [
        ("checkpoint-100", 100),
        ("checkpoint-9", 9),
        ("step-7", 7),
        ("step_7", 7),
        ("step7", 7),
        ("STEP-12", 12),
        ("global_step700", 700),
        ("global_step_700", 700),
        ("epoch=2-step=300", 300),
        ("epoch=2-step=300.ckpt", 300),
        ("ckpt-40", 40),
        ("iter_0001000", 1000),
        ("step-10.safetensors", 10),
        ("run_step_3.pt", 3),
        ("model.safetensors", None),
        ("mlp-seed0.safetensors", None),
        ("model-00001-of-00002.safetensors", None),
        ("epoch=3", None),
        ("steps", None),
        ("checkpoint-best", None),
        ("bestep5", None),
    ],
)
def test_step_parsing_of_each_naming_style(name, step):
    assert parse_step(name) == step


def test_flat_files_keep_their_file_names_and_take_step_and_lr_from_metadata(tmp_path):
    flat = tmp_path / "ckpts"
    flat.mkdir()
    a = flat / "weights-a.safetensors"
    save_file(model_state(1), str(a), metadata={"lr": "0.125", "step": "42"})
    b = flat / "step-7.safetensors"
    save_file(model_state(2), str(b), metadata={"lr": "0.25", "step": "99"})
    c = flat / "other.pt"
    torch.save({"model": model_state(3), "step": 5, "lr": 0.1}, c)
    (flat / "optimizer.pt").write_bytes(b"x")
    (flat / "notes.json").write_text("{}")
    assert expand_checkpoints([str(flat)]) == [str(c), str(b), str(a)]
    assert checkpoint_info(a, str(flat)) == checkpoint_info(a) and checkpoint_info(a).name == "weights-a.safetensors"
    assert (checkpoint_info(a).step, checkpoint_info(a).lr) == (42, 0.125)
    assert (checkpoint_info(b).step, checkpoint_info(b).lr) == (7, 0.25)  # the name's step before the metadata's
    assert (checkpoint_info(c).name, checkpoint_info(c).step, checkpoint_info(c).lr) == ("other.pt", None, None)
    assert checkpoint_info("init") == checkpoint_info("init", None) and checkpoint_info("init").name == "init"


def test_trainer_state_lr_is_the_last_logged_rate_at_or_before_the_global_step(tmp_path):
    weights = trainer_checkpoint(tmp_path / "run", 20, log_every=3)  # logged at 3, 6, ..., 18
    state_file = weights.parent / "trainer_state.json"
    state = json.loads(state_file.read_text())
    info = checkpoint_info(weights)
    assert (info.name, info.step, info.lr) == ("checkpoint-20", 20, lr_at(18))
    # entries past global_step (a state copied from later) and entries without a rate are passed over
    state["log_history"] += [{"learning_rate": 0.9, "step": 21}, {"loss": 1.0, "step": 20}]
    state_file.write_text(json.dumps(state))
    assert checkpoint_info(weights).lr == lr_at(18)
    # global_step wins over the folder's name; an unreadable state falls back to the name
    state["global_step"] = 19
    state_file.write_text(json.dumps(state))
    assert checkpoint_info(weights).step == 19
    state_file.write_text("{truncated")
    info = checkpoint_info(weights)
    assert (info.step, info.lr) == (20, None)


def test_load_checkpoint_adds_the_trainer_state_step_and_lr_to_metadata_lacking_them(tmp_path):
    weights = trainer_checkpoint(tmp_path / "run", 30)
    state, meta = load_checkpoint(weights)
    assert meta == {"format": "pt", "step": 30, "lr": lr_at(30)}
    own = weights.parent / "model.safetensors"
    save_file(model_state(30), str(own), metadata={"lr": "0.01"})  # the checkpoint's own lr wins
    assert load_checkpoint(own)[1] == {"lr": "0.01", "step": 30}


@pytest.mark.parametrize("layout", ["run", "folder"])
def test_a_folder_of_optimizer_files_only_is_refused_in_one_line(tmp_path, layout):
    run = tmp_path / "run"
    folder = run / "checkpoint-10" if layout == "run" else run
    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"x": torch.zeros(1)}, folder / name)
    (folder / "trainer_state.json").write_text('{"global_step": 10}')
    with pytest.raises(CheckpointError) as err:
        expand_checkpoints([str(run)])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint entry {str(run)!r} matches no file: folder {str(run)!r} holds no checkpoint")
    assert "looked for model.safetensors.index.json, model.safetensors" in message
    assert "found only optimizer/scheduler/RNG/argument files" in message and "optimizer.pt" in message


# --- content hash ---------------------------------------------------------------------


def test_the_hash_covers_config_json_where_the_folder_holds_one(tmp_path):
    weights = trainer_checkpoint(tmp_path / "run", 10)
    config = weights.parent / "config.json"
    want = hashlib.sha256(f"{file_sha256(weights)}\0config.json\0{file_sha256(config)}".encode()).hexdigest()
    first = checkpoint_sha256(weights)
    assert first == want != file_sha256(weights)
    config.write_text(json.dumps({"architectures": ["DigitsMLP"], "hidden": HIDDEN, "dropout": 0.1}))
    assert checkpoint_sha256(weights) != first  # same weights, another model: another checkpoint
    # the other files of the folder are not part of it
    before = checkpoint_sha256(weights)
    torch.save({"state": {1: 2}}, weights.parent / "optimizer.pt")
    (weights.parent / "trainer_state.json").write_text('{"global_step": 11}')
    assert checkpoint_sha256(weights) == before
    # an index: its shards and the config
    index = trainer_checkpoint(tmp_path / "run", 20, sharded=True)
    h = checkpoint_sha256(index)
    (index.parent / "config.json").write_text("{}")
    assert checkpoint_sha256(index) != h
    # a folder without config.json hashes as before: the file's SHA-256
    flat = tmp_path / "flat"
    flat.mkdir()
    save_file(model_state(1), str(flat / "a.safetensors"))
    assert checkpoint_sha256(flat / "a.safetensors") == file_sha256(flat / "a.safetensors")


# --- rows: checkpoint_name, step and lr on every kind ----------------------------------


def test_schema_3_carries_name_step_lr_hvp_and_layout_in_every_kind():
    common = {f.name: f.type for f in COMMON_FIELDS}
    assert SCHEMA_VERSION == 4  # 4 changed the folder layout only (docs/results.md)
    assert (common["hvp"], common["layout"]) == (pa.string(), pa.string())
    assert (common["checkpoint_name"], common["step"], common["lr"]) == (pa.string(), pa.int64(), pa.float64())
    assert not any({"step", "lr", "checkpoint_name"} & {f.name for f in fields} for fields in KIND_FIELDS.values())


def test_a_job_over_a_trainer_run_writes_names_steps_and_lrs_and_an_audit_adds_the_next_checkpoint(tmp_path):
    run, weights = trainer_run(tmp_path, steps=(10, 20, 30))
    spec_path = write_spec(tmp_path, [str(run)])
    summary = run_job(load_spec(spec_path), backend="local", **quiet)
    assert (summary.num_tasks, summary.num_done, summary.num_failed) == (7, 7, 0)  # 3 × (eigenvalues, trace) + eos
    before = {k: rows(spec_path, k) for k in KINDS}
    for kind in KINDS:
        got = sorted((r["checkpoint_name"], r["step"], r["lr"], r["checkpoint"]) for r in before[kind])
        assert got == [(f"checkpoint-{s}", s, lr_at(s), str(w)) for s, w in zip((10, 20, 30), weights, strict=True)], (
            kind
        )
        assert all(
            r["schema_version"] == SCHEMA_VERSION and (r["hvp"], r["layout"]) == ("exact", "single")
            for r in before[kind]
        )
    for r in before["eos"]:  # the eos runner read the same rate (from the Trainer's state) for its threshold
        assert r["lr_source"] == "metadata" and r["threshold"] == pytest.approx(2 / r["lr"])
    assert json.loads(before["eos"][0]["probe_config"])["series_steps"] == [10, 20, 30]  # the training steps

    new = trainer_checkpoint(run, 40)
    metrics = Metrics()
    report = Auditor(load_spec(spec_path), metrics=metrics, **quiet).run_pass()
    assert (report.checkpoints, report.ran, report.stored, report.failed) == (4, 3, 6, 0)  # eos: only its new row
    for kind in KINDS:
        after = rows(spec_path, kind)
        added = [r for r in after if r["task_key"] not in {b["task_key"] for b in before[kind]}]
        assert [(r["checkpoint_name"], r["step"], r["lr"], r["checkpoint"]) for r in added] == [
            ("checkpoint-40", 40, lr_at(40), str(new))
        ], kind
        assert len(after) == 4
    assert metrics.audit_checkpoints.labels(job_name="run-audit")._value.get() == 4
    # the report labels checkpoints by their run-relative names
    from cluster.report import write_report

    page = write_report(load_spec(spec_path).output.path).read_text()
    for s in (10, 20, 30, 40):
        assert f">checkpoint-{s}</span>" in page
    assert ">model.safetensors</span>" not in page


def test_rows_written_before_schema_2_read_back_beside_new_ones(tmp_path):
    """An old results folder (no checkpoint_name, step or lr columns) read together with new rows."""
    run, weights = trainer_run(tmp_path, steps=(10,))
    spec_path = write_spec(tmp_path, [str(run)])
    run_job(load_spec(spec_path), backend="local", **quiet)
    root = Path(load_spec(spec_path).output.path)
    (new,) = read_rows(root, "trace")
    old = {k: v for k, v in new.items() if k not in ("checkpoint_name", "step", "lr", "job")}
    old.update(task_key="old", schema_version=1, checkpoint="/elsewhere/step-3.safetensors")
    table = pa.Table.from_pylist([old])
    (root / "trace" / "job=run-audit").mkdir()  # the folder layout before schema version 4, too
    pq.write_table(table, root / "trace" / "job=run-audit" / "part-old.parquet")
    got = {r["task_key"]: r for r in read_rows(root, "trace")}
    assert got["old"]["checkpoint_name"] is None and got["old"]["step"] is None and got["old"]["lr"] is None
    assert got[new["task_key"]]["checkpoint_name"] == "checkpoint-10" and got[new["task_key"]]["step"] == 10
    from cluster.report import write_report

    page = write_report(root).read_text()
    assert ">step-3.safetensors</span>" in page and ">checkpoint-10</span>" in page


# --- an empty run: audit warns and keeps its schedule; probe run exits 2 before Ray -----


def test_an_audit_of_a_run_without_weights_yet_warns_and_keeps_its_schedule(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    torch.save({"state": {}}, run / "checkpoint-10" / "optimizer.pt")  # the Trainer is still writing it
    spec_path = write_spec(tmp_path, [str(run)])
    metrics, messages = Metrics(), []
    auditor = Auditor(load_spec(spec_path), metrics=metrics, progress=messages.append)
    last = auditor.run(every_s=0.01, max_passes=2)
    assert last.ok and (last.checkpoints, last.ran) == (0, 0) and auditor.passes == 2
    warnings = [m for m in messages if "warning:" in m]
    assert len(warnings) == 2 and all("holds no checkpoint yet" in m and "optimizer.pt" in m for m in warnings)
    assert metrics.audit_checkpoints.labels(job_name="run-audit")._value.get() == 0
    assert metrics.audit_passes.labels(job_name="run-audit", outcome="succeeded")._value.get() == 2
    assert metrics.audit_passes.labels(job_name="run-audit", outcome="failed")._value.get() == 0
    trainer_checkpoint(run, 20)  # the next pass finds it
    assert auditor.run_pass().checkpoints == 1


def test_probe_run_on_a_run_without_checkpoints_exits_2_in_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import cluster.raytools

    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    torch.save({"state": {}}, run / "checkpoint-10" / "optimizer.pt")
    started = []
    monkeypatch.setattr(cluster.raytools, "connect", lambda *a, **k: started.append(a))
    spec_path = write_spec(tmp_path, [str(run)], cluster={"num_workers": 2})  # auto: the Ray backend
    assert main(["run", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"probe run: checkpoint entry {str(run)!r} matches no file") and err.count("\n") == 1
    assert "optimizer.pt" in err and not started
    spec_path = write_spec(tmp_path, [str(run)])  # the in-process backend: the same line
    assert main(["run", str(spec_path)]) == 2
    assert capsys.readouterr().err.startswith("probe run: checkpoint entry")


def test_names_stay_distinct_for_folders_of_several_checkpoints(tmp_path):
    """A subfolder or globbed folder holding several weights files is not one checkpoint: its
    files keep their own names (and a subfolder of several is not searched at all)."""
    runs = tmp_path / "runs"
    for seed in ("seed0", "seed1"):
        (runs / seed).mkdir(parents=True)
        for step in (1, 2):
            save_file(model_state(step), str(runs / seed / f"step-{step}.safetensors"))
    got = expand_checkpoints([str(runs / "*")])
    assert [Path(p).relative_to(runs).as_posix() for p in got] == [
        "seed0/step-1.safetensors",
        "seed0/step-2.safetensors",
        "seed1/step-1.safetensors",
        "seed1/step-2.safetensors",
    ]
    assert [checkpoint_info(p, str(runs / "*")).name for p in got] == ["step-1.safetensors", "step-2.safetensors"] * 2
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        expand_checkpoints([str(runs)])
    # one weights file per globbed folder: the folder names it
    (runs / "seed0" / "step-2.safetensors").unlink()
    (p,) = expand_checkpoints([str(runs / "seed0*")])
    info = checkpoint_info(p, str(runs / "seed0*"))
    assert (info.name, info.step) == ("seed0", 1)  # the step from the file's name where the folder's has none
    assert checkpoint_info(p).name == "step-1.safetensors"  # judged by the folder alone: a flat folder


def test_a_checkpoint_folder_in_two_formats_is_one_checkpoint_however_it_is_named(tmp_path):
    """save_pretrained may leave the same weights as model.safetensors and pytorch_model.bin: the
    folder is one checkpoint (safetensors preferred) whether the run, the folder or a glob names it."""
    run, weights = trainer_run(tmp_path, steps=(5, 99, 100))
    for w in weights:
        torch.save(model_state(0), w.parent / "pytorch_model.bin")
    expected = [str(w) for w in weights]
    assert expand_checkpoints([str(run)]) == expected
    assert expand_checkpoints([str(run / "checkpoint-*")]) == expected
    assert expand_checkpoints([str(run / "checkpoint-100")]) == [expected[-1]]
    assert [checkpoint_info(p, str(run / "checkpoint-*")).name for p in expected] == [
        "checkpoint-5",
        "checkpoint-99",
        "checkpoint-100",
    ]
