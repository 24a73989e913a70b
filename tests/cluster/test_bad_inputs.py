"""Bad inputs (issue 7): each gets a clear one-line reason naming the culprit and a non-zero exit,
and no partial Parquet file appears. Runs the real CLI in this process (local backend)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from cluster.checkpoints import CheckpointError, load_checkpoint
from cluster.cli import main
from probe.models import digits_mlp


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_header_with_offsets_past_the_end_is_refused_naming_the_tensor(tmp_path):
    path = raw_safetensors(
        tmp_path / "lies.safetensors", {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, b"\0" * 16
    )
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' has data_offsets \[0, 64\] past the end of the data \(16 bytes\)"
    ):
        load_checkpoint(path)


def test_safetensors_header_with_a_wrong_dtype_size_is_refused_naming_the_tensor(tmp_path):
    path = raw_safetensors(
        tmp_path / "lies.safetensors", {"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16
    )
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' declares shape \[4\] of F64 \(32 bytes\) but its data_offsets span 16"
    ):
        load_checkpoint(path)
    assert str(path) in str(pytest.raises(CheckpointError, load_checkpoint, path).value)


def spec(tmp_path: Path, checkpoints, probes, name="bad", **top) -> Path:
    s = {
        "name": name,
        "model": {
            "factory": "probe.models:digits_mlp",
            "kwargs": {"hidden": 16},
            "checkpoints": [str(c) for c in checkpoints],
        },
        "data": {"factory": "cluster.data:digits", "num_examples": 32, "batch_size": 16},
        "probes": probes,
        "output": {"path": str(tmp_path / "results")},
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(s))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def visible_parquet(tmp_path: Path, kind: str) -> list[Path]:
    return [p for p in (tmp_path / "results" / kind).rglob("*.parquet") if not p.name.startswith(".")]


def test_interpolation_endpoints_of_different_shapes_fail_naming_the_tensor(tmp_path, checkpoints, capsys):
    small = tmp_path / "small.safetensors"
    save_file(digits_mlp(hidden=8).state_dict(), str(small))
    probes = [{"kind": "barrier", "between": [str(checkpoints[0]), str(small)], "points": 5}]
    assert main(["run", str(spec(tmp_path, checkpoints[:1], probes))]) == 1
    err = one_line_error(capsys)
    assert (
        "1 of 1 task(s) failed" in err
        and str(small) in err
        and "tensor '1.weight' has shape (8, 64), the model expects (16, 64)" in err
    )
    assert visible_parquet(tmp_path, "barrier") == []


def test_nan_in_weights_fails_naming_the_tensor(tmp_path, capsys):
    model = digits_mlp(hidden=16)
    state = model.state_dict()
    state["3.bias"][2] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    assert main(["run", str(spec(tmp_path, [bad], [{"kind": "trace", "matvecs": 6}]))]) == 1
    err = one_line_error(capsys)
    assert "tensor '3.bias' holds 1 non-finite value(s)" in err and str(bad) in err
    assert visible_parquet(tmp_path, "trace") == []


def test_nan_loss_fails_naming_the_checkpoint_and_the_cause(tmp_path, checkpoints, capsys):
    path = spec(
        tmp_path,
        checkpoints[:1],
        [{"kind": "eigenvalues", "k": 1}],
        data={"factory": "faulty_data:nan_digits", "num_examples": 32, "batch_size": 16},
    )
    assert main(["run", str(path)]) == 1
    err = one_line_error(capsys)
    assert "non-finite loss (nan)" in err and str(checkpoints[0]) in err and "probe data for NaN/Inf" in err
    assert visible_parquet(tmp_path, "eigenvalues") == []


@pytest.mark.parametrize(
    "change, code, message",
    [
        (
            {"model": {"factory": "nope.module:fn", "checkpoints": []}},
            2,
            "probe run: model.factory: cannot import module 'nope.module'",
        ),
        (
            {"data": {"factory": "cluster.data:digits", "num_examples": 5000, "batch_size": 16}},
            2,
            "probe run: data.factory: num_examples=5000 exceeds the dataset size",
        ),
        (
            {"data": {"factory": "cluster.data:digits", "num_examples": -3, "batch_size": 16}},
            2,
            "probe run: data.num_examples must be a positive integer, got -3",
        ),
        ({"probes": [{"kind": "trace", "matvecs": "many"}]}, 2, "probe run: probes[trace].matvecs must be"),
        (
            {"cluster": {"address": "127.0.0.1:1", "num_workers": 2}},
            3,
            "probe run: cannot reach the Ray cluster at cluster.address='127.0.0.1:1'",
        ),
    ],
)
def test_bad_specs_and_addresses_exit_non_zero_with_one_line(tmp_path, checkpoints, capsys, change, code, message):
    path = spec(tmp_path, checkpoints[:1], [{"kind": "trace", "matvecs": 6}])
    raw = yaml.safe_load(path.read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    if raw["model"].get("checkpoints") == []:
        raw["model"]["checkpoints"] = [str(checkpoints[0])]
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == code
    # an unreachable address: the message is raytools' own TCP check, made before ray.init (which
    # would retry for minutes), so the fast path is shown by what failed, not by a clock
    err = one_line_error(capsys)
    assert err.startswith(message), err
    assert not (tmp_path / "results").exists()


def this_machines_other_addresses() -> set[str]:
    """IPv4 addresses of this machine outside 127.0.0.0/8: its hostname's, ``ip -4 addr``'s and the
    kernel's local routes (``/proc/net/fib_trie``). No other host is named or contacted. May be empty."""
    import ipaddress
    import re
    import shutil
    import socket
    import subprocess

    found: set[str] = set()
    try:
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    if ip := shutil.which("ip"):
        out = subprocess.run(
            [ip, "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        found.update(re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out))
    try:  # "|-- A.B.C.D" followed by "/32 host LOCAL": an address of this machine
        found.update(
            re.findall(r"\|-- (\d+\.\d+\.\d+\.\d+)\n\s+/32 host LOCAL", Path("/proc/net/fib_trie").read_text())
        )
    except OSError:
        pass
    return {a for a in found if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified}


def where_it_answers(server) -> dict:
    """Bound address of a running metrics server, whether 127.0.0.1:port answers /metrics, and how a
    connection to each of this machine's other addresses at that port ends."""
    import socket
    import urllib.request

    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        loopback = response.status
    others = {}
    for address in sorted(this_machines_other_addresses()):
        try:
            with socket.create_connection((address, port), timeout=5):
                others[address] = "connected"
        except ConnectionRefusedError:
            others[address] = "refused"
        except OSError as exc:
            others[address] = f"{type(exc).__name__}: {exc}"
    return {"bound": host, "loopback": loopback, "others": others}


def test_every_http_endpoint_binds_to_loopback_by_default(tmp_path, checkpoints, monkeypatch):
    """serve(), the demo's endpoint and the endpoints of `probe run/audit --metrics-port` bind 127.0.0.1
    unless --metrics-addr says otherwise: measured on the live sockets, not read from the source."""
    import cluster.metrics
    from cluster.cli import _parser
    from cluster.demo import _serve_metrics
    from cluster.metrics import Metrics, serve

    def loopback_only(seen: dict) -> None:
        assert seen["bound"] == "127.0.0.1" and seen["loopback"] == 200, seen
        assert all(outcome == "refused" for outcome in seen["others"].values()), seen

    server, _ = serve(Metrics(), port=0)
    try:
        loopback_only(where_it_answers(server))
    finally:
        server.shutdown()
    server = _serve_metrics(Metrics(), 0)  # the demo's own call
    try:
        loopback_only(where_it_answers(server))
    finally:
        server.shutdown()

    # the CLI's endpoints, checked while the verb runs (the verb shuts its server down before returning)
    real_serve, seen = cluster.metrics.serve, []

    def checked_serve(metrics, **kwargs):
        server, thread = real_serve(metrics, **kwargs)
        seen.append(where_it_answers(server))
        return server, thread

    monkeypatch.setattr(cluster.metrics, "serve", checked_serve)
    path = spec(tmp_path, checkpoints[:1], [{"kind": "trace", "matvecs": 6}])
    assert main(["run", str(path), "--metrics-port", "0"]) == 0
    assert main(["audit", str(path), "--once", "--metrics-port", "0"]) == 0
    assert len(seen) == 2
    for s in seen:
        loopback_only(s)
    assert (
        _parser().parse_args(["run", "s.yaml", "--metrics-addr", "0.0.0.0"]).metrics_addr == "0.0.0.0"
    )  # configurable


def test_a_local_ray_instance_is_started_on_loopback_without_a_dashboard(monkeypatch):
    """connect() with no address starts Ray on 127.0.0.1 and without the dashboard (no HTTP endpoint);
    shown by the arguments Ray receives, without starting it. A stand-in module takes ray's place:
    importing the real one here would fix Ray's settings (its auth mode) for the whole test session,
    before the session's token-authenticated head is started."""
    import types

    from cluster.raytools import connect

    calls = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)  # connect() must set it itself
    connect(None, num_cpus=2)
    (kwargs,) = calls
    assert kwargs["address"] == "local"
    assert kwargs["_node_ip_address"] == "127.0.0.1" and kwargs["include_dashboard"] is False
    # without it Ray replaces 127.0.0.1 with the host's network address (read when Ray is imported; the
    # conftest sets it for the session, so this shows connect() sets it for a process that does not)
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
