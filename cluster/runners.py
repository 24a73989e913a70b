"""One function per probe kind: a probe context and options in, plain records out.

Each runner calls :mod:`probe` functions and turns their frozen results into a
dict of scalars and lists (what goes back to the driver and into Parquet); a
runner that yields several rows (one per sharpness measure, per barrier path and
evaluation set) returns ``{"rows": [...]}``. Runners run identically on every
worker of a group (SPMD); the driver keeps rank 0's record.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from pathlib import Path

import torch

from cluster.basis import DiskBasis
from cluster.checkpoints import checkpoint_sha256
from cluster.errors import NonFiniteError
from probe.barrier import barrier
from probe.critical import classify_critical_point
from probe.noise import gradient_moments, noise_statistics
from probe.pacbayes import pacbayes
from probe.directions import Directions, pca_directions, random_directions
from probe.eos import adam_preconditioner, eos_point
from probe.surface import surface
from probe.symmetry import symmetry_defect
from probe.curves import PATH_KINDS, train_bend
from probe.eigen import eigenvalues
from probe.sharpness import adaptive_sharpness, average_sharpness, keskar_sharpness, lambda_max, sam_sharpness
from probe.slq import spectral_density
from probe.trace import trace

__all__ = ["ProbeContext", "RUNNERS", "run_probe", "HEADLINE_FIELDS", "check_headlines"]


@dataclass
class ProbeContext:
    """What a runner may use: the worker (data shards, operators, evaluators) and the loaded model."""

    worker: Any
    model: torch.nn.Module
    checkpoint: str
    metadata: dict = field(default_factory=dict)

    def operator(self, model: torch.nn.Module | None = None):
        return self.worker.operator(self.model if model is None else model)

    def evaluator(self, eval_set: str = "probe", model: torch.nn.Module | None = None):
        return self.worker.evaluator(self.model if model is None else model, eval_set)

    def load(self, checkpoint: str) -> torch.nn.Module:
        return self.worker.build_model(checkpoint)[0]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# Seed offset of the symmetry check's own random stream: the estimators' draws from ``g`` stay the
# same whether the check runs or not, so their results do not depend on the option.
_SYMMETRY_SEED_OFFSET = 0x5E77


@dataclass(frozen=True)
class _Symmetry:
    """The operator's symmetry defect for a task's rows: ``defect`` (None when not measured or not
    finite), the products it took and a note (empty unless the defect is far above rounding)."""

    defect: float | None = None
    num_matvecs: int = 0
    note: str = ""


def _symmetry(op, o: dict, g: torch.Generator) -> _Symmetry:
    """Measure ``op``'s symmetry defect once (two products) when ``symmetry_check`` asks for it:
    true, false, or null for "on when the operator is float64". Warns (SymmetryWarning) when far
    above rounding; see :mod:`probe.symmetry` for the rule."""
    on = o.get("symmetry_check")
    if on is None:
        on = op.dtype == torch.float64
    if not on:
        return _Symmetry()
    own = torch.Generator().manual_seed((g.initial_seed() + _SYMMETRY_SEED_OFFSET) % (1 << 63))
    r = symmetry_defect(op, own)
    return _Symmetry(_finite(r.defect), r.num_matvecs, r.note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


@contextmanager
def _basis(ctx: ProbeContext, o: dict):
    """The Lanczos basis store the options ask for: on the device, in host memory, or on disk under
    ``output.path/.scratch`` (removed after the probe)."""
    if o.get("basis", "device") != "disk":
        yield o.get("basis", "device")
        return
    folder = Path(ctx.worker.spec.output.path) / ".scratch"
    folder.mkdir(parents=True, exist_ok=True)
    with DiskBasis(folder) as store:
        yield store


def _eigenvalues(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    op = ctx.operator()
    sym = _symmetry(op, o, g)
    with _basis(ctx, o) as basis:
        r = eigenvalues(op, o["k"], which=o["which"], tol=o["tol"], max_steps=o["max_steps"],
                        generator=g, basis=basis, basis_memory_bytes=o.get("basis_memory_bytes"),
                        reorth=o.get("reorth", "full"))
    return {
        "basis_storage": r.basis_storage,
        "which": r.which,
        "eigenvalues": r.eigenvalues.tolist(),
        "residuals": r.residuals.tolist(),
        "converged": r.converged,
        "num_steps": r.num_steps,
        "orthogonality_loss": r.orthogonality_loss,
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "note": _join(r.note, sym.note),
        "symmetry_defect": sym.defect,
    }


def _trace(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    op = ctx.operator()
    sym = _symmetry(op, o, g)
    r = trace(op, method=o["method"], num_matvecs=o["matvecs"], generator=g)
    return {"method": r.method, "trace": r.trace, "trace_stderr": r.trace_stderr,
            "num_matvecs": r.num_matvecs + sym.num_matvecs, "symmetry_defect": sym.defect}


def _spectrum(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    op = ctx.operator()
    sym = _symmetry(op, o, g)
    with _basis(ctx, o) as basis:
        r = spectral_density(
            op, runs=o["runs"], steps=o["steps"], sigma=o["sigma"], reorth=o["reorth"],
            grid_points=o["grid_points"], generator=g, basis=basis, basis_memory_bytes=o.get("basis_memory_bytes"),
        )
    neg, neg_err = r.negative_mass()
    return {
        "basis_storage": r.basis_storage,
        "note": _join(r.note, sym.note),
        "grid": r.grid.tolist(),
        "density": r.density.tolist(),
        "density_stderr": r.density_stderr.tolist(),
        "ritz_values": [v.tolist() for v in r.ritz_values],
        "ritz_weights": [w.tolist() for w in r.ritz_weights],
        "sigma": r.sigma,
        "reorth": r.reorth,
        "lambda_min": r.lambda_min,
        "lambda_max": r.lambda_max,
        "negative_mass": neg,
        "negative_mass_stderr": neg_err,
        "orthogonality_loss": [float(x) for x in r.orthogonality_loss],
        "breakdown": [bool(x) for x in r.breakdown],
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "symmetry_defect": sym.defect,
    }


def _sharpness(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    ev = ctx.evaluator()
    results = []
    sym = None  # measured once, on the operator of the first lambda_max
    for measure in o["measures"]:
        if measure == "lambda_max":
            op = ctx.operator()
            if sym is None:
                sym = _symmetry(op, o, g)
                symmetry_row = len(results)  # the row that pays for (and notes) the check
            results.append(lambda_max(op, generator=g))
        elif measure == "keskar":
            results.append(keskar_sharpness(ev, epsilon=o["epsilon"], steps=o["steps"], generator=g))
        elif measure == "sam":
            results.append(sam_sharpness(ev, rho=o["rho"], steps=1, generator=g))
            results.append(sam_sharpness(ev, rho=o["rho"], steps=o["steps"], generator=g))
        elif measure == "adaptive":
            results.append(adaptive_sharpness(ev, kind=o.get("adaptive_kind", "worst"), p=o.get("adaptive_p", 2),
                                              rho=o["adaptive_rho"], steps=o["steps"], num_samples=o["num_samples"],
                                              generator=g))
        elif measure == "average":
            results.append(average_sharpness(ev, sigma=o["sigma"], num_samples=o["num_samples"], generator=g))
    sym = sym or _Symmetry()
    rows = []
    for i, r in enumerate(results):
        params = dict(r.params)
        mine = sym.num_matvecs > 0 and i == symmetry_row
        rows.append({
            "measure": r.measure,
            "value": float(r.value),
            "stderr": _finite(r.stderr),
            "base_loss": float(r.base_loss),
            "perturbed_loss": float(r.perturbed_loss),
            "epsilon": params.get("epsilon"),
            "rho": params.get("rho"),
            "sigma": params.get("sigma"),
            "norm": params.get("norm"),
            "steps": params.get("steps"),
            "num_samples": params.get("num_samples"),
            "params": json.dumps(params, sort_keys=True, default=str),
            "num_evaluations": r.num_evaluations,
            "num_matvecs": r.num_matvecs + (sym.num_matvecs if mine else 0),
            "note": _join(r.note, sym.note) if mine else r.note,
            "symmetry_defect": sym.defect,
        })
    return {"rows": rows, "num_matvecs": sum(r["num_matvecs"] for r in rows)}


def _barrier(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    end_a, end_b = o["between"]
    model_a, model_b = ctx.load(end_a), ctx.load(end_b)
    ev_train = ctx.evaluator("probe", model_a)
    space = ev_train.space
    a, b = space.get_flat(model_a), space.get_flat(model_b)
    evaluators = {name: ctx.evaluator(name, model_a) for name in o["eval_sets"]}
    kinds = o["path"] if isinstance(o["path"], list) else [o["path"]]
    rows = []
    for kind in kinds:
        path = PATH_KINDS[kind](a, b)
        training = None
        if kind != "linear":
            training = train_bend(path, ev_train, steps=o["train_steps"], lr=o["train_lr"],
                                  optimizer=o["train_optimizer"], generator=g)
            path = training.path
        for name, r in barrier(path, evaluators, points=o["points"]).items():
            rows.append({
                "path": kind,
                "endpoint_a": end_a,
                "endpoint_b": end_b,
                "eval_set": name,
                "mode": r.mode,
                "t": r.t.tolist(),
                "loss": r.loss.tolist(),
                "error": [None if math.isnan(e) else e for e in r.error.tolist()],
                "loss_a": float(r.loss_a),
                "loss_b": float(r.loss_b),
                "barrier_height": float(r.barrier_height),
                "barrier_above_line": float(r.barrier_above_line),
                "path_integral": float(r.path_integral),
                "error_barrier_height": _finite(float(r.error_barrier_height)),
                "num_nonfinite": int(r.num_nonfinite),
                "train_steps": training.steps_done if training else 0,
                "train_final_loss": float(training.losses[-1]) if training and len(training.losses) else None,
            })
    return {"rows": rows, "num_matvecs": 0}


def _surface(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    ev = ctx.evaluator()
    center = ev.center()
    grid = torch.linspace(-o["span"], o["span"], o["resolution"], dtype=torch.float64)
    k = o["dims"]
    matvecs = 0
    if o["directions"] == "random":
        dirs = random_directions(ev.space, center, k, g, normalization=o["normalization"] or "filter",
                                 ignore_1d=o["ignore_1d"])
    elif o["directions"] == "eigen":
        op = ctx.operator()
        r = eigenvalues(op, k, which="largest", generator=g, return_eigenvectors=True)
        vectors = r.eigenvectors
        if hasattr(op, "gather"):  # sharded: whole vectors are needed to move through parameter space
            vectors = op.gather(vectors)
        matvecs = r.num_matvecs
        dirs = Directions(vectors=vectors.T.contiguous().to(center.dtype), kind="eigen", normalization="none",
                          ignore_1d=False, eigenvalues=r.eigenvalues.cpu(), note=r.note)
    else:
        trajectory = [ev.space.get_flat(ctx.load(c)) for c in o["series"]]
        dirs = pca_directions(trajectory, center, k)
    betas = grid if k == 2 else None
    r = surface(ev, center, dirs, grid, betas)
    return {
        "dims": k,
        "normalization": r.normalization,
        "directions": r.directions,
        "ignore_1d": r.ignore_1d,
        "mode": r.mode,
        "alpha": list(r.alphas),
        "beta": list(r.betas),
        "loss": r.loss_flat,
        "error": [None if math.isnan(e) else e for e in r.error_flat],
        "num_evaluations": r.num_evaluations,
        "num_nonfinite": r.num_nonfinite,
        "direction_norms": list(r.direction_norms),
        "direction_cosine": _finite(r.direction_cosine),
        "eigenvalues": [float(x) for x in r.eigenvalues],
        "num_matvecs": matvecs,
        "note": r.note,
    }


def _learning_rate(option: float | None, checkpoint: str, meta: dict) -> tuple[float, str]:
    if option is not None:
        return float(option), "spec"
    if "lr" in meta:
        return float(meta["lr"]), "metadata"
    sidecar = Path(checkpoint).with_suffix(".json")
    if sidecar.is_file():
        data = json.loads(sidecar.read_text())
        if "lr" in data:
            return float(data["lr"]), "sidecar"
    raise ValueError(
        f"no learning rate for {checkpoint!r}: set probes[eos].lr, save 'lr' in the checkpoint's metadata, "
        f"or write it to {sidecar.name} as {{\"lr\": ...}}"
    )


def adam_state(model: torch.nn.Module, meta: dict, checkpoint: str) -> tuple[list[torch.Tensor], dict]:
    """Adam's per-parameter second moments (model.parameters() order) and hyper-parameters from a checkpoint.

    Two layouts are read: a PyTorch file whose ``"optimizer"`` entry is
    ``torch.optim.Adam.state_dict()`` (one parameter group, in ``model.parameters()``
    order), or safetensors tensors ``optimizer.exp_avg_sq.<parameter name>`` with
    metadata ``adam_step`` and optionally ``beta1``, ``beta2``, ``eps``.

    Raises:
        ValueError: naming the checkpoint and what is missing.
    """
    names = [n for n, _ in model.named_parameters()]
    if isinstance(meta.get("optimizer"), dict):
        sd = meta["optimizer"]
        group = sd["param_groups"][0]
        state = sd["state"]
        missing = [names[i] for i in group["params"] if i not in state or "exp_avg_sq" not in state[i]]
        if missing or len(group["params"]) != len(names):
            raise ValueError(f"checkpoint {checkpoint!r}: the Adam state does not cover the parameters {missing[:5]}")
        v = [state[i]["exp_avg_sq"] for i in group["params"]]
        step = float(state[group["params"][0]]["step"])
        beta1, beta2 = group["betas"]
        return v, {"step": step, "beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"])}
    tensors = meta.get("_optimizer_tensors", {})
    keys = [f"optimizer.exp_avg_sq.{n}" for n in names]
    missing = [k for k in keys if k not in tensors]
    if missing or "adam_step" not in meta:
        raise ValueError(
            f"checkpoint {checkpoint!r} has no Adam state: save the optimizer's state_dict under 'optimizer' "
            f"(PyTorch file) or tensors optimizer.exp_avg_sq.<parameter> with metadata adam_step (safetensors); "
            f"missing {(missing or ['adam_step'])[:3]}"
        )
    return [tensors[k] for k in keys], {
        "step": float(meta["adam_step"]),
        "beta1": float(meta.get("beta1", 0.9)),
        "beta2": float(meta.get("beta2", 0.999)),
        "eps": float(meta.get("eps", 1e-8)),
    }


def _eos(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    rows, previous, total, sym = [], None, 0, None
    for index, checkpoint in enumerate(o["series"]):
        model, meta = ctx.worker.build_model(checkpoint)
        lr, source = _learning_rate(o["lr"], checkpoint, meta)
        fallback = o["series_steps"][index] if "series_steps" in o else index
        step = int(float(meta.get("step", fallback)))
        op = ctx.operator(model)
        first = sym is None
        if first:  # once per task, on the Hessian (not the preconditioned operator) of its first checkpoint
            sym = _symmetry(op, o, g)
        preconditioner, momentum = None, o["momentum"]
        if o["optimizer"] == "adam":
            v, hp = adam_state(model, meta, checkpoint)
            space = ctx.evaluator(model=model).space
            by_name = dict(zip([n for n, _ in model.named_parameters()], v))
            flat = torch.cat([by_name[n].reshape(-1) for n in space.names]).to(op.device, op.dtype)
            diag = adam_preconditioner(flat, hp["step"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"])
            preconditioner = diag[op.local_slice]
            momentum = hp["beta1"] if momentum is None else momentum
        point = eos_point(op, lr, step=step, optimizer=o["optimizer"], momentum=momentum,
                          preconditioner=preconditioner, previous=previous, tol=o["tol"], generator=g)
        previous = point.eigenvector
        spent = point.num_matvecs + (sym.num_matvecs if first else 0)
        total += spent
        rows.append({
            "checkpoint": checkpoint,
            "checkpoint_sha256": checkpoint_sha256(checkpoint),
            "step": point.step,
            "lr": point.lr,
            "lr_source": source,
            "optimizer": point.optimizer,
            "momentum": point.momentum,
            "lambda_max": point.lambda_max,
            "threshold": point.threshold,
            "ratio": point.ratio,
            "residual": point.residual,
            "converged": point.converged,
            "warm_started": point.warm_started,
            "num_matvecs": spent,
            "note": _join(point.note, sym.note),
            "symmetry_defect": sym.defect,
        })
    return {"rows": rows, "num_matvecs": total}


def _pacbayes(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    r = pacbayes(ctx.evaluator(), target=o["target"], variant=o["variant"], samples=o["samples"],
                 prior_sigma=o["prior_sigma"], delta=o["delta"], rtol=o["rtol"], generator=g)
    return {
        "variant": r.variant, "sigma": r.sigma, "sigma_stderr": _finite(r.sigma_stderr), "target": r.target,
        "expected_loss_increase": r.expected_loss_increase,
        "expected_loss_increase_stderr": _finite(r.expected_loss_increase_stderr),
        "base_loss": r.base_loss, "base_error": _finite(r.base_error), "expected_error": _finite(r.expected_error),
        "expected_error_stderr": _finite(r.expected_error_stderr), "kl": _finite(r.kl),
        "prior_sigma": _finite(r.prior_sigma), "prior": r.prior, "delta": r.delta, "bound": _finite(r.bound),
        "bound_sqrt": _finite(r.bound_sqrt), "samples": r.samples, "num_evaluations": r.num_evaluations,
        "bisection_steps": r.bisection_steps, "note": r.note, "num_matvecs": 0,
    }


def _from_metadata(option, meta: dict, key: str, cast):
    """An option, else the checkpoint metadata's value, and where it came from."""
    if option is not None:
        return cast(option), "spec"
    if key in meta:
        return cast(float(meta[key])), "metadata"
    return None, "none"


def _noise(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    w = ctx.worker
    moments = gradient_moments(ctx.model, w.loss_fn, w.batches, chunk_size=o["chunk_size"], mode=w.spec.mode)
    if w.world_size > 1:
        def total(t: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(t)
            return t

        moments = moments.all_reduced(total)
    lr, lr_source = _from_metadata(o["lr"], ctx.metadata, "lr", float)
    batch_size, bs_source = _from_metadata(o["batch_size"], ctx.metadata, "batch_size", int)
    r = noise_statistics(moments, lr=lr, batch_size=batch_size)
    missing = [name for name, v in (("lr", lr), ("batch_size", batch_size)) if v is None]
    note = (f"no {' or '.join(missing)}: set probes[noise].{missing[0]} or save '{missing[0]}' in the checkpoint's "
            "metadata for the temperature and the implicit-regularization terms") if missing else ""
    return {
        "grad_norm": r.grad_norm, "noise_trace": r.noise_trace, "noise_scale": _finite(r.noise_scale),
        "noise_scale_debiased": _finite(r.noise_scale_debiased), "mean_sq_grad_norm": r.mean_sq_grad_norm,
        "loss": r.loss, "temperature": _finite(r.temperature), "batch_size": r.batch_size, "lr": _finite(r.lr),
        "lr_source": lr_source, "batch_size_source": bs_source, "gd_regularizer": _finite(r.gd_regularizer),
        "sgd_regularizer": _finite(r.sgd_regularizer), "modified_loss_term": _finite(r.modified_loss_term),
        "noise_trace_clamped": r.noise_trace_clamped, "num_nonfinite": r.num_nonfinite,
        "chunk_size": r.chunk_size, "method": moments.method, "note": note, "num_matvecs": 0,
    }


def _critical(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    ev = ctx.evaluator()  # in the spec's mode, as the operator: gradient and Hessian of the same loss
    theta = ev.center().detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(ev.loss_with_grad(theta), theta)  # summed over workers by the evaluator
    op = ctx.operator()
    sym = _symmetry(op, o, g)
    r = classify_critical_point(op, grad, grad_norm_threshold=o["grad_norm"],
                                negative_mass_threshold=o["negative_mass"], runs=o["runs"], steps=o["steps"],
                                tol=o["tol"], generator=g)
    return {
        "label": r.label, "grad_norm": r.grad_norm, "lambda_min": r.lambda_min, "lambda_max": r.lambda_max,
        "negative_mass": r.negative_mass, "negative_mass_stderr": _finite(r.negative_mass_stderr),
        "grad_norm_threshold": r.grad_norm_threshold, "negative_mass_threshold": r.negative_mass_threshold,
        "rule": r.rule, "num_matvecs": r.num_matvecs + sym.num_matvecs, "note": _join(r.note, sym.note),
        "symmetry_defect": sym.defect,
    }


RUNNERS: dict[str, Callable[[ProbeContext, dict, torch.Generator], dict]] = {
    "eigenvalues": _eigenvalues,
    "trace": _trace,
    "spectrum": _spectrum,
    "sharpness": _sharpness,
    "barrier": _barrier,
    "surface": _surface,
    "eos": _eos,
    "pacbayes": _pacbayes,
    "noise": _noise,
    "critical": _critical,
}


# The headline quantities of each kind's rows (a number or a list of numbers). One that is NaN or
# infinite fails the task (NonFiniteError): no row is stored, the failure is recorded and an audit
# retries it after its backoff. Left out, because they legitimately hold NaN or inf and say so in
# their rows (style.md 13): losses along barrier paths and surface grids (num_nonfinite), pacbayes'
# expected increase (inf where perturbed losses are), negative masses (0/0 for a zero Hessian),
# standard errors and every column the runners already store as null when not finite.
HEADLINE_FIELDS: dict[str, tuple[str, ...]] = {
    "eigenvalues": ("eigenvalues",),
    "trace": ("trace",),
    "spectrum": ("lambda_min", "lambda_max"),
    "sharpness": ("value",),  # base_loss: NaN for lambda_max by design; the worker checks the loss
    "barrier": ("loss_a", "loss_b"),
    "surface": (),
    "eos": ("lambda_max", "ratio"),
    "pacbayes": ("sigma", "base_loss"),
    "noise": ("grad_norm", "noise_trace", "loss"),
    "critical": ("grad_norm", "lambda_min", "lambda_max"),
}
# What names a row among a task's rows, for the failure message.
_ROW_LABELS = ("measure", "path", "eval_set")


def check_headlines(kind: str, record: dict, checkpoint: str) -> None:
    """Refuse a record whose headline quantities (:data:`HEADLINE_FIELDS`) are not all finite.

    Args:
        kind: the probe kind.
        record: the runner's record (``{"rows": [...]}`` or one row).
        checkpoint: the task's checkpoint, named where a row does not carry its own.

    Raises:
        NonFiniteError: naming the kind, the quantity (and row), the value and the checkpoint.
    """
    for row in record.get("rows", [record]):
        for name in HEADLINE_FIELDS.get(kind, ()):
            value = row.get(name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for i, v in enumerate(values):
                if v is None or math.isfinite(v):
                    continue
                quantity = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                where = ", ".join(f"{k} {row[k]}" for k in _ROW_LABELS if row.get(k) is not None)
                raise NonFiniteError(
                    f"non-finite result: {kind} {quantity}{f' ({where})' if where else ''} is {v} at checkpoint "
                    f"{row.get('checkpoint', checkpoint)!r}: the products, gradients or losses this probe evaluated "
                    "overflowed or are undefined (check the loss function's derivatives, the precision, the data "
                    "and the weights); no row is stored and the task is retried after its backoff"
                )


def run_probe(kind: str, ctx: ProbeContext, options: dict[str, Any], seed: int) -> dict:
    """Run probe ``kind`` with resolved ``options`` and randomness from ``seed``.

    Raises:
        ValueError: for a kind without a runner.
        NonFiniteError: when a headline quantity of the record is NaN or infinite (see
            :func:`check_headlines`).
    """
    if kind not in RUNNERS:
        raise ValueError(f"no runner for probe kind {kind!r}; available: {', '.join(RUNNERS)}")
    record = RUNNERS[kind](ctx, options, torch.Generator().manual_seed(seed))
    check_headlines(kind, record, ctx.checkpoint)
    return record
