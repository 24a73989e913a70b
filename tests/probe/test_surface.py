"""probe.directions and probe.surface: normalization, vectorized grids, invariance, eigen and PCA directions.

References are exact where they can be: filter norms of θ (float64), per-point
``Evaluator.loss`` for the grid, a ReLU network and its rescaled twin computing the
same function (Li et al. 2018, Sec. 3), a finite-difference curvature against the
Lanczos eigenvalue, and a synthetic trajectory with a known dominant direction.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cluster.data import digits_tensors
from probe.directions import (
    Directions,
    eigen_directions,
    normalize,
    pca_directions,
    random_direction,
    random_directions,
)
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator
from probe.models import digits_cnn, digits_mlp
from probe.params import ParameterSpace
from probe.surface import SurfaceResult, loss_surface, surface

NUM_EXAMPLES = 160  # split into batches of 96 and 64: unequal sizes exercise the evaluator's weighting
SCALE = 5.0  # the reparameterization factor α of issue 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def trained(factory, *, seed: int = 0, steps: int = 30, lr: float = 0.5, record: bool = False):
    """A float64 digits network after ``steps`` full-batch GD steps, its batches and (optionally) its trajectory."""
    x, y = digits_tensors(split="train")
    x, y = x[:NUM_EXAMPLES].to(torch.float64), y[:NUM_EXAMPLES]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory().to(torch.float64)
    space = ParameterSpace.of(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    path = [space.get_flat(model)]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if record:
            path.append(space.get_flat(model))
    model.eval()
    batches = [(x[:96], y[:96]), (x[96:], y[96:])]
    return model, batches, path


@pytest.fixture(scope="module")
def relu_mlp():
    model, batches, _ = trained(lambda: digits_mlp(hidden=16, activation="relu"), steps=100)
    return model, batches


@pytest.fixture(scope="module")
def tanh_mlp():
    model, batches, path = trained(lambda: digits_mlp(hidden=12), record=True)
    return model, batches, path


def rescaled(model, alpha: float):
    """The twin computing the same function: layer 1 (weight, bias) × α, layer 2 weight × 1/α (ReLU: 1-homogeneous)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[1].weight.mul_(alpha)
        twin[1].bias.mul_(alpha)
        twin[3].weight.div_(alpha)
    return twin


# --- normalization -----------------------------------------------------------------


@pytest.mark.parametrize("factory", [lambda: digits_mlp(hidden=8), digits_cnn], ids=["linear", "conv"])
def test_filter_normalized_filters_have_the_norms_of_theta_filters(factory):
    torch.manual_seed(0)
    model = factory().to(torch.float64)
    space = ParameterSpace.of(model)
    theta = space.get_flat(model)
    d = normalize(random_direction(space, seeded(1)), theta, space, "filter")
    checked = 0
    for name, dp, tp in zip(space.names, space.unflatten(d), space.unflatten(theta), strict=True):
        if tp.ndim <= 1:
            assert torch.all(dp == 0), f"{name}: 1-D parameter not zeroed"
            continue
        dn = torch.linalg.vector_norm(dp.reshape(dp.shape[0], -1), dim=1)  # one per output row / channel
        tn = torch.linalg.vector_norm(tp.reshape(tp.shape[0], -1), dim=1)
        torch.testing.assert_close(dn, tn, rtol=1e-14, atol=0)
        checked += tp.shape[0]
    assert checked > 10


def test_layer_and_weight_normalization_and_kept_1d_parameters():
    torch.manual_seed(0)
    model = digits_cnn().to(torch.float64)
    space = ParameterSpace.of(model)
    theta, raw = space.get_flat(model), random_direction(space, seeded(2))
    layer = normalize(raw, theta, space, "layer", ignore_1d=False)
    for dp, tp in zip(space.unflatten(layer), space.unflatten(theta), strict=True):
        torch.testing.assert_close(dp.norm(), tp.norm(), rtol=1e-14, atol=0)  # biases kept, at θ's norm
    weight = normalize(raw, theta, space, "weight")
    for dp, rp, tp in zip(space.unflatten(weight), space.unflatten(raw), space.unflatten(theta), strict=True):
        expected = torch.zeros_like(rp) if tp.ndim <= 1 else rp * tp.abs()
        assert torch.equal(dp, expected)
    filt = normalize(raw, theta, space, "filter", ignore_1d=False)
    for dp, tp in zip(space.unflatten(filt), space.unflatten(theta), strict=True):
        if tp.ndim == 1:  # one filter: the whole bias vector at θ's norm
            torch.testing.assert_close(dp.norm(), tp.norm(), rtol=1e-14, atol=0)
    assert torch.equal(normalize(raw, theta, space, "none", ignore_1d=False), raw)


def test_zero_filters_stay_zero():
    space = ParameterSpace(names=("w",), shapes=(torch.Size([3, 2]),), numels=(6,))
    theta = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 4.0], dtype=torch.float64)
    d = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    out = normalize(d, theta, space, "filter")
    # row 0: zero direction stays zero; row 1: zero θ row gives zero; row 2: rescaled to ‖(3, 4)‖ = 5
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, 5.0, 0.0]


def test_random_directions_are_reproducible_and_nearly_orthogonal(relu_mlp):
    model, _ = relu_mlp
    space = ParameterSpace.of(model)
    theta = space.get_flat(model)
    a = random_directions(space, theta, 2, seeded(3))
    b = random_directions(space, theta, 2, seeded(3))
    assert torch.equal(a.vectors, b.vectors) and a.kind == "random" and a.normalization == "filter"
    cos = torch.nn.functional.cosine_similarity(a.vectors[0], a.vectors[1], dim=0)
    assert abs(float(cos)) < 5 / space.dim**0.5


# --- the grid ---------------------------------------------------------------------------


def test_surface_equals_per_point_evaluation(relu_mlp):
    model, batches = relu_mlp
    ev = Evaluator(model, F.cross_entropy, batches, chunk_size=3)  # chunks and blocks that do not divide the grid
    theta = ev.center()
    d = random_directions(ev.space, theta, 2, seeded(4))
    alphas, betas = [-0.5, -0.1, 0.0, 0.3, 0.7], [-0.4, 0.0, 0.2, 0.6]
    result = surface(ev, theta, d, alphas, betas, points_per_call=7)
    assert isinstance(result, SurfaceResult)
    assert result.loss.shape == (5, 4) and result.error.shape == (5, 4) and result.dims == 2
    assert result.num_evaluations == 20 and result.num_nonfinite == 0 and result.note == ""
    assert result.alphas == tuple(alphas) and result.betas == tuple(betas)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            loss, err = ev.loss_and_error(theta + a * d.vectors[0] + b * d.vectors[1])
            assert abs(result.loss[i, j].item() - loss) <= 1e-12 * abs(loss)
            assert result.error[i, j].item() == pytest.approx(err, abs=1e-15)
            assert result.loss_flat[i * len(betas) + j] == result.loss[i, j].item()  # row-major, alpha-major
    assert result.loss[2, 1].item() == pytest.approx(ev.loss(theta), rel=1e-13)  # (0, 0) is the center


def test_one_dimensional_surface_from_plain_vector(relu_mlp):
    model, batches = relu_mlp
    ev = Evaluator(model, F.cross_entropy, batches)
    theta = ev.center()
    v = random_direction(ev.space, seeded(5)) * 1e-2
    result = surface(ev, theta, v, torch.linspace(-1, 1, 9))
    assert result.dims == 1 and result.betas == () and result.loss.shape == (9,)
    assert result.directions == "given" and result.normalization == "none" and result.ignore_1d is False
    assert result.direction_norms[0] == pytest.approx(float(v.norm()), rel=1e-12)
    assert torch.isnan(torch.tensor(result.direction_cosine))
    assert result.loss[4].item() == pytest.approx(ev.loss(theta), rel=1e-13)


def test_float32_model_matches_float64_surface(relu_mlp):
    model, batches = relu_mlp
    model32 = copy.deepcopy(model).to(torch.float32)
    ev64 = Evaluator(model, F.cross_entropy, batches)
    ev32 = Evaluator(model32, F.cross_entropy, [(x.float(), y) for x, y in batches])
    kwargs = dict(dims=2, resolution=5, span=0.5)
    r64 = loss_surface(ev64, generator=seeded(6), **kwargs)
    r32 = loss_surface(ev32, generator=seeded(6), **kwargs)
    torch.testing.assert_close(r32.loss, r64.loss, rtol=1e-4, atol=0)


def test_nonfinite_losses_are_counted_not_hidden(relu_mlp):
    model, batches = relu_mlp
    ev = Evaluator(model, F.cross_entropy, batches)
    theta = ev.center()
    bad = torch.zeros_like(theta)
    bad[0] = 1e308
    result = surface(ev, theta, bad, [0.0, 10.0])  # 10·1e308 overflows to inf
    assert result.num_nonfinite == 1 and "non-finite" in result.note
    assert torch.isfinite(result.loss[0]) and not torch.isfinite(result.loss[1])


# --- reparameterization (issue 3, "Show") ------------------------------------------------


@pytest.mark.parametrize(
    "normalization,ignore_1d",
    [("filter", True), ("filter", False), ("layer", True), ("weight", True)],
)
@pytest.mark.parametrize("dims", [1, 2])
def test_normalized_surfaces_are_invariant_to_layer_rescaling(relu_mlp, normalization, ignore_1d, dims):
    model, batches = relu_mlp
    twin = rescaled(model, SCALE)
    ev, ev_twin = Evaluator(model, F.cross_entropy, batches), Evaluator(twin, F.cross_entropy, batches)
    assert not torch.allclose(ev.center(), ev_twin.center())
    assert ev_twin.loss(ev_twin.center()) == pytest.approx(ev.loss(ev.center()), rel=1e-12)  # same function
    kwargs = dict(
        dims=dims, resolution=7 if dims == 2 else 15, span=1.0, normalization=normalization, ignore_1d=ignore_1d
    )
    base = loss_surface(ev, generator=seeded(7), **kwargs)  # same seed: identical raw Gaussian draws
    other = loss_surface(ev_twin, generator=seeded(7), **kwargs)
    rel = ((other.loss - base.loss).abs() / base.loss.abs()).max().item()
    assert rel < 1e-6, f"{normalization}/{dims}-D surface changed by {rel:.3g} relative"
    assert base.loss.max() > 2 * base.loss.min()  # the grid leaves the minimum: the comparison is not trivial


@pytest.mark.parametrize("dims", [1, 2])
def test_unnormalized_surface_changes_under_rescaling(relu_mlp, dims):
    model, batches = relu_mlp
    ev = Evaluator(model, F.cross_entropy, batches)
    ev_twin = Evaluator(rescaled(model, SCALE), F.cross_entropy, batches)
    kwargs = dict(dims=dims, resolution=7, span=0.1, normalization="none")
    base = loss_surface(ev, generator=seeded(7), **kwargs)
    other = loss_surface(ev_twin, generator=seeded(7), **kwargs)
    rel = ((other.loss - base.loss).abs() / base.loss.abs()).max().item()
    assert rel > 0.05, f"unnormalized {dims}-D surface changed only {rel:.3g}"


# --- eigen and PCA directions --------------------------------------------------------------


def test_eigen_directions_are_orthonormal_and_give_curvature_lambda_max(tanh_mlp):
    model, batches, _ = tanh_mlp
    op = HessianOperator(model, F.cross_entropy, batches)
    d = eigen_directions(op, 2, seeded(8))
    assert d.kind == "eigen" and d.normalization == "none" and d.k == 2
    gram = d.vectors @ d.vectors.T
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)
    lam = d.eigenvalues[0].item()
    assert lam >= d.eigenvalues[1].item() > 0
    h = 1e-3
    ev = Evaluator(model, F.cross_entropy, batches)
    result = loss_surface(ev, dims=1, resolution=3, span=h, directions="eigen", op=op, generator=seeded(8))
    assert result.directions == "eigen" and result.eigenvalues[0] == pytest.approx(lam, rel=1e-8)
    lo, mid, hi = result.loss.tolist()
    curvature = (hi - 2 * mid + lo) / h**2  # central second difference: f'' + O(h²)
    assert curvature == pytest.approx(lam, rel=1e-3)  # measured 1.2e-6 at h=1e-3


def test_pca_directions_recover_the_dominant_direction():
    dim, n = 200, 12
    g = seeded(9)
    center = torch.randn(dim, generator=g, dtype=torch.float64)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u /= u.norm()
    w = torch.randn(dim, generator=g, dtype=torch.float64)
    w -= (w @ u) * u
    w /= w.norm()
    t = torch.linspace(1, 0, n, dtype=torch.float64)  # from the start (t=1) to the center (t=0)
    # the bend along w is uncorrelated with the progress along u, so PCA's first axis is u itself
    trajectory = [
        center
        + 5.0 * ti * u
        + 0.5 * torch.cos(2 * torch.pi * ti) * w
        + 1e-3 * torch.randn(dim, generator=g, dtype=torch.float64)
        for ti in t
    ]
    d = pca_directions(trajectory, center, 2)
    assert d.kind == "pca" and d.vectors.shape == (2, dim)
    assert abs(float(d.vectors[0] @ u)) > 0.999
    assert abs(float(d.vectors[1] @ w)) > 0.99
    torch.testing.assert_close(d.vectors @ d.vectors.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    ratio = d.explained_variance_ratio
    assert ratio[0] > 0.9 and ratio[0] > ratio[1] > 0 and ratio.sum() <= 1 + 1e-12
    assert d.trajectory_coordinates.shape == (n, 2) and d.trajectory_coordinates[0, 0] > 0


def test_pca_surface_of_a_training_run(tanh_mlp):
    model, batches, path = tanh_mlp
    ev = Evaluator(model, F.cross_entropy, batches)
    result = loss_surface(ev, dims=2, resolution=5, span=2.0, directions="pca", trajectory=path)
    assert result.directions == "pca" and result.normalization == "none" and result.loss.shape == (5, 5)
    assert result.trajectory_coordinates.shape == (len(path), 2)
    assert result.explained_variance_ratio[0] > 0.5
    assert abs(result.direction_cosine) < 1e-10


# --- errors ------------------------------------------------------------------------------------


def _errors(relu_mlp):
    model, batches = relu_mlp
    ev = Evaluator(model, F.cross_entropy, batches)
    space, theta = ev.space, ev.center()
    d1 = random_directions(space, theta, 1, seeded(0))
    d2 = random_directions(space, theta, 2, seeded(0))
    op = HessianOperator(model, F.cross_entropy, batches)
    small_op = HessianOperator(digits_mlp(hidden=2).to(torch.float64), F.cross_entropy, batches)
    return [
        (lambda: normalize(theta, theta, space, "unit"), r"mode must be one of .* got mode='unit'"),
        (lambda: normalize(theta[:-1], theta, space), r"direction must be a flat vector of shape \(dim=\d+,\)"),
        (lambda: normalize(theta, theta.float(), space), r"direction and center must share dtype"),
        (lambda: random_directions(space, theta, 0, seeded(0)), r"k must be at least 1, got k=0"),
        (lambda: random_directions(space, theta, 1, seeded(0), normalization="l2"), r"normalization must be one of"),
        (lambda: eigen_directions(op, 0, seeded(0)), r"k must be in \[1, dim=\d+\], got k=0"),
        (lambda: pca_directions([theta], theta, 1), r"at least 2 parameter vectors, got 1"),
        (lambda: pca_directions([theta, theta[:-1]], theta, 1), r"trajectory\[1\] must have shape"),
        (lambda: pca_directions([theta, theta + 1], theta, 2), r"k must be in \[1, n-1=1\]"),
        (lambda: pca_directions([theta, theta], theta, 1), r"no variance"),
        (lambda: surface(ev, theta, d2, [0.0]), r"betas is required with two directions"),
        (lambda: surface(ev, theta, d1, [0.0], [0.0]), r"betas was given with one direction"),
        (lambda: surface(ev, theta, theta[:5], [0.0]), r"directions must be 1 or 2 vectors of length dim="),
        (lambda: surface(ev, theta, torch.stack([theta] * 3), [0.0]), r"got shape \(3, \d+\)"),
        (lambda: surface(ev, theta[:5], d1, [0.0]), r"center must have shape \(dim=\d+,\), got \(5,\)"),
        (lambda: surface(ev, theta, d1, []), r"alphas must be a non-empty 1-D sequence"),
        (lambda: surface(ev, theta, d2, [0.0], [float("nan")]), r"betas must be finite"),
        (lambda: surface(ev, theta, d1, [0.0], points_per_call=0), r"points_per_call must be at least 1"),
        (lambda: loss_surface(ev, dims=3, generator=seeded(0)), r"dims must be 1 or 2, got dims=3"),
        (lambda: loss_surface(ev, resolution=1, generator=seeded(0)), r"resolution must be at least 2"),
        (lambda: loss_surface(ev, span=0.0, generator=seeded(0)), r"span must be a positive finite number"),
        (lambda: loss_surface(ev, directions="hessian", generator=seeded(0)), r"directions must be one of"),
        (lambda: loss_surface(ev, normalization="l2", generator=seeded(0)), r"normalization must be one of"),
        (
            lambda: loss_surface(ev, directions="eigen", normalization="filter", op=op, generator=seeded(0)),
            r"applies to random directions only",
        ),
        (lambda: loss_surface(ev), r"generator is required for directions='random'"),
        (lambda: loss_surface(ev, directions="eigen", generator=seeded(0)), r"op is required for directions='eigen'"),
        (
            lambda: loss_surface(ev, directions="eigen", op=small_op, generator=seeded(0)),
            r"op must act on the evaluator's parameter space",
        ),
        (lambda: loss_surface(ev, directions="pca"), r"trajectory is required for directions='pca'"),
    ]


def test_errors_name_the_argument_and_a_fix(relu_mlp):
    for call, pattern in _errors(relu_mlp):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_directions_record_reports_its_shape(relu_mlp):
    model, _ = relu_mlp
    space = ParameterSpace.of(model)
    d = Directions(
        vectors=torch.zeros(2, space.dim, dtype=torch.float64), kind="given", normalization="none", ignore_1d=False
    )
    assert (d.k, d.dim) == (2, space.dim)
