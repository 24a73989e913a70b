"""Checkpoints (cluster/checkpoints.py): safe loading of safetensors and PyTorch files,
refusal of code-running pickles and damaged files, expansion of entries, hashing."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from pathlib import Path

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
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True)")
    ):
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
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {str(path)!r} holds a list, expected a state dict")
    ):
        load_checkpoint(path)


def test_pytorch_state_dict_with_non_tensor_entries_is_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {str(path)!r}: entries ['epoch'] are not tensors")
    ):
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
    (folder / "nested" / "deep.pt").write_bytes(b"x")  # one level down, one weights file: a checkpoint
    (folder / "nested" / "deeper").mkdir()
    (folder / "nested" / "deeper" / "deepest.pt").write_bytes(b"x")  # two levels down: not searched
    (folder / "two").mkdir()
    for name in ("x.pt", "y.pt"):  # several weights files: not one checkpoint, not listed
        (folder / "two" / name).write_bytes(b"x")
    return folder


def test_folder_expands_to_its_checkpoint_files_sorted_and_one_level_down(ckpt_folder):
    got = expand_checkpoints([str(ckpt_folder)])
    want = ["a.pt", "b.safetensors", "c.pth", "d.bin", "e.safetensors", "nested/deep.pt"]
    assert got == [str(ckpt_folder / n) for n in want]


def test_glob_and_file_entries_keep_entry_order_and_drop_duplicates(ckpt_folder):
    entries = [str(ckpt_folder / "e.safetensors"), str(ckpt_folder / "*.safetensors"), str(ckpt_folder / "a.pt")]
    got = expand_checkpoints(entries)
    assert got == [str(ckpt_folder / n) for n in ["e.safetensors", "b.safetensors", "a.pt"]]
    assert expand_checkpoints((str(ckpt_folder / "[ab].*"),)) == [
        str(ckpt_folder / "a.pt"),
        str(ckpt_folder / "b.safetensors"),
    ]


def test_training_state_files_are_never_checkpoints(ckpt_folder):
    from cluster.checkpoints import is_auxiliary

    aux = [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "rng_state_3.pth",
        "training_args.bin",
        "scaler.pt",
        "optimizer.bin",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainer_state.json",
        "config.json",
    ]
    for name in aux:
        (ckpt_folder / name).write_bytes(b"x")
        (ckpt_folder / "nested" / name).write_bytes(b"x")
    assert all(is_auxiliary(n) for n in aux)
    assert not any(
        is_auxiliary(n)
        for n in [
            "pytorch_model.bin",
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            "step-3.pt",
            "optimum.pt",
        ]
    )
    got = expand_checkpoints([str(ckpt_folder)])
    assert got == [
        str(ckpt_folder / n) for n in ["a.pt", "b.safetensors", "c.pth", "d.bin", "e.safetensors", "nested/deep.pt"]
    ]
    assert expand_checkpoints([str(ckpt_folder / "*.p*")]) == [str(ckpt_folder / n) for n in ["a.pt", "c.pth"]]


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
    data = bytes(
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8).tolist()
    )
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(str(path), chunk_bytes=4096) == want


# --- series order and sharded checkpoints ----------------------------------------------


def test_folder_and_glob_order_is_natural(tmp_path):
    for step in (10, 9, 100, 1):
        (tmp_path / f"step-{step}.pt").write_bytes(b"x")
    want = [str(tmp_path / f"step-{s}.pt") for s in (1, 9, 10, 100)]
    assert expand_checkpoints([str(tmp_path)]) == want
    assert expand_checkpoints([str(tmp_path / "step-*.pt")]) == want


def _sharded(folder: Path, model: torch.nn.Module, meta: dict | None = None) -> Path:
    """Save ``model`` as two safetensors shards and a Hugging Face style index."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / file), metadata={"step": "7"})
    index = folder / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": meta or {"total_size": 1, "lr": 0.25},
                "weight_map": {k: f for f, keys in halves.items() for k in keys},
            }
        )
    )
    return index


def test_sharded_index_loads_every_tensor_and_the_folder_lists_only_the_index(tmp_path):
    from probe.models import digits_mlp

    model = digits_mlp(hidden=8)
    index = _sharded(tmp_path, model)
    (tmp_path / "other.safetensors").write_bytes(b"x")
    assert expand_checkpoints([str(tmp_path)]) == [str(index), str(tmp_path / "other.safetensors")]
    state, meta = load_checkpoint(index)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert meta["step"] == "7" and meta["lr"] == 0.25


def test_sharded_hash_covers_every_shard_and_a_missing_shard_is_named(tmp_path):
    from cluster.checkpoints import checkpoint_sha256
    from probe.models import digits_mlp

    index = _sharded(tmp_path, digits_mlp(hidden=8))
    first = checkpoint_sha256(index)
    assert first == checkpoint_sha256(index) and first != file_sha256(index)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert checkpoint_sha256(index) != first  # a changed shard is a changed checkpoint
    shard.unlink()
    for call in (checkpoint_sha256, load_checkpoint):
        with pytest.raises(CheckpointError, match=re.escape(f"names shard {shard.name!r}, which does not exist")):
            call(index)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not readable JSON"),
        ('{"metadata": {}}', "has no 'weight_map'"),
        ('{"weight_map": {"w": "../escape.safetensors"}}', "outside its folder"),
    ],
)
def test_bad_index_is_refused_naming_the_fault(tmp_path, text, message):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(index)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    from probe.models import digits_mlp

    index = _sharded(tmp_path, digits_mlp(hidden=8))
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=re.escape("tensor 'ghost.weight' is not in its shard 'model-00001-of-00002.safetensors'")
    ):
        load_checkpoint(index)


def test_save_sharded_round_trips_a_gpt_and_a_stage_reads_only_its_shards(tmp_path):
    from cluster.checkpoints import ReadStats, save_sharded
    from cluster.pipeline import stage_bounds, stage_parameter_names
    from probe.gpt import gpt

    model = gpt(vocab=32, dim=16, layers=4, heads=2, max_len=8)
    state = model.state_dict()
    index = save_sharded(state, tmp_path, max_shard_bytes=12_000, metadata={"lr": "0.1"})
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not list(tmp_path.glob(".*tmp"))
    everything = ReadStats()
    back, meta = load_checkpoint(index, stats=everything)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    assert meta["lr"] == "0.1" and sorted(everything.files) == shards
    # the first of three pipeline stages asks for its own tensors: only the shards holding them are opened
    names = stage_parameter_names(model, stage_bounds(model, 3)[0])
    mine = ReadStats()
    part, _ = load_checkpoint(index, keys=names, stats=mine)
    assert sorted(part) == sorted(names) and all(torch.equal(part[k], state[k]) for k in names)
    assert mine.tensors == len(names) and mine.bytes == sum(state[k].numel() * 4 for k in names)
    assert mine.bytes < everything.bytes / 2 and len(mine.files) < len(shards)
    with pytest.raises(CheckpointError, match=r"has no tensors \['ghost'\] in its weight_map"):
        load_checkpoint(index, keys=["ghost"])
