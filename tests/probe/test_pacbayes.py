"""PAC-Bayes flatness against closed forms: a quadratic loss, Gaussian KL, the kl inverse,
rescaling invariance of the magnitude variant, and the memorization contrast on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.eigen import eigenvalues
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.pacbayes import gaussian_kl, kl_bernoulli, kl_inverse, pacbayes


def quadratic(seed: int = 0, n: int = 64, d: int = 20):
    """Least squares: L(θ) = mean (xᵢᵀθ − yᵢ)², so E L(θ+σz) − L(θ) = σ² tr(H)/2 = σ² mean‖xᵢ‖² exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    ev = Evaluator(model, F.mse_loss, [(x[:40], y[:40]), (x[40:], y[40:])], chunk_size=64)
    half_trace = float((x**2).sum(1).mean())
    return ev, half_trace


def test_quadratic_sigma_star_matches_the_closed_form_within_its_error_and_error_shrinks():
    target = 0.05
    errors = {}
    for samples in (8, 128, 2048):
        rel = []
        for seed in range(6):
            ev, half_trace = quadratic()
            truth = math.sqrt(target / half_trace)
            r = pacbayes(ev, target=target, samples=samples, generator=torch.Generator().manual_seed(seed))
            assert "did not bracket" not in r.note and r.variant == "isotropic"
            # bisection converged onto the target (f ∝ σ², σ within rtol=1e-3 below σ*)
            assert target * (1 - 3e-3) <= r.expected_loss_increase <= target
            if samples >= 128:  # (with 4 pairs the standard error itself is too noisy to test coverage)
                assert abs(r.sigma - truth) <= 4 * r.sigma_stderr
            rel.append(abs(r.sigma - truth) / truth)
        errors[samples] = sum(rel) / len(rel)
    assert errors[2048] < errors[128] < errors[8]
    assert errors[2048] < 0.01


def test_quadratic_without_classification_gives_no_bound_and_says_why():
    ev, _ = quadratic()
    r = pacbayes(ev, target=0.05, samples=8, generator=torch.Generator().manual_seed(0))
    assert math.isnan(r.bound) and math.isnan(r.expected_error) and "0-1 error" in r.note


def test_gaussian_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(50, generator=g, dtype=torch.float64)
    s = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    q = torch.distributions.Normal(theta, s)
    want = float(
        torch.distributions.kl_divergence(
            q, torch.distributions.Normal(torch.zeros(50, dtype=torch.float64), 0.7)
        ).sum()
    )
    assert gaussian_kl(theta, s, 0.7) == pytest.approx(want, rel=1e-12)
    want_same = float(
        torch.distributions.kl_divergence(q, torch.distributions.Normal(torch.zeros_like(theta), s)).sum()
    )
    assert gaussian_kl(theta, s, None) == pytest.approx(want_same, rel=1e-12)


@pytest.mark.parametrize("q, c", [(0.0, 0.1), (0.1, 0.05), (0.3, 0.4), (0.9, 0.01)])
def test_kl_inverse_is_the_largest_p_within_the_budget(q, c):
    p = kl_inverse(q, c)
    assert q <= p <= 1
    assert kl_bernoulli(q, p) == pytest.approx(c, abs=1e-9)
    assert kl_bernoulli(q, min(1.0, p + 1e-6)) > c
    if q == 0:
        assert p == pytest.approx(1 - math.exp(-c), abs=1e-10)  # kl(0‖p) = −ln(1−p)


def relu_net(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        net[0].weight *= scale
        net[0].bias *= scale
        net[2].weight /= scale
    return net


def digits(n: int = 256):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(bunch.target[:n], dtype=torch.long)
    return x, y


def test_magnitude_variant_is_invariant_to_rescaling_layers_and_isotropic_is_not():
    x, y = digits()
    batches = [(x, y)]
    got = {}
    for scale in (1.0, 8.0):
        for variant in ("magnitude", "isotropic"):
            ev = Evaluator(relu_net(scale), F.cross_entropy, batches)
            r = pacbayes(
                ev,
                target=0.05,
                variant=variant,
                samples=8,
                magnitude_eps=1e-12,
                generator=torch.Generator().manual_seed(0),
            )
            got[scale, variant] = r.sigma
    assert got[8.0, "magnitude"] == pytest.approx(got[1.0, "magnitude"], rel=1e-9)
    assert got[8.0, "isotropic"] < 0.5 * got[1.0, "isotropic"]


def test_bound_fields_are_consistent():
    x, y = digits()
    torch.manual_seed(0)
    ev = Evaluator(digits_mlp(hidden=16).double(), F.cross_entropy, [(x, y)])
    r = pacbayes(ev, target=0.1, samples=8, prior_sigma=0.5, delta=0.1, generator=torch.Generator().manual_seed(0))
    c = (r.kl + math.log(2 * math.sqrt(r.num_examples) / r.delta)) / r.num_examples
    assert r.num_examples == 256 and r.prior_sigma == 0.5 and "fixed in advance" in r.prior
    assert r.bound == pytest.approx(kl_inverse(r.expected_error, c), abs=1e-12)
    assert r.expected_error <= r.bound <= r.bound_sqrt <= 1


def train(x, y, steps: int = 800):
    torch.manual_seed(0)
    model = digits_mlp(hidden=32).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_memorizing_shuffled_labels_gives_a_sharper_solution():
    """Zhang et al. (2017): fitting random labels lands in sharper minima (smaller σ*, larger λ_max)."""
    x, y = digits()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    out = {}
    for name, labels in (("true", y), ("shuffled", shuffled)):
        model = train(x, labels)
        assert F.cross_entropy(model(x), labels).item() < 0.05  # both fit their labels
        ev = Evaluator(model, F.cross_entropy, [(x, labels)])
        r = pacbayes(ev, target=0.1, samples=16, generator=torch.Generator().manual_seed(1))
        lam = (
            eigenvalues(
                HessianOperator(model, F.cross_entropy, [(x, labels)]), 1, generator=torch.Generator().manual_seed(0)
            )
            .eigenvalues[0]
            .item()
        )
        out[name] = (r.sigma, r.sigma_stderr, lam)
    (s_true, se_true, lam_true), (s_shuf, se_shuf, lam_shuf) = out["true"], out["shuffled"]
    assert s_shuf + 3 * se_shuf < s_true - 3 * se_true
    assert lam_shuf > 5 * lam_true


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "gaussian"}, "variant must be one of"),
        ({"samples": 7}, "even integer"),
        ({"samples": 2}, "even integer"),
        ({"target": 0}, "target must be a positive"),
        ({"prior_sigma": -1.0}, "prior_sigma must be a positive"),
        ({"delta": 1.5}, "delta must be below 1"),
    ],
)
def test_bad_options_are_refused_naming_them(kwargs, message):
    ev, _ = quadratic()
    with pytest.raises(ValueError, match=message):
        pacbayes(ev, **kwargs)
