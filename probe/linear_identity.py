"""Per-example gradient norms without per-example gradients, for ``nn.Linear`` layers (Goodfellow 2015).

For a linear layer ``y = a Wᵀ + b`` on ``(batch, features)`` inputs, example ``i``'s
gradient is ``δᵢ aᵢᵀ`` (``δᵢ = ∂ℓᵢ/∂yᵢ``), so ``‖∂ℓᵢ/∂W‖² = ‖δᵢ‖²‖aᵢ‖²`` and
``‖∂ℓᵢ/∂b‖² = ‖δᵢ‖²``; the gradient sum is one ordinary backward of ``Σᵢ ℓᵢ``. Used
by :func:`probe.noise.gradient_moments` (``method="linear"``), which falls back to
forming the gradients where :class:`NotLinear` says the identity does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import vmap

from probe.batches import call_model
from probe.model_operator import model_mode
from probe.params import ParameterSpace

__all__ = ["NotLinear", "linear_owners", "linear_sums"]


class NotLinear(Exception):
    """The model's forward breaks the layer identity (a layer reused, or a non-matrix input)."""


def linear_owners(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Linear, str]] | None:
    """``{parameter name: (its nn.Linear, "weight" | "bias")}``, or None when some parameter is not a Linear's."""
    modules = dict(model.named_modules())
    owners = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        module = modules.get(prefix)
        if not isinstance(module, nn.Linear) or leaf not in ("weight", "bias"):
            return None
        owners[name] = (module, leaf)
    return owners


def linear_sums(model, loss_fn, moved, space: ParameterSpace, owners, mode: str = "eval") -> dict:
    """The sums of :class:`probe.noise.GradientMoments` from the layer identity: one forward and backward
    of ``Σᵢ ℓᵢ`` per batch (see ``gradient_moments``' ``method``), the model in ``mode``.

    In train mode the batched forward draws every example's dropout masks independently
    (dropout is elementwise), so example ``i``'s loss still depends on example ``i`` only
    and the identity holds for the masks drawn; BatchNorm, whose batch statistics couple
    the examples, is refused by the caller before this runs.
    """
    layers = list(dict.fromkeys(m for m, _ in owners.values()))
    selected = space.parameters(model)
    device = selected[0].device
    seen: dict[nn.Linear, list] = {}

    def capture(module, inputs, output):
        if module in seen:
            raise NotLinear("an nn.Linear is called more than once per forward (shared weights)")
        if inputs[0].ndim != 2:
            raise NotLinear(f"an nn.Linear gets inputs of shape {tuple(inputs[0].shape)}, not (batch, features)")
        seen[module] = [inputs[0].detach(), output]

    sum_grad = torch.zeros(space.dim, dtype=torch.float64, device=device)
    sum_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
    sum_loss = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    count, largest = 0, 0
    handles = [m.register_forward_hook(capture) for m in layers]
    try:
        with model_mode(model, mode), torch.enable_grad():
            for x, y in moved:
                seen.clear()
                out = call_model(model, x)
                # per-example losses (exact per example whatever the loss's batch reduction)
                losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
                if set(seen) != set(layers):
                    raise NotLinear("an nn.Linear holding selected parameters is not called in the forward")
                outputs = [seen[m][1] for m in layers]
                grads = torch.autograd.grad(losses.sum(), outputs + selected, allow_unused=True)
                deltas = dict(zip(layers, grads[: len(layers)], strict=True))
                param_grads = grads[len(layers) :]
                c = losses.shape[0]
                sq = torch.zeros(c, dtype=torch.float64, device=device)
                for name in space.names:
                    module, leaf = owners[name]
                    d2 = deltas[module].to(torch.float64).pow(2).sum(1)  # ‖δᵢ‖²
                    sq += d2 * seen[module][0].to(torch.float64).pow(2).sum(1) if leaf == "weight" else d2
                flat = torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(param_grads, selected, strict=True)
                    ]
                )
                sum_grad += flat.to(torch.float64)
                sum_sq_norm += sq.sum()
                losses = losses.detach().to(torch.float64)
                sum_loss += losses.sum()
                nonfinite += (~torch.isfinite(sq) | ~torch.isfinite(losses)).sum()
                count += c
                largest = max(largest, c)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return {
        "sum_grad": sum_grad,
        "sum_sq_norm": sum_sq_norm,
        "sum_loss": sum_loss,
        "count": count,
        "num_nonfinite": int(nonfinite),
        "chunk_size": largest,
    }
