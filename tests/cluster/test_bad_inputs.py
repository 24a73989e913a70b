"""Bad inputs (issue 7): each gets a clear one-line reason naming the culprit and a non-zero exit,
and no partial Parquet file appears. Runs the real CLI in this process (local backend)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
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
    path = raw_safetensors(tmp_path / "lies.safetensors",
                           {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w' has data_offsets \[0, 64\] past the end of the data \(16 bytes\)"):
        load_checkpoint(path)


def test_safetensors_header_with_a_wrong_dtype_size_is_refused_naming_the_tensor(tmp_path):
    path = raw_safetensors(tmp_path / "lies.safetensors",
                           {"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w' declares shape \[4\] of F64 \(32 bytes\) but its data_offsets span 16"):
        load_checkpoint(path)
    assert str(path) in str(pytest.raises(CheckpointError, load_checkpoint, path).value)


def spec(tmp_path: Path, checkpoints, probes, name="bad", **top) -> Path:
    s = {
        "name": name,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 16}, "checkpoints": [str(c) for c in checkpoints]},
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
    assert "1 of 1 task(s) failed" in err and str(small) in err and "tensor '1.weight' has shape (8, 64), the model expects (16, 64)" in err
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
    path = spec(tmp_path, checkpoints[:1], [{"kind": "eigenvalues", "k": 1}],
                data={"factory": "faulty_data:nan_digits", "num_examples": 32, "batch_size": 16})
    assert main(["run", str(path)]) == 1
    err = one_line_error(capsys)
    assert "non-finite loss (nan)" in err and str(checkpoints[0]) in err and "probe data for NaN/Inf" in err
    assert visible_parquet(tmp_path, "eigenvalues") == []


@pytest.mark.parametrize("change, code, message", [
    ({"model": {"factory": "nope.module:fn", "checkpoints": []}}, 2,
     "probe run: model.factory: cannot import module 'nope.module'"),
    ({"data": {"factory": "cluster.data:digits", "num_examples": 5000, "batch_size": 16}}, 2,
     "probe run: data.factory: num_examples=5000 exceeds the dataset size"),
    ({"data": {"factory": "cluster.data:digits", "num_examples": -3, "batch_size": 16}}, 2,
     "probe run: data.num_examples must be a positive integer, got -3"),
    ({"probes": [{"kind": "trace", "matvecs": "many"}]}, 2, "probe run: probes[trace].matvecs must be"),
    ({"cluster": {"address": "127.0.0.1:1", "num_workers": 2}}, 3,
     "probe run: cannot reach the Ray cluster at cluster.address='127.0.0.1:1'"),
])
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


def test_every_http_endpoint_defaults_to_loopback():
    """run/audit serve metrics on 127.0.0.1 unless --metrics-addr says otherwise; the demo and serve() too."""
    import inspect

    from cluster.cli import _parser
    from cluster.demo import _serve_metrics
    from cluster.metrics import serve

    p = _parser()
    assert p.parse_args(["run", "s.yaml"]).metrics_addr == "127.0.0.1"
    assert p.parse_args(["audit", "s.yaml", "--once"]).metrics_addr == "127.0.0.1"
    assert p.parse_args(["run", "s.yaml", "--metrics-addr", "0.0.0.0"]).metrics_addr == "0.0.0.0"  # configurable
    assert inspect.signature(serve).parameters["addr"].default == "127.0.0.1"
    assert "addr=" not in inspect.getsource(_serve_metrics)  # the demo keeps serve()'s loopback default
