"""landscape-probe's math: curvature operators on flat parameter vectors and the estimators that consume them.

Pure torch: no Ray, Arrow, Prometheus, file I/O, logging or clocks (those live in ``cluster/``).
"""

from probe.eigen import EigenResult, eigenvalues, power_iteration
from probe.ggn import GGNOperator
from probe.hessian import HessianOperator
from probe.lanczos import LanczosResult, lanczos
from probe.operators import CurvatureOperator, DenseOperator
from probe.params import ParameterSpace
from probe.slq import SpectrumResult, spectral_density
from probe.trace import TraceResult, hutchinson, hutchpp, trace

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "ParameterSpace",
    "SpectrumResult",
    "TraceResult",
    "eigenvalues",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "trace",
]
