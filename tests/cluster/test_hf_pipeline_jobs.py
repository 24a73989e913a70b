"""Hugging Face checkpoints split over workers through ``probe run``: pipeline stages
(``cluster.stages``), parameter shards (``cluster.shard_parameters``) and the data-parallel
fallback for a family the pipeline does not know.

Each job's λ_max, λ_min and Hutch++ trace equal those of the independent dense Hessian of
:mod:`hf_files` (transformers' own loading and loss, ``jacfwd(grad)``), within the
operator's measured symmetry defect, and every row says how the products were formed
(``hvp``) and how the workers held the model (``layout``).
"""

from __future__ import annotations

import math
import warnings

import hf_files
import pytest
import torch
import yaml
from test_hf_models import check_against_dense, read, write_spec

from cluster.cli import main
from cluster.spec import SpecError, parse_spec


def test_pipeline_stages_of_a_saved_hf_model_equal_its_dense_hessian(tmp_path):
    """Two stages on two processes: the embedding and the tied head on different workers (every family
    and 3 stages, 2 × 2 grids: tests/cluster/test_hf_stages.py)."""
    spec_path, model, model_dir, tokens = write_spec(
        tmp_path, "llama_tied", extra={"cluster": {"num_workers": 2, "stages": 2, "backend": "process"}}
    )
    assert main(["run", str(spec_path)]) == 0
    rows, expected, _, tol = check_against_dense(tmp_path, model, model_dir, tokens)
    assert all(r["layout"] == "pipeline 2 stages x 1 replicas (overlap)" for r in rows)
    assert all(r["attention"] == "sdpa (math kernel)" for r in rows)
    assert math.isclose(rows[-1]["trace"], expected, rel_tol=0, abs_tol=tol * 10), (rows[-1]["trace"], expected)


def test_parameter_shards_of_a_saved_hf_model_equal_its_dense_hessian(tmp_path):
    spec_path, model, model_dir, tokens = write_spec(
        tmp_path,
        "llama_untied",
        extra={"cluster": {"num_workers": 2, "shard_parameters": True, "backend": "process"}},
    )
    assert main(["run", str(spec_path)]) == 0
    rows, _, exact, tol = check_against_dense(tmp_path, model, model_dir, tokens)
    assert all(r["layout"] == "parameter-sharded over 2" for r in rows)
    tr = rows[-1]
    assert abs(tr["trace"] - exact) <= 4 * tr["trace_stderr"] + tol * 10, (tr["trace"], exact, tr["trace_stderr"])


def test_a_family_the_pipeline_does_not_know_runs_data_parallel_with_a_note(tmp_path, capsys):
    import transformers

    config = transformers.OPTConfig(
        vocab_size=hf_files.VOCAB,
        hidden_size=8,
        ffn_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        word_embed_proj_dim=8,
    )
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "opt")
    raw = {
        "name": "opt-fallback",
        "model": {"hf": str(tmp_path / "opt")},
        "data": hf_files.token_data(tmp_path, batch_size=4),
        "loss": "causal_lm",
        "probes": [{"kind": "eigenvalues", "k": 1, "tol": 1e-8}],
        "cluster": {"num_workers": 2, "stages": 2, "backend": "process"},
        "output": {"path": str(tmp_path / "results")},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "spec.yaml")]) == 0
    out = capsys.readouterr()
    note = [line for line in (out.out + out.err).splitlines() if "running it data-parallel instead" in line]
    assert len(note) == 1 and "OPTForCausalLM is not a known decoder family" in note[0], note
    row = read(tmp_path / "results", "eigenvalues")[0]
    assert row["layout"] == "replicated" and row["world_size"] == 2 and math.isfinite(row["eigenvalues"][0])


def spec(**extra) -> dict:
    return {
        "name": "s",
        "model": {"hf": "m"},
        "data": {"factory": "a:b"},
        "probes": [{"kind": "eigenvalues"}],
        **extra,
    }


def test_split_model_specs_refuse_what_they_cannot_run_in_one_line():
    with pytest.raises(SpecError, match=r"finite differences under FSDP were measured and not built"):
        parse_spec(spec(hvp="finite_difference"))
    with pytest.raises(SpecError, match=r"loss: model needs the whole model's output on one worker"):
        parse_spec(spec(loss="model", cluster={"num_workers": 2, "stages": 2}))
    with pytest.raises(SpecError, match=r"two ways to split a model; choose one"):
        parse_spec(spec(cluster={"num_workers": 2, "stages": 2, "shard_parameters": True}))
    with pytest.raises(SpecError, match=r"cluster.shard_parameters runs float32 or float64 products"):
        parse_spec(spec(precision="bfloat16", cluster={"num_workers": 2, "shard_parameters": True}))
    with pytest.raises(SpecError, match=r"probes\[sharpness\] needs the whole model.*set cluster.shard_parameters"):
        parse_spec(spec(probes=[{"kind": "sharpness"}], cluster={"num_workers": 2, "shard_parameters": True}))
    with pytest.raises(SpecError, match=r"cluster.schedule must be overlap or sequential"):
        parse_spec(spec(cluster={"schedule": "interleaved"}))
    with pytest.raises(SpecError, match=r"cluster.micro_batches must be a positive integer"):
        parse_spec(spec(cluster={"micro_batches": 0}))
    ok = parse_spec(spec(cluster={"num_workers": 2, "stages": 2, "micro_batches": 2, "schedule": "sequential"}))
    assert (ok.cluster.micro_batches, ok.cluster.schedule, ok.hvp) == (2, "sequential", "exact")
