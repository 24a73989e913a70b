"""Small reference networks for the 8×8 digits data (64 inputs, 10 classes).

Pure torch factories used by the demo, the tests and the benchmarks. Each takes
keyword-only sizes so a spec can set them through ``model.kwargs``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["digits_mlp", "digits_cnn", "wide_mlp"]


def digits_mlp(*, hidden: int = 32, depth: int = 2, activation: str = "tanh", num_classes: int = 10) -> nn.Module:
    """An MLP on flattened 8×8 digits: ``depth`` hidden layers of ``hidden`` units.

    With the defaults it has 64·32+32 + 32·32+32 + 32·10+10 = 3,466 parameters.
    """
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got activation={activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), acts[activation]()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def digits_cnn(*, channels: int = 4, num_classes: int = 10) -> nn.Module:
    """A small CNN on 1×8×8 digits: conv3×3 → tanh → avgpool2 → conv3×3 → tanh → linear.

    With the defaults it has 4·9+4 + 4·4·9+4 + 4·16·10+10 = 838 parameters.
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(channels * 16, num_classes),
    )


def wide_mlp(*, hidden: int = 1024, depth: int = 2, num_classes: int = 10) -> nn.Module:
    """A wide digits MLP for benchmarks; ``hidden=1024, depth=2`` has 1,126,410 parameters."""
    return digits_mlp(hidden=hidden, depth=depth, activation="tanh", num_classes=num_classes)
