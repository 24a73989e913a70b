"""Flat parameter vectors: the coordinate system every operator and probe works in.

A :class:`ParameterSpace` fixes an ordered selection of a module's parameters
(all trainable ones, or a subset such as one layer) and maps between the list of
parameter tensors and one flat 1-D vector. Views are used wherever possible so
that splitting a vector costs no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParameterSpace"]


@dataclass(frozen=True)
class ParameterSpace:
    """An ordered selection of named parameters of one module.

    Attributes:
        names: parameter names in module order.
        shapes: their shapes.
        numels: their element counts; ``dim`` is their sum.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1)
        >>> space = ParameterSpace.of(layer)
        >>> space.names, space.numels, space.dim
        (('weight', 'bias'), (2, 1), 3)
        >>> space.set_flat(layer, torch.tensor([1.0, 2.0, 3.0]))
        >>> layer.weight, layer.bias
        (Parameter containing:
        tensor([[1., 2.]], requires_grad=True), Parameter containing:
        tensor([3.], requires_grad=True))
        >>> space.unflatten(space.get_flat(layer))
        [tensor([[1., 2.]]), tensor([3.])]
        >>> space.flatten([torch.zeros(1, 2), torch.ones(1)])
        tensor([0., 0., 1.])
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @property
    def dim(self) -> int:
        return sum(self.numels)

    @classmethod
    def of(cls, model: nn.Module, select: Sequence[str] | None = None) -> ParameterSpace:
        """Select parameters of ``model`` that require gradients.

        Args:
            model: the module.
            select: ``None`` for every trainable parameter, or names and name prefixes
                (``"fc1"`` selects ``fc1.weight`` and ``fc1.bias``).

        Raises:
            ValueError: if an entry of ``select`` matches no trainable parameter, or the
                selection is empty. The message lists the valid names.
        """
        # A tensor shared by several modules (tied embedding and head) is one parameter: it is
        # listed once, under its first name, as the optimizer sees it; its other names select it.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if select is None:
            chosen = named
        else:
            if isinstance(select, str):
                select = [select]
            if not select:
                raise ValueError(
                    "parameter selection is empty; pass None for all trainable parameters or at least one name"
                )
            canonical = {id(p): n for n, p in named}
            aliases = [
                (n, canonical[id(p)]) for n, p in model.named_parameters(remove_duplicate=False) if id(p) in canonical
            ]
            valid = [n for n, _ in aliases]
            picked: set[str] = set()
            for s in select:
                hits = {c for n, c in aliases if n == s or n.startswith(s + ".")}
                if not hits:
                    raise ValueError(
                        f"parameter selection {s!r} matches no trainable parameter; valid names: {', '.join(valid)}"
                    )
                picked |= hits
            chosen = [(n, p) for n, p in named if n in picked]
        if not chosen:
            raise ValueError("the model has no trainable parameters to probe (all have requires_grad=False)")
        return cls(
            names=tuple(n for n, _ in chosen),
            shapes=tuple(p.shape for _, p in chosen),
            numels=tuple(p.numel() for _, p in chosen),
        )

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The selected parameter tensors of ``model``, in this space's order."""
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (shapes as in this space) into one vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Split a flat vector (``(dim,)``) or a block of columns (``(dim, k)``) per parameter.

        A vector gives views of the parameters' shapes; a block ``(dim, k)`` gives
        tensors of shape ``(k, *shape)`` (the batched layout autograd expects).
        """
        if vec.shape[0] != self.dim:
            raise ValueError(f"expected a vector with leading dimension dim={self.dim}, got shape {tuple(vec.shape)}")
        chunks = torch.split(vec, list(self.numels), dim=0)
        if vec.ndim == 1:
            return [c.view(s) for c, s in zip(chunks, self.shapes, strict=True)]
        k = vec.shape[1]
        return [c.T.reshape(k, *s) for c, s in zip(chunks, self.shapes, strict=True)]

    def get_flat(self, model: nn.Module) -> Tensor:
        """A detached flat copy of the selected parameters."""
        return self.flatten([p.detach() for p in self.parameters(model)])

    @torch.no_grad()
    def set_flat(self, model: nn.Module, vec: Tensor) -> None:
        """Write a flat vector into the selected parameters in place."""
        for p, v in zip(self.parameters(model), self.unflatten(vec), strict=True):
            p.copy_(v)
