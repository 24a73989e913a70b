"""Adam's frozen preconditioner and the symmetric preconditioned Hessian ``P^{-1/2} H P^{-1/2}``.

Used by :mod:`probe.eos` for Adam's edge of stability (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"): the stability threshold
applies to ``λ_max(P⁻¹H)``, which equals ``λ_max(P^{-1/2} H P^{-1/2})`` (similar
matrices), and the latter is symmetric, so the Lanczos engine applies. See
:mod:`probe.eos` for how P relates to ``torch.optim.Adam``'s update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from probe.operators import CurvatureOperator, norm

__all__ = ["DEFAULT_ADAM_BETA1", "PreconditionedOperator", "adam_preconditioner"]

DEFAULT_ADAM_BETA1 = 0.9  # torch.optim.Adam's default betas[0]


def adam_preconditioner(
    exp_avg_sq: Tensor | Sequence[Tensor],
    step: int | float | Tensor,
    *,
    beta1: float = DEFAULT_ADAM_BETA1,
    beta2: float = 0.999,
    eps: float = 1e-8,
    first_moment_correction: bool = True,
) -> Tensor:
    """Diagonal of Adam's frozen preconditioner ``P = (1 − β₁ᵗ)·(√(v/(1 − β₂ᵗ)) + ε)``.

    This is the P with ``θ_{t} − θ_{t+1} = η P⁻¹ m`` for ``torch.optim.Adam``'s step
    number t (its ``state["step"]``) and second moment v (``state["exp_avg_sq"]``);
    defaults are torch's (β₁ = 0.9, β₂ = 0.999, ε = 1e-8). The module docstring says
    how this relates to Cohen et al. 2022's P.

    Args:
        exp_avg_sq: v as one flat tensor, or per-parameter tensors (flattened and
            concatenated in the given order, which must be the operator's).
        step: Adam's step count t ≥ 1 (a tensor, as torch stores it, is accepted).
        beta1, beta2, eps: the optimizer's hyper-parameters.
        first_moment_correction: include the factor ``1 − β₁ᵗ`` (True, the update
            torch takes) or not (the "diag(√v̂ + ε)" often quoted; equal for large t).

    Returns:
        ``(dim,)`` diagonal of P in v's dtype.

    Raises:
        ValueError: for ``step < 1``, betas outside [0, 1), ``eps < 0``, or negative
            or non-finite entries of ``exp_avg_sq``.
    """
    if not isinstance(exp_avg_sq, Tensor):
        exp_avg_sq = torch.cat([t.reshape(-1) for t in exp_avg_sq])
    v = exp_avg_sq.detach().reshape(-1)
    t = float(step)
    if t < 1:
        raise ValueError(f"step must be ≥ 1 (Adam's state['step'] after its first update), got step={t:g}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {name}={b}; torch's defaults are (0.9, 0.999)")
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got eps={eps}; torch's default is 1e-8")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError(
            f"exp_avg_sq must be finite and non-negative, got min={float(v.min()):.3g}; "
            "pass the optimizer state's exp_avg_sq (squared-gradient average)"
        )
    p = (v / (1.0 - beta2**t)).sqrt() + eps
    if first_moment_correction:
        p = p * (1.0 - beta1**t)
    return p


class PreconditionedOperator(CurvatureOperator):
    """``P^{-1/2} A P^{-1/2}`` for a symmetric operator A and a positive diagonal P.

    Symmetric, with the eigenvalues of ``P⁻¹A`` (it equals ``P^{1/2}(P⁻¹A)P^{-1/2}``).
    An eigenvector u of this operator gives the eigenvector ``P^{-1/2}u`` of ``P⁻¹A``
    (:meth:`to_parameter_direction`). Sharding and the inner product are ``op``'s.

    Args:
        op: the operator A (e.g. a :class:`~probe.hessian.HessianOperator`).
        diag: ``(local_dim,)`` diagonal of P for this process's shard (e.g. from
            :func:`adam_preconditioner`); converted to ``op``'s dtype and device.

    Raises:
        ValueError: if ``diag`` has the wrong shape or an entry that is not positive
            and finite.
    """

    def __init__(self, op: CurvatureOperator, diag: Tensor) -> None:
        if diag.ndim != 1 or diag.shape[0] != op.local_dim:
            raise ValueError(
                f"diag must have shape (local_dim={op.local_dim},), got {tuple(diag.shape)}; "
                "pass this process's shard of the preconditioner's diagonal"
            )
        diag = diag.detach().to(dtype=op.dtype, device=op.device)
        if not bool(torch.isfinite(diag).all()) or bool((diag <= 0).any()):
            raise ValueError(
                f"diag must be positive and finite, got min={float(diag.min()):.3g}; "
                "use eps > 0 in adam_preconditioner or clamp the diagonal"
            )
        self.op = op
        self.diag = diag
        self._scale = diag.rsqrt().unsqueeze(1)  # (local_dim, 1): P^{-1/2}
        self.dim, self.local_dim = op.dim, op.local_dim
        self.dtype, self.device = op.dtype, op.device

    def allreduce(self, t: Tensor) -> Tensor:
        return self.op.allreduce(t)

    @property
    def local_slice(self) -> slice:
        return self.op.local_slice

    def _matmat(self, V: Tensor) -> Tensor:
        return self._scale * self.op.matmat(self._scale * V)

    def to_parameter_direction(self, u: Tensor) -> Tensor:
        """``P^{-1/2}u`` normalized: the eigenvector of ``P⁻¹A`` for an eigenvector u of this operator."""
        w = self._scale.squeeze(1) * u if u.ndim == 1 else self._scale * u
        return w / norm(self, w)
