"""Checkpoints (cluster/checkpoints.py): safe loading of safetensors and PyTorch files,
refusal of code-running pickles and damaged files, expansion of entries, hashing."""

from __future__ import annotations

import hashlib
import pathlib
import re

import pytest
import torch
from safetensors.torch import save_file

from cluster.checkpoints import CheckpointError, expand_checkpoints, file_sha256, load_checkpoint


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "layer.bias": torch.randn(4, generator=g),
        "steps": torch.arange(5),
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


class RunsCode:
    """A pickle that would create ``marker`` when unpickled by a full (unsafe) loader."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# --- loading ------------------------------------------------------------------------


def test_safetensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(state_dict(), str(path), metadata={"lr": "0.1", "step": "100"})
    state, meta = load_checkpoint(path)
    assert_same_state(state, state_dict())
    assert meta == {"lr": "0.1", "step": "100"}


def test_safetensors_without_metadata_gives_empty_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(state_dict(), str(path))
    assert load_checkpoint(str(path))[1] == {}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pytorch_bare_state_dict_round_trip(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(state_dict(), path)
    state, meta = load_checkpoint(path)
    assert_same_state(state, state_dict())
    assert meta == {}


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_pytorch_wrapped_state_dict_returns_the_rest_as_metadata(tmp_path, key):
    path = tmp_path / "model.pt"
    torch.save({key: state_dict(), "lr": 0.05, "step": 300, "optimizer": "sgd"}, path)
    state, meta = load_checkpoint(path)
    assert_same_state(state, state_dict())
    assert meta == {"lr": 0.05, "step": 300, "optimizer": "sgd"}


def test_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"layer.weight": torch.zeros(2), "payload": RunsCode(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True)")):
        load_checkpoint(path)
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_whole_file_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.bin"
    torch.save(RunsCode(marker), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_safetensors_is_refused_naming_the_file(tmp_path, keep):
    good = tmp_path / "good.safetensors"
    save_file(state_dict(), str(good))
    data = good.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} is not a valid safetensors file")):
        load_checkpoint(path)


def test_garbage_safetensors_is_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_corrupt_pytorch_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} cannot be loaded safely")):
        load_checkpoint(path)


def test_truncated_zip_pytorch_file_is_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(state_dict(), good)
    path = tmp_path / "truncated.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} cannot be loaded safely")):
        load_checkpoint(path)


def test_truncated_pytorch_file_is_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(state_dict(), good, _use_new_zipfile_serialization=False)
    path = tmp_path / "truncated.pt"
    path.write_bytes(good.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} does not exist")):
        load_checkpoint(path)


def test_pytorch_file_holding_a_non_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} holds a list, expected a state dict")):
        load_checkpoint(path)


def test_pytorch_state_dict_with_non_tensor_entries_is_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r}: entries ['epoch'] are not tensors")):
        load_checkpoint(path)


# --- expansion ----------------------------------------------------------------------


@pytest.fixture
def ckpt_folder(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ["b.safetensors", "a.pt", "c.pth", "d.bin", "notes.txt", "e.safetensors"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub.pt").mkdir()  # a folder with a checkpoint suffix is not a file
    (folder / "nested").mkdir()
    (folder / "nested" / "deep.pt").write_bytes(b"x")
    return folder


def test_folder_expands_to_its_checkpoint_files_sorted_non_recursive(ckpt_folder):
    got = expand_checkpoints([str(ckpt_folder)])
    assert got == [str(ckpt_folder / n) for n in ["a.pt", "b.safetensors", "c.pth", "d.bin", "e.safetensors"]]


def test_glob_and_file_entries_keep_entry_order_and_drop_duplicates(ckpt_folder):
    entries = [str(ckpt_folder / "e.safetensors"), str(ckpt_folder / "*.safetensors"), str(ckpt_folder / "a.pt")]
    got = expand_checkpoints(entries)
    assert got == [str(ckpt_folder / n) for n in ["e.safetensors", "b.safetensors", "a.pt"]]
    assert expand_checkpoints((str(ckpt_folder / "[ab].*"),)) == [str(ckpt_folder / "a.pt"), str(ckpt_folder / "b.safetensors")]


@pytest.mark.parametrize("entry", ["missing.safetensors", "*.nothing", "empty"])
def test_entry_matching_nothing_raises_naming_the_entry(ckpt_folder, entry):
    (ckpt_folder / "empty").mkdir()
    (ckpt_folder / "empty" / "readme.txt").write_text("no checkpoints here")
    full = str(ckpt_folder / entry)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint entry {full!r} matches no file")):
        expand_checkpoints([str(ckpt_folder / "a.pt"), full])


# --- hashing ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * (1 << 20) + 7])
def test_file_sha256_equals_hashlib(tmp_path, size):
    path = tmp_path / "blob.bin"
    data = bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8).tolist())
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(str(path), chunk_bytes=4096) == want
