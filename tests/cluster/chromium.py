"""Headless Chromium for the report tests: Debian's ``chromium`` binary, run on a local page."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    """The ``chromium`` executable; fails the test (no skip) when it is not on PATH."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "the `chromium` binary is not on PATH: the report's browser test needs Debian's chromium "
            "package, which .ci/run installs (apt-get install chromium)"
        )
    return exe


def browse(exe: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium with a fresh ``profile`` folder and ``extra`` flags."""
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C.UTF-8"})


def page_errors(stderr: str) -> list[str]:
    """Console messages, uncaught errors and failed loads of the page in Chromium's log."""
    return [
        line
        for line in stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or ("index.html" in line and "ERR_" in line)
    ]
