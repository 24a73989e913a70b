"""Hugging Face checkpoints without a factory: ``model: {hf: FOLDER}`` through ``probe run``.

Each family's tiny random model is saved by ``save_pretrained`` as sharded float64
safetensors (a tied embedding/head pair written once, as transformers writes it) and
probed by ``probe run`` on two worker processes; λ_max, λ_min and a Hutch++ trace
equal those of the independent dense Hessian of :mod:`hf_files` (transformers' own
loading and loss, ``jacfwd(grad)``), within the operator's measured symmetry defect.
"""

from __future__ import annotations

import json
import math

import hf_files
import pyarrow.dataset as ds
import pytest
import torch
import yaml

from cluster.cli import main
from cluster.worker import task_seed
from probe.operators import DenseOperator
from probe.trace import trace

TRACE_MATVECS = 30


def read(root, kind):
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table().to_pylist()


def write_spec(tmp_path, family: str, *, workers: int = 2, probes=None, extra=None) -> tuple:
    model_dir = tmp_path / family
    model = hf_files.write_model(family, model_dir)
    tokens = hf_files.write_tokens(tmp_path / "tokens.parquet")
    raw = {
        "name": f"hf-{family.replace('_', '-')}",
        "model": {"hf": str(model_dir)},
        "data": hf_files.token_data(tmp_path, batch_size=4),
        "loss": hf_files.FAMILIES[family][3],
        "probes": probes
        or [
            {"kind": "eigenvalues", "k": 1, "which": "largest", "tol": 1e-10},
            {"kind": "eigenvalues", "k": 1, "which": "smallest", "tol": 1e-10},
            {"kind": "trace", "method": "hutch++", "matvecs": TRACE_MATVECS},
        ],
        "cluster": {"num_workers": workers, "backend": "process"},
        "output": {"path": str(tmp_path / "results")},
        **(extra or {}),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, model, model_dir, tokens


def check_against_dense(tmp_path, model, model_dir, tokens) -> tuple[list[dict], float, float, float]:
    """Check a two-worker job's λ_max and λ_min rows against the dense Hessian; returns every row
    (eigenvalues, then trace), the dense Hutch++ estimate with the job's random vectors, the exact
    trace and the absolute tolerance (float64 rounding, or the operator's own measured asymmetry)."""
    H, dim = hf_files.dense_hessian(model_dir, hf_files.all_windows(tokens))
    evals = torch.linalg.eigvalsh((H + H.T) / 2)
    scale = evals.abs().max().item()
    eig = read(tmp_path / "results", "eigenvalues")
    tr = read(tmp_path / "results", "trace")[0]
    assert len(eig) == 2
    for row in eig + [tr]:
        assert row["num_parameters"] == dim == sum(p.numel() for p in model.parameters())  # tied counted once
        assert row["dtype"] == "float64" and row["world_size"] == 2 and row["hvp"] == "exact"
    defect = max(r.get("symmetry_defect") or 0.0 for r in eig + [tr])
    # the floor: float64 rounding, or the operator's own asymmetry (RMSNorm and rotary in float32)
    tol = max(100 * defect, 1e-9) * scale
    top = next(r for r in eig if r["which"] == "largest")["eigenvalues"][0]
    low = next(r for r in eig if r["which"] == "smallest")["eigenvalues"][0]
    assert abs(top - evals[-1].item()) <= tol, (top, evals[-1].item(), defect)
    assert abs(low - evals[0].item()) <= tol, (low, evals[0].item(), defect)
    # the same Hutch++ estimator on the dense matrix, with the job's random vectors
    g = torch.Generator().manual_seed(task_seed(0, 2))
    expected = trace(
        DenseOperator(H, symmetry_tol=1e-5), method="hutch++", num_matvecs=TRACE_MATVECS, generator=g
    ).trace
    return eig + [tr], expected, torch.trace(H).item(), tol


@pytest.mark.parametrize("family", list(hf_files.FAMILIES))
def test_probe_run_on_a_saved_hf_model_equals_its_dense_hessian(tmp_path, family):
    spec_path, model, model_dir, tokens = write_spec(tmp_path, family)
    assert (
        not any(
            k.startswith("lm_head")
            for k in json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
        )
        or family == "llama_untied"
    )
    assert main(["run", str(spec_path)]) == 0
    rows, expected, _, tol = check_against_dense(tmp_path, model, model_dir, tokens)
    for row in rows:
        assert row["checkpoint_name"] == family  # the save_pretrained folder, not the index file
        assert row["attention"] == "sdpa (math kernel)" and row["layout"] == "replicated"
        assert row["model_factory"] == f"hf:{model_dir}"
        # the products of a causal LM's head in token chunks (probe.lm_head), checked against the dense Hessian
        assert row["lm_head"] == ("plain" if family == "bert" else "chunked"), row["lm_head"]
    assert math.isclose(rows[-1]["trace"], expected, rel_tol=0, abs_tol=tol * 10), (rows[-1]["trace"], expected)


def test_every_kind_runs_on_a_tied_hf_model_and_counts_the_tie_once(tmp_path):
    """Sharpness, surfaces, PAC-Bayes, critical points, spectra and a barrier between two checkpoints
    of a tied Llama, in one local job: the evaluators and operators see one embedding/head tensor."""
    probes = [
        {"kind": "sharpness", "measures": ["lambda_max", "keskar", "sam", "adaptive"], "steps": 3},
        {"kind": "surface", "dims": 1, "resolution": 5},
        {"kind": "pacbayes", "samples": 4},
        {"kind": "critical", "runs": 2, "steps": 10},
        {"kind": "spectrum", "runs": 2, "steps": 10},
    ]
    spec_path, model, model_dir, _ = write_spec(tmp_path, "llama_tied", workers=1, probes=probes)
    other = tmp_path / "other"
    hf_files.write_model("llama_tied", other, seed=1)
    raw = yaml.safe_load(spec_path.read_text())
    raw["cluster"] = {"num_workers": 1, "backend": "local"}
    raw["probes"].append(
        {
            "kind": "barrier",
            "between": [str(model_dir / "model.safetensors.index.json"), str(other / "model.safetensors.index.json")],
            "points": 5,
        }
    )
    spec_path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(spec_path)]) == 0
    dim = sum(p.numel() for p in model.parameters())
    for kind in ("sharpness", "surface", "pacbayes", "critical", "spectrum", "barrier"):
        rows = read(tmp_path / "results", kind)
        assert rows and all(r["num_parameters"] == dim for r in rows), kind
    sharp = {r["measure"]: r["value"] for r in read(tmp_path / "results", "sharpness")}
    assert all(math.isfinite(v) for v in sharp.values()) and sharp["lambda_max"] > 0
    barrier = read(tmp_path / "results", "barrier")[0]
    assert len(barrier["loss"]) == 5 and math.isfinite(barrier["barrier_height"])


def test_per_layer_restriction_names_a_tied_head_by_either_name(tmp_path):
    """``params=["lm_head"]`` selects the tied embedding: the diagonal block of that one tensor."""
    import transformers

    from probe.gpt import lm_loss
    from probe.hessian import HessianOperator

    model = hf_files.write_model("llama_tied", tmp_path / "m")
    ids = hf_files.all_windows(hf_files.write_tokens(tmp_path / "t.parquet"))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    batches = [{"input_ids": ids, "labels": labels}]
    head = HessianOperator(model, lm_loss, batches, params=["lm_head"], weighting="tokens")
    embed = HessianOperator(model, lm_loss, batches, params=["model.embed_tokens"], weighting="tokens")
    assert head.space.names == embed.space.names == ("model.embed_tokens.weight",)
    v = torch.randn(head.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(head.matvec(v), embed.matvec(v))
    assert isinstance(model, transformers.LlamaForCausalLM)


def test_loss_model_is_the_models_own_loss(tmp_path):
    """``loss: model`` runs transformers' own causal-LM loss (labels given to the model); it is the
    causal_lm objective, computed by transformers with its logits cast to float32, so the two jobs'
    λ_max agree to float32's level."""
    probes = [{"kind": "eigenvalues", "k": 1, "tol": 1e-8}]
    values = {}
    for loss in ("causal_lm", "model"):
        folder = tmp_path / loss
        folder.mkdir()
        spec_path, *_ = write_spec(
            folder,
            "llama_tied",
            workers=1,
            probes=probes,
            extra={"loss": loss, "cluster": {"num_workers": 1, "backend": "local"}},
        )
        assert main(["run", str(spec_path)]) == 0
        values[loss] = read(folder / "results", "eigenvalues")[0]["eigenvalues"][0]
    assert math.isclose(values["model"], values["causal_lm"], rel_tol=1e-5), values


def write_trainer_checkpoint(run, step: int, *, lr: float) -> None:
    """``run/checkpoint-STEP/`` as the Trainer leaves it: save_pretrained's files, optimizer,
    scheduler and RNG state, the training arguments and trainer_state.json."""
    folder = run / f"checkpoint-{step}"
    hf_files.write_model("llama_tied", folder, seed=step, max_shard_size="1GB")
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": lr}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.zeros(4, dtype=torch.uint8)}, folder / "rng_state.pth")
    torch.save({"output_dir": "run"}, folder / "training_args.bin")
    history = [{"step": s, "learning_rate": lr * s / step, "loss": 1.0} for s in range(5, step + 1, 5)]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))


def test_probe_run_and_audit_on_a_trainer_run_folder(tmp_path):
    """``model: {hf: run}``: three checkpoint-N folders probed with their steps and learning rates;
    after a fourth appears, ``probe audit --once`` adds exactly one row per probe, named checkpoint-40."""
    run = tmp_path / "run"
    for step in (10, 20, 30):
        write_trainer_checkpoint(run, step, lr=1e-3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "trainer-run",
                "model": {"hf": str(run)},
                "data": hf_files.token_data(tmp_path, batch_size=6),
                "loss": "causal_lm",
                "probes": [{"kind": "eigenvalues", "k": 1, "tol": 1e-4}, {"kind": "trace", "matvecs": 6}],
                "cluster": {"num_workers": 1, "backend": "local"},
                "output": {"path": str(tmp_path / "results")},
            }
        )
    )
    assert main(["run", str(spec)]) == 0
    for kind in ("eigenvalues", "trace"):
        rows = sorted(read(tmp_path / "results", kind), key=lambda r: r["step"])
        assert [(r["checkpoint_name"], r["step"]) for r in rows] == [
            ("checkpoint-10", 10),
            ("checkpoint-20", 20),
            ("checkpoint-30", 30),
        ]
        assert all(math.isclose(r["lr"], 1e-3) for r in rows)
        assert all(r["checkpoint"].endswith("model.safetensors") for r in rows)
    write_trainer_checkpoint(run, 40, lr=5e-4)
    assert main(["audit", str(spec), "--once"]) == 0
    for kind in ("eigenvalues", "trace"):
        rows = read(tmp_path / "results", kind)
        assert len(rows) == 4
        new = [r for r in rows if r["checkpoint_name"] == "checkpoint-40"]
        assert len(new) == 1 and new[0]["step"] == 40 and math.isclose(new[0]["lr"], 5e-4)


def test_a_bfloat16_checkpoint_is_the_model_transformers_runs(tmp_path):
    """precision auto on a bf16 checkpoint: bf16 parameters, but the rotary tables the model computes
    stay float32 as transformers keeps them (rounded to bf16 they shift long positions), so the
    logits equal those of transformers' own from_pretrained exactly."""
    import transformers

    from cluster.checkpoints import load_checkpoint
    from cluster.hf import build_hf_model, resolve_precision

    folder = tmp_path / "llama"
    hf_files.write_model("llama_tied", folder, dtype=torch.bfloat16)
    from cluster.checkpoints import expand_checkpoints

    index = expand_checkpoints([str(folder)])[0]
    assert resolve_precision("auto", True, index) == ("bfloat16", "")
    state, _ = load_checkpoint(index)
    ours = build_hf_model(
        index,
        state,
        hf_root=str(folder),
        hf_class="auto",
        attn_implementation="eager",
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    assert {n: b.dtype for n, b in ours.named_buffers()} == {n: b.dtype for n, b in ref.named_buffers()}
    ids = torch.randint(0, hf_files.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
