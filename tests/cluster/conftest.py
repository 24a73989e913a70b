"""Fixtures for the cluster tests: real checkpoints on disk, job specs, and one real
Ray head for the whole session (started with ``ray start --head`` on loopback, with
token authentication on, and stopped by its process group at the end).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

# Keep Ray on loopback (it replaces 127.0.0.1 with the host's address otherwise);
# read by Ray at import time, so set before anything imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from services import free_port  # noqa: E402  (tests/services.py; the tests import it from here)

from probe.models import digits_mlp  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two digits_mlp(hidden=16) checkpoints (safetensors, with a learning rate in the metadata)."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = digits_mlp(hidden=16)
        path = folder / f"mlp-seed{seed}.safetensors"
        save_file(model.state_dict(), str(path), metadata={"lr": "0.1", "step": str(100 * seed)})
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """``probe demo`` run twice in its own process (the second run finds everything stored):
    ``(out folder, first stdout, second stdout)``; its results hold every dataset of the product."""
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [sys.executable, "-m", "cluster.cli", "demo", "--out", str(out), "--metrics-port", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first.stdout, second.stdout


@pytest.fixture
def make_spec(tmp_path, checkpoints):
    """``make_spec(**overrides) -> Path``: write a small float64 digits spec into tmp_path."""

    def make(name: str = "digits-test", probes=None, cluster=None, output=None, num_examples: int = 192, **top) -> Path:
        spec = {
            "name": name,
            "model": {
                "factory": "probe.models:digits_mlp",
                "kwargs": {"hidden": 16},
                "checkpoints": [str(p) for p in checkpoints],
            },
            "data": {"factory": "cluster.data:digits", "num_examples": num_examples, "batch_size": 50},
            "precision": "float64",
            "probes": probes
            or [
                {"kind": "eigenvalues", "k": 3},
                {"kind": "trace", "matvecs": 30},
                {"kind": "spectrum", "runs": 3, "steps": 25},
            ],
            "cluster": cluster or {},
            "output": {"path": str(output or tmp_path / "results")},
            "seed": 7,
            **top,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return make


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head on loopback for the session; yields its GCS and dashboard addresses.

    Token authentication is on, with a token generated for this session.
    """
    tmp = tmp_path_factory.mktemp("ray")
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(16))
    gcs_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
    }
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    ray_exe = str(Path(sys.executable).parent / "ray")
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(
        [
            ray_exe,
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--metrics-export-port={metrics_port}",
            "--num-cpus=4",
            "--disable-usage-stats",
            f"--temp-dir={tmp / 't'}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import ray

    address = f"127.0.0.1:{gcs_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except Exception as exc:
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                raise RuntimeError(f"the Ray head did not start; see {tmp / 'head.log'}") from exc
            time.sleep(1)
    yield {
        "address": address,
        "dashboard": f"http://127.0.0.1:{dash_port}",
        "env": env,
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
    }
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:  # Ray's children share the session's process group
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
