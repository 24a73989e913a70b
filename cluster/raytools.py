"""Connecting to Ray and submitting jobs through the Ray Jobs API.

A local instance binds to loopback (``127.0.0.1``) and starts no dashboard; a
cluster is reached through ``cluster.address`` (or ``RAY_ADDRESS``, which Ray sets
inside a submitted job). Ray rewrites ``127.0.0.1`` to the host's network address
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before Ray is imported
(single-node mode); :func:`connect` sets it for local instances, and a local head
started for tests or a laptop should be started with it too.

Ray 2.59+ enables token authentication for local clusters: a client outside the
cluster needs ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``, or the
file ``~/.ray/auth_token`` that ``ray start`` writes).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from cluster.errors import ProbeError

__all__ = [
    "connect",
    "submit_job",
    "submission_id",
    "checkpoint_listing",
    "job_arguments",
    "load_runtime_env",
    "ClusterUnreachable",
    "SubmitError",
]


class ClusterUnreachable(ProbeError, ConnectionError):
    """The Ray cluster at an address does not answer; the message names the address."""

    category = "placement"


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Attach to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local instance on loopback.

    Raises:
        ConnectionError: when the address cannot be reached, naming it.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Keep a local instance on loopback: Ray otherwise replaces 127.0.0.1 with the
        # host's network address. Read by Ray at import, so set before importing it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    else:
        # Before importing Ray: an import reads settings (RAY_AUTH_MODE, ...) once, for the process.
        _reachable(address)
    import ray

    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types
            raise ClusterUnreachable(
                f"cannot reach the Ray cluster at cluster.address={address!r}: {str(exc).splitlines()[0]}; "
                "check the address (GCS host:port, or 'auto') and that the head node is running"
            ) from exc
        return
    # address="local" starts a new instance even when a stale one is recorded under /tmp/ray.
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True
    )


def _reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast when ``host:port`` (or ``ray://host:port``) does not accept TCP connections:
    ``ray.init`` would otherwise retry for minutes. ``auto`` and addresses without a port are
    left to Ray.

    Raises:
        ConnectionError: naming the address.
    """
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at cluster.address={address!r}: {exc.strerror or exc} "
            f"(no answer on {host}:{port} within {timeout_s:g} s); check the address and that the head node is running"
        ) from None


class SubmitError(ProbeError, ValueError):
    """A ``probe submit`` option that cannot be used (``--runtime-env``, ``--verb-args``); the message
    names the option and the fix."""

    category = "bad_spec"


def checkpoint_listing(entries: tuple[str, ...] | list[str]) -> str | None:
    """A hash of the checkpoints ``entries`` find here now: every file's path, size and
    modification time (nothing is read). None when none can be listed here (paths that exist
    only on the cluster)."""
    from cluster.checkpoints import checkpoint_entries, hashed_files

    try:
        paths = checkpoint_entries(tuple(entries), missing_ok=True)
    except (ProbeError, OSError):
        return None
    if not paths:
        return None
    h = hashlib.sha256()
    for path in paths:
        for f in hashed_files(path):
            st = Path(f).stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def one_shot(verb: str, verb_args: str) -> bool:
    """Whether the job ends by itself (``run``, ``audit --once``): then a new checkpoint listing
    means new work and a new submission; a service (``audit --every``) finds new checkpoints itself."""
    return verb == "run" or "--once" in shlex.split(verb_args)


def submission_id(
    spec_path: str | Path, overrides: list[str], *, verb: str = "run", verb_args: str = "", listing: str | None = None
) -> str:
    """Deterministic Ray job id: the same spec text, overrides, verb and checkpoint ``listing``
    (:func:`checkpoint_listing`; None: not known here) give the same id, so a re-submission
    follows the job already submitted; a changed listing gives a new id, so new checkpoints run."""
    h = hashlib.sha256(Path(spec_path).read_bytes())
    for o in overrides:
        h.update(b"\0" + o.encode())
    if verb != "run" or verb_args:
        h.update(f"\0verb:{verb} {verb_args}".encode())
    if listing is not None:
        h.update(f"\0listing:{listing}".encode())
    return f"probe-{Path(spec_path).stem}-{h.hexdigest()[:12]}"


def load_runtime_env(text: str | None) -> dict:
    """``--runtime-env``: JSON text, or a ``.json``/``.yaml`` file holding a mapping.

    Raises:
        SubmitError: for text that is neither, or a value that is not a mapping.
    """
    if not text:
        return {}
    import json

    import yaml

    path = Path(text)
    try:
        if not text.lstrip().startswith("{") and path.is_file():
            value = (
                yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
            )
        else:
            value = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SubmitError(
            f"--runtime-env {text!r} is neither a JSON object nor a readable .json/.yaml file: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(value, dict):
        raise SubmitError(f"--runtime-env must be a mapping (a JSON object), got {type(value).__name__}")
    if "working_dir" in value:
        raise SubmitError("--runtime-env: give the working directory with --working-dir, not working_dir")
    return value


EXCLUDES = [".git", ".venv", ".venv-bench", "out", "results", "__pycache__"]


def job_arguments(
    spec_path: str | Path,
    overrides: list[str],
    *,
    working_dir: str = ".",
    runtime_env: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    entrypoint_memory: int | None = None,
    verb: str = "run",
    verb_args: str = "",
) -> dict:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for a spec, less ``submission_id``.

    Raises:
        FileNotFoundError: when the spec is not inside ``working_dir`` (it is uploaded with it).
        SubmitError: for a bad ``--runtime-env`` or ``--verb-args``.
    """
    work = Path(working_dir).resolve()
    spec = Path(spec_path).resolve()
    try:
        rel_spec = spec.relative_to(work)
    except ValueError as exc:
        raise FileNotFoundError(
            f"spec {str(spec_path)!r} is not inside --working-dir {working_dir!r}; it must be uploaded with it"
        ) from exc
    extra = shlex.split(verb_args)
    _check_verb_args(verb, [str(rel_spec), *extra])
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    entrypoint = " ".join(
        x for x in (f"python -m cluster.cli {verb} {shlex.quote(str(rel_spec))}", shlex.join(extra), sets) if x
    )
    user = load_runtime_env(runtime_env)
    env = {**user, "working_dir": str(work), "excludes": [*EXCLUDES, *user.get("excludes", [])]}
    kwargs: dict = {"entrypoint": entrypoint, "runtime_env": env}
    for name, value in (
        ("entrypoint_num_cpus", entrypoint_num_cpus),
        ("entrypoint_num_gpus", entrypoint_num_gpus),
        ("entrypoint_memory", entrypoint_memory),
    ):
        if value is not None:
            if value < 0:
                raise SubmitError(f"--{name.replace('_', '-')} must be non-negative, got {value}")
            kwargs[name] = value
    return kwargs


def _check_verb_args(verb: str, argv: list[str]) -> None:
    import contextlib
    import io

    from cluster.cli import _parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text: the one line below says it
            _parser().parse_args([verb, *argv])
    except SystemExit:
        raise SubmitError(
            f"--verb-args {shlex.join(argv[1:])!r} are not arguments of `probe {verb}` (see probe {verb} --help)"
        ) from None


def _follow_or_new(client, base_id: str) -> tuple[str, bool]:
    """``(id, submit)``: the first of ``base_id``, ``base_id-2``, ... that is new (submit it) or
    pending, running or succeeded (follow it); failed and stopped jobs are passed over, so a
    re-submission after a failure runs again."""
    statuses = {j.submission_id: str(j.status).split(".")[-1] for j in client.list_jobs() if j.submission_id}
    n = 1
    while True:
        job_id = base_id if n == 1 else f"{base_id}-{n}"
        status = statuses.get(job_id)
        if status is None:
            return job_id, True
        if status not in ("FAILED", "STOPPED"):
            return job_id, False
        n += 1


def submit_job(
    address: str,
    spec_path: str,
    overrides: list[str],
    *,
    working_dir: str = ".",
    wait: bool = True,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
    runtime_env: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    entrypoint_memory: int | None = None,
    verb: str = "run",
    verb_args: str = "",
    checkpoints: tuple[str, ...] | list[str] = (),
    stop_on_signal: bool = False,
) -> int:
    """Submit ``probe run SPEC`` (or ``probe audit SPEC VERB_ARGS``) as a Ray job with the working
    directory uploaded.

    The submission id (:func:`submission_id`) covers the spec, the overrides, the verb and, for a
    job that ends by itself, the listing of ``checkpoints`` seen here: a job with that id that is
    pending, running or succeeded is followed instead of submitted again; after a failure, or
    when the listing changed, a new job runs what is not stored yet. Returns 0 when the job
    succeeded (or was submitted, with ``wait=False``), 1 otherwise.

    Raises:
        ConnectionError: when the Ray dashboard at ``address`` cannot be reached.
        SubmitError: for a bad ``--runtime-env`` or ``--verb-args``.
    """
    kwargs = job_arguments(
        spec_path,
        overrides,
        working_dir=working_dir,
        runtime_env=runtime_env,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_memory=entrypoint_memory,
        verb=verb,
        verb_args=verb_args,
    )
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        hint = ""
        if "authentication" in str(exc).lower():
            hint = "; the cluster requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
        raise ClusterUnreachable(
            f"cannot reach the Ray dashboard at --address {address!r}: {str(exc).splitlines()[0]}{hint}"
        ) from exc
    listing = checkpoint_listing(checkpoints) if one_shot(verb, verb_args) and checkpoints else None
    base_id = submission_id(Path(spec_path).resolve(), overrides, verb=verb, verb_args=verb_args, listing=listing)
    job_id, new = _follow_or_new(client, base_id)
    if not new:
        print(f"job {job_id} was already submitted; following it", file=sys.stderr)
    else:
        client.submit_job(submission_id=job_id, **kwargs)
        print(f"submitted {job_id}: {kwargs['entrypoint']}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    return _follow(client, job_id, timeout_s=timeout_s, poll_s=poll_s, stop_on_signal=stop_on_signal)


def _follow(client, job_id: str, *, timeout_s: float, poll_s: float, stop_on_signal: bool) -> int:
    """Stream the job's logs until it ends; with ``stop_on_signal``, SIGTERM or SIGINT asks Ray to
    stop it (its driver gets SIGTERM: an audit finishes its pass) and the logs are followed to the end."""
    stopping: list[int] = []
    previous = {}
    if stop_on_signal:

        def on_signal(signum, frame):  # noqa: ARG001
            if not stopping:
                print(f"probe submit: {signal.Signals(signum).name}: stopping job {job_id}", file=sys.stderr)
                stopping.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = time.monotonic() + timeout_s
        shown, asked = 0, False
        while True:
            if stopping and not asked:
                client.stop_job(job_id)
                asked = True
            status = str(client.get_job_status(job_id)).split(".")[-1]
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status in TERMINAL:
                break
            if time.monotonic() > deadline:
                print(
                    f"probe submit: job {job_id} still {status} after {timeout_s:g} s; it keeps running",
                    file=sys.stderr,
                )
                return 1
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        print(
            f"probe submit: job {job_id} {status}: {(info.message or '').splitlines()[0] if info.message else ''}",
            file=sys.stderr,
        )
        return 1
    return 0
