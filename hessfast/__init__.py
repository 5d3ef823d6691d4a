"""hessfast: exact Hessian-vector and Gauss-Newton-vector products of PyTorch models.

>>> import torch, torch.nn.functional as F, hessfast
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> v = torch.randn(sum(p.numel() for p in model.parameters()))
>>> hessfast.hvp(model, F.cross_entropy, x, y, v).shape
torch.Size([67])
"""

from . import (
    decompose,  # a callable module: hessfast.decompose() runs decompose.decompose()
    landscape,  # a callable module: hessfast.landscape() runs landscape.landscape()
    penalties,
    selftest,  # a callable module: hessfast.selftest() runs selftest.selftest()
    sharpness,  # a callable module: hessfast.sharpness() runs sharpness.sharpness()
)
from .algorithms import (
    condition_number,
    diagonal,
    eigsh,
    frobenius_norm,
    layerwise,
    layerwise_diagonal,
    newton_step,
    spectral_density,
    trace,
)
from .api import ggn_vp, grad, hvp, residual_vp
from .capture import clear_cache
from .decompose import Decomposition
from .dispatch import BackendError, backends, use_backend
from .distributed import DistributedError
from .errors import (
    CaptureError,
    DropoutError,
    HessfastError,
    NonFiniteError,
    UnsupportedOpError,
)
from .fisher import EmpiricalFisherOperator, MCFisherOperator
from .landscape import Landscape
from .monitor import HessianMonitor
from .operator_algebra import IdentityOperator
from .operators import (
    CurvatureOperator,
    DenseOperator,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
)
from .sharpness import Sharpness

__version__ = "0.1.0"

__all__ = [
    "hvp",
    "ggn_vp",
    "residual_vp",
    "grad",
    "clear_cache",
    "backends",
    "use_backend",
    "BackendError",
    "selftest",
    "CurvatureOperator",
    "DenseOperator",
    "HessianOperator",
    "GGNOperator",
    "ResidualOperator",
    "EmpiricalFisherOperator",
    "MCFisherOperator",
    "IdentityOperator",
    "eigsh",
    "condition_number",
    "spectral_density",
    "trace",
    "layerwise",
    "layerwise_diagonal",
    "diagonal",
    "frobenius_norm",
    "newton_step",
    "decompose",
    "Decomposition",
    "HessianMonitor",
    "landscape",
    "Landscape",
    "penalties",
    "sharpness",
    "Sharpness",
    "HessfastError",
    "CaptureError",
    "DropoutError",
    "NonFiniteError",
    "UnsupportedOpError",
    "DistributedError",
    "__version__",
]
