"""The progress hook of probe/progress.py: what operators and Lanczos tell a listener."""

from __future__ import annotations

import torch

from probe.eigen import eigenvalues
from probe.lanczos import lanczos
from probe.operators import DenseOperator
from probe.preconditioned import PreconditionedOperator
from probe.progress import hook_of
from probe.slq import spectral_density


class Hook:
    """Records every call the estimators make."""

    def __init__(self) -> None:
        self.num_products, self.calls = 0, []

    def products(self, n: int) -> None:
        self.num_products += n

    def steps(self, done: int, total: int | None) -> None:
        self.calls.append((done, total))


def dense(dim: int = 30, seed: int = 0) -> DenseOperator:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return DenseOperator(a + a.T)


def test_every_product_and_lanczos_step_reaches_the_hook_and_counts_match_the_result():
    op, hook = dense(), Hook()
    op.progress = hook
    start = op.random_vectors(3, generator=torch.Generator().manual_seed(1))
    result = lanczos(op, start, 8)
    assert hook.num_products == result.num_matvecs == 24
    assert hook.calls == [(i, 8) for i in range(1, 9)]
    op.matvec(torch.ones(30, dtype=torch.float64))
    assert hook.num_products == 25


def test_slq_and_eigenvalues_report_through_the_same_hook():
    op, hook = dense(), Hook()
    op.progress = hook
    r = spectral_density(op, runs=2, steps=10, generator=torch.Generator().manual_seed(0))
    assert hook.num_products == r.num_matvecs and hook.calls[-1] == (10, 10)
    hook2 = Hook()
    op.progress = hook2
    e = eigenvalues(op, k=2, generator=torch.Generator().manual_seed(0))
    assert hook2.num_products == e.num_matvecs and hook2.calls and hook2.calls[-1][0] == len(hook2.calls)


def test_a_wrapping_operator_reports_its_steps_to_the_inner_hook_and_products_once():
    inner, hook = dense(), Hook()
    inner.progress = hook
    wrapped = PreconditionedOperator(inner, torch.ones(30, dtype=torch.float64) * 2)
    assert hook_of(wrapped) is hook and hook_of(dense()) is None
    start = wrapped.random_vectors(1, generator=torch.Generator().manual_seed(2))
    result = lanczos(wrapped, start, 5)
    assert hook.num_products == result.num_matvecs == 5  # the inner products, not the wrapper's as well
    assert [d for d, _ in hook.calls] == [1, 2, 3, 4, 5]


def test_without_a_hook_nothing_is_called():
    op = dense()
    assert op.progress is None and hook_of(op) is None
    lanczos(op, op.random_vectors(1, generator=torch.Generator().manual_seed(3)), 4)
