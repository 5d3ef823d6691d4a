"""Algorithms on curvature operators: they see an operator only through ``matmat(V) -> H @ V``.

>>> import torch, hessfast
>>> from hessfast.algorithms import eigsh
>>> H = hessfast.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
>>> round(float(eigsh(H, k=1)[0][0]), 6)
10.0
"""

from .diagonal import DiagonalEstimate, FrobeniusEstimate, diagonal, frobenius_norm
from .lanczos import ConditionNumber, EigshInfo, condition_number, eigenvalue_bounds, eigsh
from .layerwise import BlockSpectrum, layerwise, layerwise_diagonal
from .newton import NewtonStep, newton_step
from .slq import SpectralDensity, spectral_density
from .trace import TraceEstimate
from .trace import trace as trace

__all__ = [
    "eigsh",
    "EigshInfo",
    "eigenvalue_bounds",
    "condition_number",
    "ConditionNumber",
    "newton_step",
    "NewtonStep",
    "spectral_density",
    "SpectralDensity",
    "trace",
    "TraceEstimate",
    "layerwise",
    "layerwise_diagonal",
    "BlockSpectrum",
    "diagonal",
    "DiagonalEstimate",
    "frobenius_norm",
    "FrobeniusEstimate",
]
