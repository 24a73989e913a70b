"""Test helpers shared by tests/cluster and tests/deploy: the real Prometheus and Pushgateway
binaries (Debian's, installed by ``make system``) started on loopback, waited for, queried and
stopped. ``tests/`` is on ``sys.path`` through its ``conftest.py``."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    assert path, f"{binary!r} not found: `make system` installs Debian's {package} package"
    return path


def start_prometheus(tmp_path: Path, target_port: int) -> tuple[subprocess.Popen, str, Path]:
    """A real Prometheus on a free loopback port scraping ``127.0.0.1:target_port`` every second
    (job ``landscape-probe``): ``(process, base URL, log file)``."""
    binary = need("prometheus", "prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "landscape-probe", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
                ],
            }
        )
    )
    log, port = tmp_path / "prometheus.log", free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--log.level=warn",
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", log


def start_pushgateway(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    """A real Pushgateway on a free loopback port, without persistence: ``(process, URL, log file)``."""
    binary = need("prometheus-pushgateway", "prometheus-pushgateway")
    port, log = free_port(), tmp_path / "pushgateway.log"
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=", "--log.level=warn"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", log


def ready(url: str) -> bool:
    return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200


def wait_for(what: str, check, timeout_s: float, procs=()):
    """Poll ``check()`` until it returns something true (an ``OSError`` counts as not yet),
    failing at once when one of ``procs`` (``(process, log file)`` pairs) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p, log in procs:
            assert p.poll() is None, f"{p.args[0]} exited with {p.returncode}:\n{Path(log).read_text()[-3000:]}"
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, expr: str) -> list[dict]:
    """An instant query against the Prometheus at ``base``: its result list."""
    with urllib.request.urlopen(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
        reply = json.load(r)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]
