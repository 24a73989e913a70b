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
import sys
import time
from pathlib import Path

from cluster.errors import ProbeError

__all__ = ["connect", "submit_job", "submission_id", "ClusterUnreachable"]


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


def submission_id(spec_path: str | Path, overrides: list[str]) -> str:
    """Deterministic Ray job id: the same spec text and overrides give the same id."""
    h = hashlib.sha256(Path(spec_path).read_bytes())
    for o in overrides:
        h.update(b"\0" + o.encode())
    return f"probe-{Path(spec_path).stem}-{h.hexdigest()[:12]}"


def submit_job(
    address: str,
    spec_path: str,
    overrides: list[str],
    *,
    working_dir: str = ".",
    wait: bool = True,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
) -> int:
    """Submit ``probe run SPEC`` as a Ray job with the working directory uploaded.

    A job with the same submission id that already exists is not submitted again:
    it is waited for (or reported). Returns 0 when the job succeeded (or was
    submitted, with ``wait=False``), 1 otherwise.

    Raises:
        ConnectionError: when the Ray dashboard at ``address`` cannot be reached.
    """
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
    work = Path(working_dir).resolve()
    spec = Path(spec_path).resolve()
    try:
        rel_spec = spec.relative_to(work)
    except ValueError as exc:
        raise FileNotFoundError(
            f"spec {spec_path!r} is not inside --working-dir {working_dir!r}; it must be uploaded with it"
        ) from exc
    job_id = submission_id(spec, overrides)
    sets = " ".join(f"--set {o!r}" for o in overrides)
    entrypoint = f"python -m cluster.cli run {str(rel_spec)!r} {sets}".strip()
    existing = {j.submission_id for j in client.list_jobs()}
    if job_id in existing:
        print(f"job {job_id} was already submitted; following it", file=sys.stderr)
    else:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={
                "working_dir": str(work),
                "excludes": [".git", ".venv", ".venv-bench", "out", "results", "__pycache__"],
            },
        )
        print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            print(f"probe submit: job {job_id} still {status} after {timeout_s:g} s; it keeps running", file=sys.stderr)
            return 1
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        print(
            f"probe submit: job {job_id} {status}: {(info.message or '').splitlines()[0] if info.message else ''}",
            file=sys.stderr,
        )
        return 1
    return 0
