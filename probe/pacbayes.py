"""PAC-Bayes flatness: the largest Gaussian perturbation a solution tolerates, and the bound it buys.

σ* is the largest σ with ``E_{δ~N(0,Σ_σ)} L(θ+δ) − L(θ) ≤ target`` (Jiang et al.
2020's "PAC-Bayes sharpness" search, Dziugaite & Roy 2017's posterior), where

- ``variant="isotropic"``: ``Σ_σ = σ² I``;
- ``variant="magnitude"``: ``Σ_σ = σ² diag((|θ_i| + ε)²)`` (Jiang et al.'s magnitude-aware
  perturbation; σ is then relative to each weight's size, and invariant to rescaling
  a layer when ε is negligible).

The expectation is a Monte Carlo mean over ``samples`` standard-normal draws ``z``
used in antithetic pairs ``±z`` (which cancel the gradient term exactly) and kept
fixed across the search (common random numbers), so the estimate is a smooth
function of σ and bisection on log σ is well defined. With a train-mode evaluator
(``mode="train"``: batch statistics, live dropout) this holds for BatchNorm, whose
batch statistics are a deterministic function of θ, but live dropout redraws its
masks at every evaluation unless the evaluator has a ``dropout_seed``; the record's
note then says so. Its standard error comes from
the spread over pairs; the standard error of σ* follows by the delta method
(``se_f / f'(σ*)``, the slope from the final bracket).

The bound: with posterior ``Q = N(θ, Σ_σ*)``, prior ``P = N(0, σ_P² I)`` (``prior_sigma``;
by default ``σ_P`` equals the posterior's per-coordinate scale, which makes
``KL = Σ θ_i² / (2 s_i²)`` — the form used by Jiang et al. 2020 and Neyshabur et al.
2017, who do not pay for choosing the prior after seeing the data; pass a number to
get a prior fixed in advance), and ``n`` examples, with probability ``1 − δ``

    kl(ê_Q ‖ e_Q) ≤ (KL(Q‖P) + ln(2√n/δ)) / n        (Maurer 2004; Seeger 2002)

where ``ê_Q`` is the posterior's empirical 0-1 error. ``bound`` is the largest
``e_Q`` allowed (the kl inverse); ``bound_sqrt = ê_Q + sqrt(c/2)`` is the looser
McAllester form (Pinsker). Both are bounds on the *test* error only when the ``n``
examples are the training set and ``ê_Q`` is exact: here ``ê_Q`` is itself a Monte
Carlo estimate (its standard error is reported, not folded into the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.evaluate import Evaluator

__all__ = ["PacBayesResult", "pacbayes", "kl_inverse", "gaussian_kl"]

VARIANTS = ("isotropic", "magnitude")
MAGNITUDE_EPS = 1e-3  # ε in (|θ_i| + ε): keeps zero weights perturbable


@dataclass(frozen=True)
class PacBayesResult:
    """σ* and the PAC-Bayes bound at one solution.

    Attributes:
        variant: ``isotropic`` or ``magnitude``.
        sigma: σ* (isotropic: per-coordinate std; magnitude: the multiplier of ``|θ_i| + ε``).
        sigma_stderr: its Monte Carlo standard error (delta method).
        target: the allowed expected loss increase.
        expected_loss_increase, expected_loss_increase_stderr: the estimate at σ*.
        base_loss, base_error: ``L(θ)`` and the 0-1 error at θ (NaN if not classification).
        expected_error, expected_error_stderr: ``ê_Q``, the posterior's mean 0-1 error.
        kl: ``KL(Q‖P)``; prior_sigma: σ_P (NaN when it follows the posterior per coordinate).
        prior: a sentence naming the prior used.
        num_examples, delta: n and δ of the bound.
        bound, bound_sqrt: the kl-inverse and square-root bounds on the expected 0-1 error.
        samples: perturbations per estimate (antithetic pairs × 2).
        num_evaluations: loss evaluations over the probe set.
        bisection_steps: evaluations of the estimate during the search.
        note: why something is NaN, or ``""``.
    """

    variant: str
    sigma: float
    sigma_stderr: float
    target: float
    expected_loss_increase: float
    expected_loss_increase_stderr: float
    base_loss: float
    base_error: float
    expected_error: float
    expected_error_stderr: float
    kl: float
    prior_sigma: float
    prior: str
    num_examples: int
    delta: float
    bound: float
    bound_sqrt: float
    samples: int
    num_evaluations: int
    bisection_steps: int
    note: str = ""


def kl_bernoulli(q: float, p: float) -> float:
    """``kl(q‖p)`` between Bernoulli distributions (nats)."""
    eps = 1e-300
    out = 0.0
    if q > 0:
        out += q * math.log(q / max(p, eps))
    if q < 1:
        out += (1 - q) * math.log((1 - q) / max(1 - p, eps))
    return out


def kl_inverse(q: float, c: float, *, tol: float = 1e-12) -> float:
    """The largest ``p ∈ [q, 1]`` with ``kl(q‖p) ≤ c`` (bisection)."""
    if not 0.0 <= q <= 1.0 or not c >= 0.0:
        raise ValueError(f"kl_inverse needs q in [0, 1] and c >= 0, got q={q!r}, c={c!r}")
    lo, hi = q, 1.0
    if kl_bernoulli(q, hi) <= c:
        return 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl_bernoulli(q, mid) <= c else (lo, mid)
    return lo


def gaussian_kl(theta: Tensor, posterior_std: Tensor, prior_std: float | None) -> float:
    """``KL(N(θ, diag(s²)) ‖ N(0, σ_P² I))``; with ``prior_std=None`` the prior's std is ``s_i`` per coordinate."""
    theta, s = theta.to(torch.float64), posterior_std.to(torch.float64)
    if prior_std is None:
        return float((theta**2 / (2 * s**2)).sum())
    p2 = float(prior_std) ** 2
    return float(0.5 * (s**2 / p2 + theta**2 / p2 - 1 + torch.log(p2 / s**2)).sum())


def _positive(name: str, value, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}; {hint}")
    return float(value)


class _Estimate:
    """``f(σ) = mean_j L(θ + σ s ⊙ z_j) − L(θ)`` over fixed antithetic draws, with standard errors."""

    def __init__(self, ev: Evaluator, theta: Tensor, scale: Tensor, pairs: int, seed: int) -> None:
        self.ev, self.theta, self.scale, self.pairs, self.seed = ev, theta, scale, pairs, seed
        self.block = max(1, ev.chunk_size // 2)
        self.calls = 0

    def _z(self, start: int, count: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + start)  # regenerated per block: never all in memory
        return torch.randn(count, self.theta.shape[0], generator=g, dtype=torch.float64)

    def __call__(self, sigma: float) -> tuple[Tensor, Tensor]:
        """Per-pair mean loss and error at ``σ`` (float64, ``(pairs,)`` each)."""
        self.calls += 1
        losses, errors = [], []
        for start in range(0, self.pairs, self.block):
            count = min(self.block, self.pairs - start)
            d = (self._z(start, count) * self.scale * sigma).to(self.theta.dtype).to(self.theta.device)
            pts = torch.cat([self.theta + d, self.theta - d])
            loss, err = self.ev.losses(pts)
            losses.append((loss[:count] + loss[count:]) / 2)
            errors.append((err[:count] + err[count:]) / 2)
        return torch.cat(losses), torch.cat(errors)


def _se(x: Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def pacbayes(
    ev: Evaluator,
    *,
    target: float = 0.1,
    variant: str = "isotropic",
    samples: int = 32,
    prior_sigma: float | None = None,
    delta: float = 0.05,
    num_examples: int | None = None,
    rtol: float = 1e-3,
    max_steps: int = 200,
    magnitude_eps: float = MAGNITUDE_EPS,
    generator: torch.Generator | None = None,
) -> PacBayesResult:
    """σ* by bisection on log σ, and the PAC-Bayes bound at ``Q = N(θ, Σ_σ*)``.

    Args:
        ev: the evaluator of the mean loss (and 0-1 error) over the probe set; θ is its center.
        target: allowed expected increase of the mean loss; default 0.1 (Jiang et al. 2020
            use a 0.1 deviation, of the training accuracy).
        variant: ``isotropic`` or ``magnitude`` (see the module docstring).
        samples: perturbations per estimate, an even number (antithetic pairs); default 32.
        prior_sigma: σ_P of the prior ``N(0, σ_P² I)``; None: the posterior's scale per coordinate.
        delta: confidence parameter of the bound; default 0.05.
        num_examples: n of the bound; default the evaluator's example count.
        rtol: relative width at which the bisection stops; default 1e-3.
        max_steps: cap on evaluations of the estimate (bracketing and bisection).
        magnitude_eps: ε of the magnitude variant.
        generator: randomness of the draws.

    Raises:
        ValueError: for an unknown variant, an odd or too small ``samples``, or
            non-positive ``target``/``prior_sigma``/``delta``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got variant={variant!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 4 or samples % 2:
        raise ValueError(f"samples must be an even integer >= 4 (antithetic pairs), got samples={samples!r}")
    target = _positive("target", target, "it is the allowed expected increase of the mean loss, e.g. 0.1")
    if prior_sigma is not None:
        prior_sigma = _positive("prior_sigma", prior_sigma, "omit it to use the posterior's scale")
    delta = _positive("delta", delta, "the bound holds with probability 1 − δ, e.g. 0.05")
    if delta >= 1:
        raise ValueError(f"delta must be below 1, got delta={delta!r}")
    theta = ev.center().detach()
    n = int(num_examples if num_examples is not None else ev.num_examples)
    base_loss, base_error = ev.loss_and_error(theta)
    evaluations_before = ev.num_evaluations
    scale = (
        torch.ones_like(theta, dtype=torch.float64)
        if variant == "isotropic"
        else (theta.detach().abs().to(torch.float64) + magnitude_eps)
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    f = _Estimate(ev, theta, scale, samples // 2, seed)
    notes = []

    def excess(sigma: float) -> tuple[float, Tensor, Tensor]:
        loss, err = f(sigma)
        mean = float(loss.mean()) - base_loss
        return (mean if math.isfinite(mean) else math.inf), loss, err

    # Bracket: grow from a scale-aware guess until the increase exceeds the target.
    rms = float(theta.to(torch.float64).pow(2).mean().sqrt()) or 1.0
    hi = 1e-2 * (rms if variant == "isotropic" else 1.0)
    lo, f_lo = 0.0, 0.0
    f_hi = excess(hi)[0]  # only the lower end's losses enter the standard error
    while f_hi <= target and f.calls < max_steps:
        lo, f_lo = hi, f_hi
        hi *= 4.0
        f_hi = excess(hi)[0]
    while lo == 0.0 and f.calls < max_steps:  # the guess overshot: shrink until below the target
        hi_next = hi / 4.0
        f_mid = excess(hi_next)[0]
        if f_mid <= target:
            lo, f_lo = hi_next, f_mid
        else:
            hi, f_hi = hi_next, f_mid
    if f_hi <= target or lo == 0.0:
        notes.append(f"search did not bracket σ* within {max_steps} evaluations")
    if getattr(ev, "randomness_note", ""):  # train mode, live dropout: f(σ) is no longer a smooth function of σ
        notes.append(ev.randomness_note)
    loss_lo = err_lo = None
    while hi / max(lo, 1e-300) - 1 > rtol and f.calls < max_steps and lo > 0:
        mid = math.sqrt(lo * hi)
        f_mid, loss_mid, err_mid = excess(mid)
        if f_mid <= target:
            lo, f_lo, loss_lo, err_lo = mid, f_mid, loss_mid, err_mid
        else:
            hi, f_hi = mid, f_mid
    if loss_lo is None:
        f_lo, loss_lo, err_lo = excess(lo) if lo > 0 else (0.0, torch.full((samples // 2,), base_loss), None)
    sigma = lo  # the largest σ known to satisfy the constraint
    slope = (f_hi - f_lo) / (hi - lo) if hi > lo and math.isfinite(f_hi) else float("nan")
    se_f = _se(loss_lo)
    sigma_se = se_f / slope if slope and slope > 0 and math.isfinite(slope) else float("nan")

    posterior_std = sigma * scale
    kl = gaussian_kl(theta, posterior_std, prior_sigma) if sigma > 0 else float("inf")
    if prior_sigma is None:
        prior = "N(0, s_i²) with s_i the posterior's std per coordinate (chosen after the data; no union bound)"
    else:
        prior = f"N(0, {prior_sigma:g}² I), fixed in advance"
    if ev.classification and err_lo is not None:
        e_q, e_q_se = float(err_lo.mean()), _se(err_lo)
        c = (kl + math.log(2 * math.sqrt(n) / delta)) / n
        bound = kl_inverse(min(max(e_q, 0.0), 1.0), c) if math.isfinite(c) else 1.0
        bound_sqrt = min(1.0, e_q + math.sqrt(c / 2))
    else:
        e_q = e_q_se = bound = bound_sqrt = float("nan")
        notes.append("no 0-1 error (not a classification task): the bound needs a loss in [0, 1]")
    return PacBayesResult(
        variant=variant,
        sigma=sigma,
        sigma_stderr=sigma_se,
        target=target,
        expected_loss_increase=f_lo,
        expected_loss_increase_stderr=se_f,
        base_loss=base_loss,
        base_error=base_error,
        expected_error=e_q,
        expected_error_stderr=e_q_se,
        kl=kl,
        prior_sigma=float("nan") if prior_sigma is None else prior_sigma,
        prior=prior,
        num_examples=n,
        delta=delta,
        bound=bound,
        bound_sqrt=bound_sqrt,
        samples=samples,
        num_evaluations=ev.num_evaluations - evaluations_before,
        bisection_steps=f.calls,
        note="; ".join(notes),
    )
