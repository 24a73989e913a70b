"""Bad Hugging Face inputs: each ``probe run`` exits 2 with one line naming the file and the fix,
before any Ray cluster starts (the spec asks for two Ray workers on a local instance, whose
start would print to stderr), and leaves no result rows."""

from __future__ import annotations

import json
import subprocess
import sys

import hf_files
import pytest
import torch
import yaml


def run_cli(spec_path):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", str(spec_path)], capture_output=True, text=True, timeout=300
    )


def spec_for(tmp_path, model_dir, **model):
    raw = {
        "name": "bad-hf",
        "model": {"hf": str(model_dir), **model},
        "data": hf_files.token_data(tmp_path, batch_size=4),
        "loss": "causal_lm",
        "probes": [{"kind": "eigenvalues", "k": 1}],
        "cluster": {"num_workers": 2, "backend": "ray"},
        "output": {"path": str(tmp_path / "results")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def assert_one_line_and_nothing_written(result, tmp_path, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no Ray start-up output: nothing started
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list((tmp_path / "results").rglob("*.parquet")) if (tmp_path / "results").exists() else True


@pytest.fixture
def llama(tmp_path):
    folder = tmp_path / "llama"
    hf_files.write_model("llama_tied", folder)
    return folder


def test_a_config_transformers_cannot_build(tmp_path, llama):
    edit_config(llama, model_type="no-such-family")
    result = run_cli(spec_for(tmp_path, llama))
    assert_one_line_and_nothing_written(result, tmp_path, str(llama / "config.json"), "cannot be read by transformers")


def test_weights_that_do_not_match_their_config(tmp_path, llama):
    edit_config(llama, hidden_size=16, intermediate_size=32)  # the weights were written for hidden_size 8
    result = run_cli(spec_for(tmp_path, llama))
    assert_one_line_and_nothing_written(
        result,
        tmp_path,
        "model.safetensors.index.json",
        "model.embed_tokens.weight",
        "has shape (32, 8), the model expects (32, 16)",
        "the weights were not written for this config",
    )


def test_weights_missing_a_tensor_that_no_tie_covers(tmp_path, llama):
    index = llama / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    del raw["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(raw))
    result = run_cli(spec_for(tmp_path, llama))
    assert_one_line_and_nothing_written(result, tmp_path, "missing keys ['model.norm.weight']")


@pytest.mark.parametrize("where", ["config", "spec"])
def test_attention_without_a_double_backward(tmp_path, llama, where):
    if where == "config":
        edit_config(llama, _attn_implementation="flash_attention_2")
        result = run_cli(spec_for(tmp_path, llama))
        needles = ("the config's attn_implementation", "is 'flash_attention_2'", str(llama / "config.json"))
    else:
        result = run_cli(spec_for(tmp_path, llama, attn_implementation="flash_attention_2"))
        needles = ("model.attn_implementation 'flash_attention_2' has no double backward",)
    assert_one_line_and_nothing_written(result, tmp_path, *needles, "sdpa", "eager")


def test_a_run_folder_of_optimizer_files_only(tmp_path):
    run = tmp_path / "run" / "checkpoint-10"
    run.mkdir(parents=True)
    torch.save({"state": {}}, run / "optimizer.pt")
    torch.save({"rng": torch.zeros(3)}, run / "rng_state.pth")
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    result = run_cli(spec_for(tmp_path, tmp_path / "run"))
    assert_one_line_and_nothing_written(result, tmp_path, str(tmp_path / "run"))


def test_unshifted_labels_with_the_shifting_free_loss_are_refused(tmp_path, llama):
    spec = spec_for(tmp_path, llama)
    raw = yaml.safe_load(spec.read_text())
    raw["loss"] = "lm_cross_entropy"
    spec.write_text(yaml.safe_dump(raw))
    result = run_cli(spec)
    assert_one_line_and_nothing_written(result, tmp_path, "labels equal input_ids", "use loss: causal_lm")
