"""Probes inside training: a Hugging Face ``TrainerCallback`` and a Lightning ``Callback`` that measure every N steps.

Every ``every_n_steps`` optimizer steps (and at step 0), :class:`LiveProbes` runs the chosen
probe kinds (default ``eigenvalues`` with ``k: 1`` and ``trace``) through the same runners a
job uses (:func:`cluster.runners.run_probe`) on the live model and a held probe set, and
writes the same Parquet rows a job writes (:class:`cluster.store.ResultStore`, the kind's
schema, the common columns) with the training ``step``, the optimizer's learning rate and
``checkpoint_name`` ``step-<N>``. ``probe report`` and ``probe export`` read them like a job's.

Training is not disturbed: with ``precision="float64"`` (default) the probes run on a float64
copy of the model (the live one is only read); with ``precision="model"`` they run on the
live model in its own dtype (no copy: for models too large to copy). Either way the model's
train/eval mode, its parameters' ``.grad`` and ``requires_grad``, and the random states of
torch (CPU and CUDA), NumPy and Python are restored after each measurement, so a training
run with the callback takes the same steps as one without (tested bit for bit).

A row's ``checkpoint`` is ``live:<job>/step-<N>``; ``checkpoint_sha256`` hashes the
parameters' bytes, and ``task_key`` hashes the job, that hash, the kind, its options, the
seed, the precision, the mode and the probe set's hash, as a job's does: a resumed run that
re-measures the same weights rewrites the same file. Kinds that read other checkpoints
(pairwise ``barrier``, per-series ``eos``, ``surface`` with PCA directions) are refused.
In multi-process training only the global rank 0 measures (the others wait at their next
collective: keep the probes short or raise the process group's timeout).

Use::

    from cluster.callbacks import ProbeTrainerCallback      # transformers
    trainer = Trainer(..., callbacks=[ProbeTrainerCallback("results", batches, every_n_steps=100)])

    from cluster.callbacks import ProbeLightningCallback    # lightning (or pytorch_lightning)
    pl.Trainer(callbacks=[ProbeLightningCallback("results", batches, loss_fn=F.cross_entropy)])
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import numpy
import torch

from cluster.errors import ProbeError
from cluster.kinds import KINDS
from cluster.runners import ProbeContext, run_probe, task_seed
from cluster.schema import SCHEMA_VERSION
from cluster.spec import ProbeSpec
from cluster.store import ResultStore
from probe.batches import LABELS, batch_size_of, model_loss, split_batch
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator

# and, built on first use (module __getattr__): ProbeTrainerCallback, ProbeLightningCallback
__all__ = ["LiveProbes", "CallbackError", "DEFAULT_PROBES", "undisturbed"]

DEFAULT_PROBES: dict[str, dict] = {"eigenvalues": {"k": 1}, "trace": {"matvecs": 30}}
PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "model": None}


class CallbackError(ProbeError, ValueError):
    """A callback configured with something it cannot use (bad input)."""

    category = "bad_spec"


def _digest(tensors: Iterator[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for k in sorted(x):
            yield from _tensors(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


@contextmanager
def undisturbed(model: torch.nn.Module) -> Iterator[None]:
    """Restore ``model``'s train/eval mode, its parameters' ``.grad`` and ``requires_grad``, and the
    random states of torch (CPU and every CUDA device), NumPy and Python on exit."""
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py = random.getstate()
    np_state = numpy.random.get_state()
    try:
        yield
    finally:
        for m, mode in training.items():
            m.training = mode
        with torch.no_grad():
            for p, g, flag in zip(params, grads, flags, strict=True):
                p.requires_grad_(flag)
                p.grad = g
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        numpy.random.set_state(np_state)


class LiveProbes:
    """Probe kinds run on a live model every N steps, writing a job's Parquet rows (see the module docstring).

    Args:
        results: the results folder (a job's ``output.path``; rows go under ``<kind>/``).
        batches: the held probe set: ``(inputs, targets)`` pairs or Hugging Face dicts with
            ``"labels"`` (:mod:`probe.batches`); kept as given, moved to the model's device per measurement.
        every_n_steps: measure when the optimizer step is a multiple of this (and at step 0 when
            ``at_start``).
        probes: kind -> options (the spec's ``probes`` entries; default :data:`DEFAULT_PROBES`).
        loss_fn: ``loss_fn(outputs, targets)``, a mean over examples; None: the model's own loss
            (Hugging Face ``outputs.loss``; the dict batches' ``labels`` are passed to the model).
        job: the job name of the rows (their ``job`` partition).
        seed: the probes' seed (the same for every step, as a job's for every checkpoint).
        precision: ``float64`` (default: a float64 copy), ``float32`` (a float32 copy) or ``model``
            (the live model itself, in its own dtype, no copy).
        mode: ``eval`` (default: running statistics, no dropout) or ``train``.
        at_start: also measure at step 0, before the first optimizer step.
        source: what trains (recorded in ``checkpoint_metadata``).

    Raises:
        CallbackError: for an unknown precision, a bad ``every_n_steps``, an empty probe set, or a
            kind that reads other checkpoints; ``SpecError`` for bad probe options (as in a spec).
    """

    def __init__(
        self,
        results: str | os.PathLike,
        batches: Sequence[Any],
        *,
        every_n_steps: int = 100,
        probes: Mapping[str, Mapping[str, Any]] | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        job: str = "training",
        seed: int = 0,
        precision: str = "float64",
        mode: str = "eval",
        at_start: bool = True,
        source: str = "",
    ) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise CallbackError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if precision not in PRECISIONS:
            raise CallbackError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if mode not in ("eval", "train"):
            raise CallbackError(f"mode must be 'eval' or 'train', got {mode!r}")
        if not batches:
            raise CallbackError("batches is empty: give the held probe set as a list of batches")
        self.probes = [ProbeSpec(kind, dict(opts)) for kind, opts in (probes or DEFAULT_PROBES).items()]
        for p in self.probes:
            k = KINDS[p.kind]
            if k.pairwise or k.per_series or (k.series is not None and k.series(p.resolved())):
                raise CallbackError(
                    f"probe kind {p.kind!r} reads other checkpoints and cannot run inside training; run it as a job "
                    "on saved checkpoints (probe run SPEC)"
                )
        self.store = ResultStore(results)
        self.every, self.job, self.seed, self.precision, self.mode = every_n_steps, job, seed, precision, mode
        self.at_start, self.source = at_start, source
        self.loss_fn = loss_fn if loss_fn is not None else model_loss
        if loss_fn is None:  # the model computes its loss: it gets the labels with its inputs
            batches = [(dict(b), b[LABELS]) if isinstance(b, Mapping) and LABELS in b else b for b in batches]
        self.batches = list(batches)
        self.num_examples = sum(batch_size_of(split_batch(b)[1]) for b in self.batches)
        self.data_sha256 = _digest(_tensors(self.batches))
        self.run_id = uuid.uuid4().hex[:12]
        self.started_at = datetime.now(UTC)
        self.measured: set[int] = set()
        self.num_rows = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` is to be measured (a multiple of ``every_n_steps``, not measured yet)."""
        if step in self.measured:
            return False
        return step % self.every == 0 and (step > 0 or self.at_start)

    def _worker(self, model: torch.nn.Module) -> SimpleNamespace:
        def operator(m: torch.nn.Module):
            return HessianOperator(m, self.loss_fn, self.batches, mode=self.mode)

        def evaluator(m: torch.nn.Module, eval_set: str = "probe"):
            if eval_set != "probe":
                raise CallbackError(f"evaluation set {eval_set!r} is not available inside training; only 'probe'")
            return Evaluator(m, self.loss_fn, self.batches, mode=self.mode, dropout_seed=self.seed * 1_000_003)

        spec = SimpleNamespace(mode=self.mode, seed=self.seed, output=SimpleNamespace(path=str(self.store.root)))
        return SimpleNamespace(
            operator=operator,
            evaluator=evaluator,
            loss_fn=self.loss_fn,
            batches=self.batches,
            spec=spec,
            world_size=1,
            build_model=self._no_checkpoints,
        )

    @staticmethod
    def _no_checkpoints(checkpoint: str):
        raise CallbackError(f"checkpoint {checkpoint!r}: probes inside training measure the live model only")

    def _copy(self, model: torch.nn.Module) -> torch.nn.Module:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return model
        memo: dict[int, Any] = {}
        trainer = getattr(model, "_trainer", None)  # a LightningModule's trainer is not copied
        if trainer is not None:
            memo[id(trainer)] = None
        clone = copy.deepcopy(model, memo)
        return clone.to(dtype=dtype)

    def measure(self, model: torch.nn.Module, step: int, *, lr: float | None = None) -> list[dict]:
        """Run every probe on ``model`` at training ``step`` and write their rows; returns the rows.

        Raises:
            NonFiniteError: when a headline quantity is NaN or infinite (nothing of that kind is written).
        """
        self.measured.add(step)
        rows: list[dict] = []
        with undisturbed(model):
            target = self._copy(model)
            dtype = next(target.parameters()).dtype
            ckpt_sha = _digest(p for p in model.parameters())
            meta = {"step": step, "source": self.source} | ({} if lr is None else {"lr": lr})
            name = f"step-{step}"
            device = str(next(target.parameters()).device)
            num_parameters = sum(p.numel() for p in target.parameters() if p.requires_grad)
            versions = _versions()
            for index, p in enumerate(self.probes):
                options = p.resolved()
                seed = task_seed(self.seed, index)
                precision = self.precision if self.precision != "model" else str(dtype).removeprefix("torch.")
                key = hashlib.sha256(
                    json.dumps(
                        [self.job, ckpt_sha, p.kind, options, seed, precision, self.mode, self.data_sha256],
                        sort_keys=True,
                        default=str,
                    ).encode()
                ).hexdigest()[:24]
                t0 = time.perf_counter()
                ctx = ProbeContext(self._worker(target), target, f"live:{self.job}/{name}", dict(meta))
                record = run_probe(p.kind, ctx, options, seed)
                base = {
                    "run_id": self.run_id,
                    "job": self.job,
                    "task_key": key,
                    "checkpoint": ctx.checkpoint,
                    "checkpoint_sha256": ckpt_sha,
                    "checkpoint_name": name,
                    "step": step,
                    "lr": lr,
                    "probe_config": json.dumps(options, sort_keys=True),
                    "seed": seed,
                    "created_at": datetime.now(UTC),
                    "schema_version": SCHEMA_VERSION,
                    "model_factory": f"live:{type(model).__module__}.{type(model).__qualname__}",
                    "data_sha256": self.data_sha256,
                    "num_examples": self.num_examples,
                    "dtype": precision,
                    "mode": self.mode,
                    "world_size": 1,
                    "device": device,
                    "versions": json.dumps(versions, sort_keys=True),
                    "duration_s": time.perf_counter() - t0,
                    "attempts": 1,
                    "checkpoint_metadata": json.dumps({k: str(v) for k, v in meta.items()}, sort_keys=True),
                    "num_parameters": num_parameters,
                    "hvp": "exact",
                    "layout": "single",
                }
                common = {**base, **{k: v for k, v in record.items() if k != "rows"}}
                kind_rows = [{**common, **r} for r in record.get("rows", [{}])]
                self.store.write_result(p.kind, kind_rows)
                rows += kind_rows
        self.num_rows += len(rows)
        return rows

    def finish(self, *, status: str = "succeeded") -> None:
        """Write the ``runs`` row of this training run (what a job writes when it ends)."""
        if not self.measured:
            return
        self.store.write_run(
            {
                "run_id": self.run_id,
                "job": self.job,
                "started_at": self.started_at,
                "finished_at": datetime.now(UTC),
                "status": status,
                "num_tasks": len(self.measured) * len(self.probes),
                "num_done": len(self.measured) * len(self.probes),
                "num_skipped": 0,
                "num_failed": 0,
                "restarts": 0,
                "failures": "[]",
                "spec": json.dumps(
                    {
                        "name": self.job,
                        "source": self.source,
                        "every_n_steps": self.every,
                        "precision": self.precision,
                        "mode": self.mode,
                        "seed": self.seed,
                        "probes": [{"kind": p.kind, **p.options} for p in self.probes],
                    },
                    sort_keys=True,
                ),
                "versions": json.dumps(_versions(), sort_keys=True),
                "schema_version": SCHEMA_VERSION,
            }
        )


@functools.cache  # the installed versions do not change while a training run measures
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow

    out = {"torch": torch.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}
    for dist in ("landscape-probe", "transformers", "lightning", "pytorch-lightning"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _optimizer_lr(optimizer) -> float | None:
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def _hf_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise CallbackError(
            f"ProbeTrainerCallback needs transformers ({exc}); install it with: pip install 'landscape-probe[hf]'"
        ) from None

    class ProbeTrainerCallback(TrainerCallback):
        """A ``transformers.TrainerCallback`` running :class:`LiveProbes` every N optimizer steps
        (``state.global_step``: the step a ``checkpoint-N`` folder would carry); arguments as
        :class:`LiveProbes`, ``loss_fn`` default the model's own loss."""

        def __init__(self, results, batches, **kwargs) -> None:
            self.probes = LiveProbes(results, batches, source="transformers.Trainer", **kwargs)

        def _maybe(self, state, model, optimizer) -> None:
            if model is not None and state.is_world_process_zero and self.probes.due(state.global_step):
                self.probes.measure(model, state.global_step, lr=_optimizer_lr(optimizer))

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._maybe(state, model, optimizer)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._maybe(state, model, optimizer)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.probes.finish()

    return ProbeTrainerCallback


def _lightning_base() -> type:
    """Lightning's ``Callback``: ``lightning.pytorch``'s, else ``pytorch_lightning``'s (the Trainer's
    package must be the same one)."""
    try:
        from lightning.pytorch import Callback

        return Callback
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback

        return Callback
    except ImportError as exc:
        raise CallbackError(
            f"ProbeLightningCallback needs lightning ({exc}); install it with: pip install lightning"
        ) from None


def _lightning_class() -> type:
    base = _lightning_base()

    class ProbeLightningCallback(base):
        """A Lightning ``Callback`` running :class:`LiveProbes` every N optimizer steps
        (``trainer.global_step``); arguments as :class:`LiveProbes` (give ``loss_fn``: the probes call
        the module's ``forward``, not its ``training_step``)."""

        def __init__(self, results, batches, **kwargs) -> None:
            self.probes = LiveProbes(results, batches, source="lightning.Trainer", **kwargs)

        def _maybe(self, trainer, pl_module) -> None:
            if trainer.is_global_zero and self.probes.due(trainer.global_step):
                lr = _optimizer_lr(trainer.optimizers[0]) if trainer.optimizers else None
                self.probes.measure(pl_module, trainer.global_step, lr=lr)

        def on_train_start(self, trainer, pl_module) -> None:
            self._maybe(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._maybe(trainer, pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                self.probes.finish()

    return ProbeLightningCallback


_LAZY = {"ProbeTrainerCallback": _hf_class, "ProbeLightningCallback": _lightning_class}
_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """``ProbeTrainerCallback`` and ``ProbeLightningCallback``, built on first use (their frameworks are optional)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = _LAZY[name]()
    return _BUILT[name]
