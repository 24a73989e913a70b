"""Probes inside training: tiny offline runs of the Hugging Face Trainer and of Lightning with the
callbacks, the Parquet rows they wrote read back through the store, λ_max checked against a dense
float64 Hessian of the weights at that step, and the training itself checked undisturbed (the same
final weights, bit for bit, as a run without the callback)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cluster.callbacks import CallbackError, LiveProbes
from cluster.schema import schema_for
from cluster.store import ResultStore


def dense_hessian(model: nn.Module, loss_of) -> torch.Tensor:
    """The float64 Hessian of ``loss_of(forward)`` in the model's flat parameters, formed densely."""
    model = model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return loss_of(lambda *args, **kwargs: functional_call(model, {**params, **buffers}, args, kwargs))

    # reverse over reverse, one row per parameter: torch.func.hessian (forward over reverse) got
    # entries of GPT-2's last layers wrong by 0.1 here (checked against finite differences of the gradient)
    return torch.autograd.functional.hessian(loss, flat)


def test_bad_configuration_is_refused():
    batches = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(CallbackError, match="every_n_steps must be a positive integer, got 0"):
        LiveProbes("r", batches, every_n_steps=0)
    with pytest.raises(CallbackError, match="precision must be one of float64, float32, model, got 'half'"):
        LiveProbes("r", batches, precision="half")
    with pytest.raises(CallbackError, match="probe kind 'barrier' reads other checkpoints"):
        LiveProbes("r", batches, probes={"barrier": {"between": ["a.pt", "b.pt"]}})
    with pytest.raises(CallbackError, match="batches is empty"):
        LiveProbes("r", [])


# ------------------------------------------------------------------ Hugging Face Trainer


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLM",
    )
    config._attn_implementation = "eager"  # sdpa's fused kernels have no double backward
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), config  # dropout 0.1 everywhere: training draws from the RNG


def _train_hf(tmp_path, callbacks):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, config = _gpt2()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 11, (16, 8), generator=g)]
    snapshots: dict[int, dict] = {}

    class Snapshot(TrainerCallback):  # the weights at each step, as a checkpoint would hold them
        def on_train_begin(self, args, state, control, model=None, **kw):
            snapshots[0] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[*callbacks, Snapshot()])
    trainer.train()
    return model, config, snapshots


def shifted_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the logits' dtype (Hugging Face's own loss computes in float32)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_hf_trainer_callback(tmp_path):
    from transformers import GPT2LMHeadModel

    from cluster.callbacks import ProbeTrainerCallback

    results = tmp_path / "results"
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (6, 8), generator=g)
    probes = {"eigenvalues": {"k": 2}, "trace": {"matvecs": 60}}
    # the model's own loss (outputs.loss, the default) and a float64 loss of the user's
    own = ProbeTrainerCallback(results, [{"input_ids": tokens, "labels": tokens}], every_n_steps=3, probes=probes)
    f64 = ProbeTrainerCallback(
        results, [({"input_ids": tokens}, tokens)], loss_fn=shifted_lm_loss, every_n_steps=3, probes=probes, job="f64"
    )
    model, config, snapshots = _train_hf(tmp_path, [own, f64])

    store = ResultStore(results)
    rows = store.read("eigenvalues").to_pylist()
    traces = store.read("trace").to_pylist()
    for job in ("training", "f64"):
        eig = sorted((r for r in rows if r["job"] == job), key=lambda r: r["step"])
        trace = sorted((r for r in traces if r["job"] == job), key=lambda r: r["step"])
        assert [r["step"] for r in eig] == [r["step"] for r in trace] == [0, 3, 6]
        assert [r["checkpoint_name"] for r in eig] == ["step-0", "step-3", "step-6"]
        assert all(r["dtype"] == "float64" and r["mode"] == "eval" for r in eig)
        assert all(r["lr"] is not None and r["num_examples"] == 6 for r in eig)
        assert json.loads(eig[0]["probe_config"])["k"] == 2
        assert len({r["checkpoint_sha256"] for r in eig}) == 3  # the weights moved between measurements
        for r, t in zip(eig, trace, strict=True):
            reference = GPT2LMHeadModel(config)
            reference.load_state_dict(snapshots[r["step"]])
            H = dense_hessian(reference, lambda f: shifted_lm_loss(f(input_ids=tokens).logits, tokens))
            exact = torch.linalg.eigvalsh(H)
            # (the model's own loss upcasts the logits to float32: agreement to 1e-8 instead of 1e-12)
            assert r["eigenvalues"][0] == pytest.approx(exact[-1].item(), rel=1e-6)
            assert r["eigenvalues"][1] == pytest.approx(exact[-2].item(), rel=1e-6)
            assert abs(t["trace"] - H.trace().item()) <= 4 * t["trace_stderr"] + 1e-9
    assert set(store.read("eigenvalues").schema.names) >= set(schema_for("eigenvalues").names)
    assert store.read("runs").num_rows == 2

    # the same training without the callbacks ends at the same weights, bit for bit
    plain, _, _ = _train_hf(tmp_path, [])
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ Lightning


def _lightning_module():
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    return Net


def _train_lightning(tmp_path, callbacks):
    import lightning.pytorch as pl

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(4)
    )
    snapshots: dict[int, dict] = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshots[0] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    pl.seed_everything(0, verbose=False)
    model = _lightning_module()()
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "pl-out"),
        callbacks=[*callbacks, Snapshot()],
    )
    trainer.fit(model, loader)
    return model, snapshots


@pytest.mark.parametrize("precision", ["model", "float64"])
def test_lightning_callback(tmp_path, precision):
    from cluster.callbacks import ProbeLightningCallback

    results = tmp_path / "results"
    g = torch.Generator().manual_seed(5)
    px, py = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    callback = ProbeLightningCallback(
        results,
        [(px[:12], py[:12]), (px[12:], py[12:])],
        loss_fn=F.cross_entropy,
        every_n_steps=2,
        precision=precision,
        probes={"eigenvalues": {"k": 1}},
        job="mlp",
    )
    model, snapshots = _train_lightning(tmp_path, [callback])

    rows = sorted(ResultStore(results).read("eigenvalues").to_pylist(), key=lambda r: r["step"])
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert all(r["job"] == "mlp" and r["lr"] == 0.2 and r["num_examples"] == 20 for r in rows)
    assert rows[0]["dtype"] == ("float32" if precision == "model" else "float64")
    for r in rows:
        reference = _lightning_module()()
        reference.load_state_dict(snapshots[r["step"]])
        H = dense_hessian(reference, lambda f: F.cross_entropy(f(px.double()), py))  # one batch: the same mean loss
        exact = torch.linalg.eigvalsh(H)[-1].item()
        assert r["eigenvalues"][0] == pytest.approx(exact, rel=1e-6 if precision == "float64" else 1e-4)

    # the rows export like a job's: λ_max at the training steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.export import export_results

    export_results(results, "tensorboard", out=tmp_path / "tb", say=lambda _: None)
    acc = EventAccumulator(str(tmp_path / "tb" / "mlp"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("lambda_max")]
    assert logged == [(r["step"], pytest.approx(r["eigenvalues"][0], rel=1e-6)) for r in rows]

    plain, _ = _train_lightning(tmp_path, [])
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
