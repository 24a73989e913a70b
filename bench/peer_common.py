"""Shared settings and records of the peer benchmark (``bench_peers.py``).

Accuracy targets, each tool's ladder of settings, the model specs, the record of
one timed run and small helpers. No peer library is imported here.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from probe.models import digits_cnn, digits_mlp, wide_mlp

SEED = 0
EIG_TARGET = 1e-3  # relative error of lambda_max
EIG_SEEDS = (0, 1, 2)  # start-vector seeds; an eig setting must reach EIG_TARGET from each
TRACE_TARGET = 0.01  # relative standard error of the trace
LONG_RUN_S = 10.0  # a timed run longer than this is not repeated

# Ladders, loose to tight. The first setting that reaches EIG_TARGET is timed.
# Steps of about 1.5-2× in each tool's own knob (every integer for the step counts).
OURS_TOLS = [1e-1, 5e-2, 3e-2, 2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6]
PYHESSIAN_TOLS = [1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 3e-5, 1e-5, 1e-6]
EIGSH_TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 0.0]
EIGENTHINGS_ITERS = [3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200]
HUTCHPP_BUDGETS = [30, 45, 60, 90, 120, 180, 240, 360, 480, 720, 960, 1440]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    train_steps: int
    lr: float
    slq_runs: int
    slq_steps: int
    hutchinson_cap: int  # probes actually run; beyond it the time is extrapolated linearly
    repeats: int  # timed repetitions of the chosen setting (minimum reported)
    power_max_iter: int


FULL_MODELS = [
    ModelSpec("digits_mlp", digits_mlp, 300, 1e-2, 10, 80, 4000, 3, 2000),
    ModelSpec("digits_cnn", digits_cnn, 300, 1e-2, 10, 80, 4000, 3, 2000),
    ModelSpec("wide_mlp", wide_mlp, 100, 1e-3, 4, 40, 100, 1, 500),
]
QUICK_MODELS = [
    ModelSpec("digits_mlp", digits_mlp, 300, 1e-2, 4, 30, 400, 1, 1000),
    ModelSpec("digits_cnn", digits_cnn, 300, 1e-2, 4, 30, 200, 1, 1000),
]


@dataclass
class Record:
    """One timed run of one tool on one task."""

    model: str
    task: str
    tool: str
    method: str
    setting: str = ""
    time_s: float = float("nan")
    num_matvecs: float | None = None  # mean over seeds for eig
    value: float | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    reached: bool | None = None  # accuracy target met (None: no target for this task)
    extrapolated: bool = False
    status: str = "ok"  # "ok" or "failed: reason"
    note: str = ""


def say(*args: Any) -> None:
    print(*args, flush=True)


def short_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:160]


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)
