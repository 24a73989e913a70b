"""landscape-probe's math: curvature operators on flat parameter vectors and the estimators that consume them.

Pure torch: no Ray, Arrow, Prometheus, file I/O, logging or clocks (those live in ``cluster/``).
"""

from probe.barrier import BarrierResult, barrier
from probe.basis import BasisStore, DeviceBasis, HostBasis
from probe.critical import CriticalPointResult, classify_critical_point
from probe.curves import BezierPath, LinearPath, PolychainPath, train_bend
from probe.directions import Directions, eigen_directions, pca_directions, random_directions
from probe.eigen import EigenResult, eigenvalues, power_iteration
from probe.eos import EosPoint, PreconditionedOperator, eos_point, eos_series, lambda_max_warm, stability_threshold
from probe.evaluate import Evaluator
from probe.ggn import GGNOperator
from probe.hessian import HessianOperator
from probe.lanczos import LanczosResult, lanczos
from probe.noise import GradientMoments, NoiseResult, gradient_moments, noise_statistics
from probe.operators import CurvatureOperator, DenseOperator
from probe.pacbayes import PacBayesResult, pacbayes
from probe.params import ParameterSpace
from probe.sharpness import (
    SharpnessResult,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
    sam_sharpness,
)
from probe.slq import SpectrumResult, spectral_density
from probe.slq_deflated import DeflatedOperator, DeflatedSpectrumResult, deflated_spectral_density
from probe.surface import SurfaceResult, loss_surface, surface
from probe.trace import TraceResult, hutchinson, hutchpp, trace

__all__ = [
    "BarrierResult",
    "BasisStore",
    "DeviceBasis",
    "HostBasis",
    "CriticalPointResult",
    "GradientMoments",
    "NoiseResult",
    "PacBayesResult",
    "classify_critical_point",
    "gradient_moments",
    "noise_statistics",
    "pacbayes",
    "BezierPath",
    "Directions",
    "EosPoint",
    "Evaluator",
    "LinearPath",
    "PolychainPath",
    "PreconditionedOperator",
    "SharpnessResult",
    "SurfaceResult",
    "adaptive_sharpness",
    "average_sharpness",
    "barrier",
    "eigen_directions",
    "eos_point",
    "eos_series",
    "keskar_sharpness",
    "lambda_max_warm",
    "loss_surface",
    "pca_directions",
    "random_directions",
    "sam_sharpness",
    "stability_threshold",
    "surface",
    "train_bend",
    "CurvatureOperator",
    "DenseOperator",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "ParameterSpace",
    "DeflatedOperator",
    "DeflatedSpectrumResult",
    "SpectrumResult",
    "TraceResult",
    "eigenvalues",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "deflated_spectral_density",
    "trace",
]
