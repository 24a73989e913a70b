"""Critical-point classification: the stated rule on matrices with known spectra, and the
inputs of the decision against the exact Hessian of a digits network."""

from __future__ import annotations

import pytest
import torch

from probe.critical import LABELS, RULE, classify_critical_point


def exact_negative_mass(lam: torch.Tensor) -> float:
    return float((-lam).clamp_min(0).sum() / lam.abs().sum())


def test_positive_definite_with_zero_gradient_is_a_near_minimum(known_spectrum):
    ks = known_spectrum(torch.linspace(0.01, 3.0, 120))
    r = classify_critical_point(
        ks.op, torch.zeros(120, dtype=torch.float64), runs=6, steps=40, generator=torch.Generator().manual_seed(0)
    )
    assert r.label == "near_minimum" and r.grad_norm == 0.0
    assert r.lambda_max == pytest.approx(3.0, rel=1e-10) and r.lambda_min == pytest.approx(0.01, rel=1e-6)
    assert r.negative_mass == pytest.approx(0.0, abs=1e-12)
    assert r.rule == RULE and r.label in LABELS


def test_indefinite_spectrum_is_a_saddle_with_the_exact_negative_mass(known_spectrum):
    lam = torch.cat([torch.linspace(-0.5, -0.1, 15), torch.linspace(0.05, 2.0, 105)])
    ks = known_spectrum(lam)
    r = classify_critical_point(ks.op, 1e-5, runs=20, steps=40, generator=torch.Generator().manual_seed(1))
    assert r.label == "saddle"
    assert r.lambda_min == pytest.approx(-0.5, rel=1e-8)
    assert abs(r.negative_mass - exact_negative_mass(lam)) <= 3 * r.negative_mass_stderr
    # the same spectrum with a large gradient is not critical, whatever its curvature
    far = classify_critical_point(ks.op, 0.5, runs=4, steps=20, generator=torch.Generator().manual_seed(1))
    assert far.label == "not_critical" and far.grad_norm == 0.5
    # a threshold above the mass makes it a near-minimum: the rule uses the stated threshold
    lenient = classify_critical_point(
        ks.op, 0.0, negative_mass_threshold=0.5, runs=4, steps=20, generator=torch.Generator().manual_seed(1)
    )
    assert lenient.label == "near_minimum" and lenient.negative_mass_threshold == 0.5


def test_inputs_match_the_exact_hessian_of_a_digits_network(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    lam = mlp_problem.eigenvalues
    r = classify_critical_point(op, 0.0, runs=12, steps=60, generator=torch.Generator().manual_seed(2))
    assert r.lambda_max == pytest.approx(float(lam[-1]), rel=1e-9)
    assert r.lambda_min == pytest.approx(float(lam[0]), rel=1e-6)
    exact = exact_negative_mass(lam)
    assert exact > 0.01 and r.label == "saddle"  # 40 GD steps from initialization: negative curvature remains
    assert abs(r.negative_mass - exact) <= 3 * r.negative_mass_stderr


@pytest.mark.parametrize("kwargs", [{"grad_norm_threshold": -1.0}, {"negative_mass_threshold": float("nan")}])
def test_bad_thresholds_are_refused(known_spectrum, kwargs):
    with pytest.raises(ValueError, match="must be a non-negative finite number"):
        classify_critical_point(known_spectrum(torch.ones(4)).op, 0.0, **kwargs)
