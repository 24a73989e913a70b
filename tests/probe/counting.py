"""Test helpers shared by the estimator tests: a dense operator that counts its products, seeded generators."""

from __future__ import annotations

import torch

from probe.operators import DenseOperator


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingOperator(DenseOperator):
    """A dense operator that counts the columns it is applied to."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.columns = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.columns += V.shape[1]
        return super()._matmat(V)
