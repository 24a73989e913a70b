"""``probe submit``: submission ids that follow new checkpoints, the runtime environment and the
entrypoint resources handed to Ray's ``JobSubmissionClient.submit_job`` (cluster/raytools.py)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from cluster.cli import main
from cluster.raytools import (
    _follow_or_new,
    checkpoint_listing,
    job_arguments,
    one_shot,
    submission_id,
)


def test_a_new_checkpoint_gives_a_new_submission_id_and_the_same_listing_the_same(make_spec, checkpoints, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(checkpoints[0], folder / "step-1.safetensors")
    path = make_spec(
        model={"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 16}, "checkpoints": [str(folder)]}
    )
    entries = [str(folder)]
    first = submission_id(path, [], listing=checkpoint_listing(entries))
    assert first == submission_id(path, [], listing=checkpoint_listing(entries))  # re-submission: follow it
    shutil.copy(checkpoints[1], folder / "step-2.safetensors")
    second = submission_id(path, [], listing=checkpoint_listing(entries))
    assert second != first  # new checkpoints: a new job runs them
    st = (folder / "step-2.safetensors").stat()
    os.utime(folder / "step-2.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    assert submission_id(path, [], listing=checkpoint_listing(entries)) != second
    assert submission_id(path, ["seed=1"], listing=checkpoint_listing(entries)) != second
    assert checkpoint_listing([str(tmp_path / "nowhere")]) is None  # paths only the cluster sees
    # without a listing (and for `probe run`) the id is what it always was: spec text and overrides
    assert submission_id(path, []).startswith(f"probe-{path.stem}-")
    assert submission_id(path, [], verb="audit", verb_args="--once") != submission_id(path, [])


def test_only_jobs_that_end_by_themselves_follow_the_listing():
    assert one_shot("run", "") and one_shot("audit", "--once")
    assert not one_shot("audit", "--every 30m --metrics-port 9464")


def test_submit_job_arguments_carry_the_runtime_env_and_entrypoint_resources(ray_head, make_spec, tmp_path):
    # ray_head first: importing Ray fixes its auth settings for the process, and the session's head
    # (tests/cluster/conftest.py) needs them set to its token before any import
    from ray.job_submission import JobSubmissionClient

    path = make_spec()
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {HF_HOME: /data/hf}\npip: [my-models]\nexcludes: [big]\n")
    kwargs = job_arguments(
        path,
        ["cluster.num_workers=2"],
        working_dir=str(tmp_path),
        runtime_env=str(env_file),
        entrypoint_num_cpus=1,
        entrypoint_num_gpus=0.5,
        entrypoint_memory=2 << 30,
        verb="audit",
        verb_args="--once",
    )
    assert kwargs["entrypoint"] == f"python -m cluster.cli audit {path.name} --once --set cluster.num_workers=2"
    env = kwargs["runtime_env"]
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"HF_HOME": "/data/hf"}
    assert env["pip"] == ["my-models"] and {".git", ".venv", "big"} <= set(env["excludes"])
    assert (kwargs["entrypoint_num_cpus"], kwargs["entrypoint_num_gpus"], kwargs["entrypoint_memory"]) == (
        1,
        0.5,
        2 << 30,
    )
    accepted = set(inspect.signature(JobSubmissionClient.submit_job).parameters)
    assert set(kwargs) <= accepted, set(kwargs) - accepted  # Ray's own names
    inline = job_arguments(path, [], working_dir=str(tmp_path), runtime_env=json.dumps({"env_vars": {"A": "1"}}))
    assert inline["runtime_env"]["env_vars"] == {"A": "1"} and "entrypoint_num_cpus" not in inline


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--runtime-env", "{not json", "--runtime-env '{not json' is neither a JSON object"),
        ("--runtime-env", '{"working_dir": "x"}', "give the working directory with --working-dir"),
        ("--runtime-env", "[1, 2]", "--runtime-env must be a mapping"),
        ("--verb-args", "--sometimes", "are not arguments of `probe run`"),
        ("--entrypoint-num-cpus", "-1", "--entrypoint-num-cpus must be non-negative"),
    ],
)
def test_bad_submit_options_exit_2_with_one_line_before_contacting_ray(
    make_spec, tmp_path, capsys, option, value, message
):
    path = make_spec()
    rc = main(
        ["submit", str(path), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path), f"{option}={value}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


class _Jobs:
    """What ``JobSubmissionClient.list_jobs`` answers: submission ids and statuses."""

    def __init__(self, **statuses: str) -> None:
        self.statuses = statuses

    def list_jobs(self):
        return [
            SimpleNamespace(submission_id=k.replace("_", "-"), status=f"JobStatus.{v}")
            for k, v in self.statuses.items()
        ]


def test_a_failed_or_stopped_job_is_submitted_again_and_a_live_or_finished_one_followed():
    assert _follow_or_new(_Jobs(), "probe-a") == ("probe-a", True)
    assert _follow_or_new(_Jobs(probe_a="RUNNING"), "probe-a") == ("probe-a", False)
    assert _follow_or_new(_Jobs(probe_a="SUCCEEDED"), "probe-a") == ("probe-a", False)
    assert _follow_or_new(_Jobs(probe_a="FAILED"), "probe-a") == ("probe-a-2", True)
    assert _follow_or_new(_Jobs(probe_a="STOPPED", probe_a_2="PENDING"), "probe-a") == ("probe-a-2", False)
