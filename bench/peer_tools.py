"""The four tools of the peer benchmark behind one interface (``top_eig``, ``hutchinson``,
``hutchpp``, ``slq``): this project, PyHessian, curvlinops and hessian-eigenthings.

Each adapter builds its tool's own operator for every timed run and counts the
products it spends without changing the computation. The peers are imported only
when their adapter is created (they live in ``.venv-bench``).
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from peer_common import SEED, generator
from torch import nn

from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.slq import spectral_density
from probe.slq_deflated import deflated_spectral_density
from probe.trace import trace


class Counter:
    def __init__(self) -> None:
        self.n = 0


class Ours:
    name = "ours"

    def __init__(self, batched: bool | None = None) -> None:
        # None: the library's default (one backward per column on the CPU, batched on CUDA).
        self.batched = batched
        if batched is not None:
            self.name = f"ours[batched={batched}]"

    def op(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> HessianOperator:
        return HessianOperator(model, F.cross_entropy, [(x, y)], batched=self.batched)

    def top_eig(self, model, x, y, tol, seed=SEED):
        r = eigenvalues(self.op(model, x, y), k=1, tol=tol, generator=generator(seed))
        return float(r.eigenvalues[0]), r.num_matvecs

    def trace(self, model, x, y, method, budget, seed=SEED):
        """``method``: one of probe.trace.METHODS (hutchinson, hutch++, xtrace, krylov-hutch++)."""
        r = trace(self.op(model, x, y), method=method, num_matvecs=budget, generator=generator(seed))
        return r.trace, r.trace_stderr, r.num_matvecs

    def hutchinson(self, model, x, y, m, seed=SEED):
        return self.trace(model, x, y, "hutchinson", m, seed)

    def hutchpp(self, model, x, y, budget, seed=SEED):
        return self.trace(model, x, y, "hutch++", budget, seed)

    def slq(self, model, x, y, runs, steps, seed=SEED):
        r = spectral_density(self.op(model, x, y), runs=runs, steps=steps, generator=generator(seed))
        return r.ritz_values, r.ritz_weights, r.num_matvecs

    def deflated_slq(self, model, x, y, runs, steps, seed=SEED):
        """Deflated SLQ (``k="auto"``): converged top Ritz pairs as exact point masses, SLQ on the rest."""
        r = deflated_spectral_density(self.op(model, x, y), runs=runs, steps=steps, generator=generator(seed))
        return r.ritz_values, r.ritz_weights, r.num_matvecs


def _eig_shim(input: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.eig`` (removed in PyTorch 2.0) for the symmetric tridiagonal PyHessian passes.

    Returns the old format: eigenvalues as an ``(n, 2)`` (real, imaginary) tensor and
    the eigenvectors as columns (an empty tensor unless ``eigenvectors``).
    """
    w, v = torch.linalg.eigh(input)
    e = torch.stack([w, torch.zeros_like(w)], dim=1)
    return e, (v if eigenvectors else input.new_empty(0))


def _eig_removed() -> bool:
    """Whether ``torch.eig`` is gone (PyTorch >= 2.0 keeps a stub that raises)."""
    try:
        torch.eig(torch.ones(1, 1))  # type: ignore[attr-defined]
        return False
    except (AttributeError, RuntimeError):
        return True


class PyHessian:
    name = "pyhessian"

    def __init__(self) -> None:
        import pyhessian.hessian  # noqa: F401  (the package re-exports the class under the module's name)

        ph = sys.modules["pyhessian.hessian"]
        self.ph = ph
        self.counter = Counter()
        original = ph.hessian_vector_product

        def counted(gradsH, params, v):
            self.counter.n += 1
            return original(gradsH, params, v)

        ph.hessian_vector_product = counted  # count products; the computation is unchanged
        self.shim = _eig_removed()
        if self.shim:
            torch.eig = _eig_shim  # type: ignore[attr-defined]

    def _run(self, model, x, y, fn, seed=SEED):
        self.counter.n = 0
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = self.ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            try:
                return fn(h), self.counter.n
            finally:
                del h
                model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad behind

    def top_eig(self, model, x, y, tol, max_iter, seed=SEED):
        (vals, _), n = self._run(model, x, y, lambda h: h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1), seed)
        return float(vals[0]), n

    def hutchinson(self, model, x, y, m, seed=SEED):
        samples, n = self._run(model, x, y, lambda h: h.trace(maxIter=m, tol=0.0), seed)
        s = np.asarray(samples, dtype=np.float64)
        return float(s.mean()), float(s.std(ddof=1) / math.sqrt(len(s))), n

    def slq(self, model, x, y, runs, steps, seed=SEED):
        (nodes, weights), n = self._run(model, x, y, lambda h: h.density(iter=steps, n_v=runs), seed)
        return (
            [torch.tensor(np.asarray(v, dtype=np.float64)) for v in nodes],
            [torch.tensor(np.asarray(w, dtype=np.float64)) for w in weights],
            n,
        )


class Curvlinops:
    name = "curvlinops"

    def __init__(self) -> None:
        import curvlinops
        from curvlinops.papyan2020traces import spectrum

        self.cl = curvlinops
        self.spectrum = spectrum

    def op(self, model, x, y):
        params = [p for p in model.parameters() if p.requires_grad]
        return self.cl.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)

    def top_eig(self, model, x, y, tol, seed=SEED):
        from scipy.sparse.linalg import LinearOperator, eigsh

        A = self.op(model, x, y).to_scipy()
        counter = Counter()

        def mv(v):
            counter.n += 1 if v.ndim == 1 else v.shape[1]
            return A.matvec(v) if v.ndim == 1 else A.matmat(v)

        counted = LinearOperator(A.shape, matvec=mv, matmat=mv, dtype=A.dtype)
        v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
        val = eigsh(counted, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        return float(val[0]), counter.n

    def hutchinson(self, model, x, y, m, seed=SEED):
        torch.manual_seed(seed)
        return float(self.cl.hutchinson_trace(self.op(model, x, y), m)), None, m

    def hutchpp(self, model, x, y, budget, seed=SEED):
        """curvlinops' Hutch++; its budget must be a multiple of 3 (rounded down)."""
        torch.manual_seed(seed)
        budget -= budget % 3
        return float(self.cl.hutchpp_trace(self.op(model, x, y), budget)), None, budget

    def xtrace(self, model, x, y, budget, seed=SEED):
        """curvlinops' XTrace (Epperly, Tropp & Webber 2024); its budget must be even."""
        torch.manual_seed(seed)
        budget -= budget % 2
        return float(self.cl.xtrace(self.op(model, x, y), budget)), None, budget

    def slq(self, model, x, y, runs, steps, seed=SEED):
        # lanczos_approximate_spectrum(A, ncv=steps, num_repeats=runs, boundaries=...)
        # is this loop plus the smoothing; the loop is inlined to keep the nodes and
        # weights for the accuracy check. Boundaries are given, so no eigsh is spent.
        torch.manual_seed(seed)
        A = self.op(model, x, y)
        nodes, weights, densities = [], [], []
        for _ in range(runs):
            evals, evecs = self.spectrum.fast_lanczos(A, steps)
            nodes.append(evals.double())
            weights.append(evecs[0].double() ** 2)
            lo, hi = float(evals.min()), float(evals.max())
            densities.append(
                self.spectrum.lanczos_approximate_spectrum_from_iter((evals, evecs), (lo, hi), 1000, 3.0, 0.05)
            )
        return nodes, weights, runs * steps


class Eigenthings:
    name = "eigenthings"

    def __init__(self) -> None:
        import hessian_eigenthings as he

        self.he = he

    def op(self, model, x, y):
        op = self.he.HessianOperator(model, [(x, y)], self.he.supervised_loss(F.cross_entropy))
        counter = Counter()
        inner = op.matvec

        def matvec(v):
            counter.n += 1
            return inner(v)

        op.matvec = matvec  # count products; the computation is unchanged
        op.counter = counter
        return op

    def top_eig(self, model, x, y, max_iter, seed=SEED):
        op = self.op(model, x, y)
        r = self.he.lanczos(op, k=1, max_iter=max_iter, which="LA", seed=seed)
        return float(r.eigenvalues[0]), op.counter.n

    def hutchinson(self, model, x, y, m, seed=SEED):
        op = self.op(model, x, y)
        r = self.he.hutchinson(op, num_samples=m, seed=seed)
        return r.estimate, r.stderr, op.counter.n

    def hutchpp(self, model, x, y, budget, seed=SEED):
        op = self.op(model, x, y)
        r = self.he.hutch_plus_plus(op, num_matvecs=budget, seed=seed)
        return r.estimate, r.stderr, op.counter.n

    def slq(self, model, x, y, runs, steps, seed=SEED):
        op = self.op(model, x, y)
        r = self.he.spectral_density(op, num_runs=runs, lanczos_steps=steps, num_grid_points=1000, seed=seed)
        nodes = [row[~torch.isnan(row)].double() for row in r.raw_eigenvalues]
        weights = [w[: len(v)].double() for w, v in zip(r.raw_weights, nodes, strict=True)]
        return nodes, weights, op.counter.n
