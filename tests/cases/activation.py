"""The activation family's cases, written once as data and run by every backend that implements
the op: the torch rules (``tests/rules/test_activation.py``), the Triton kernels
(``tests/triton/test_activation.py``) and the CUDA kernels (``tests/cuda/test_activation.py``).

- :data:`CASES`: one :class:`Case` per activation call (op, the arguments after ``x``, the input
  regime). The torch rules run every case; a kernel backend runs every case whose op it
  implements, and its tests check that each of its implementations has a case here.
- :data:`KERNEL_SHAPES`: the shapes and K the kernels run, each for an edge of the kernels'
  blocking.
- :data:`DECLINED`: calls an implementation refuses, with the reason each backend must give.

Inputs are float64 on the CPU; the kernel tests cast them to the dtype under test. Values stay
``gap`` away from every kink (relu's 0, hardswish's ±3, ...) by more than a bfloat16 rounding, so
that every dtype sees the same side of it, and on the positive axis for log, sqrt, rsqrt and
fractional powers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .declined import Declined, refused_by

aten = torch.ops.aten
D = torch.float64


def spread(*shape, seed=0, scale=2.0, kinks=(0.0,), gap=0.05):
    """Normal values of standard deviation ``scale``, moved at least ``gap`` away from each kink."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, dtype=D, generator=gen)
    for c in kinks:
        near = (x - c).abs() < gap
        x = torch.where(near, x + 2 * gap * torch.sign(x - c + 1e-12), x)
    return x


def positive(*shape, seed=0):
    """Uniform values in ``[0.5, 1.5)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, dtype=D, generator=gen) + 0.5


@dataclass(frozen=True)
class Case:
    """``op(x, *extra)`` with ``x = values(*shape, seed=seed, **regime)``.

    ``flat``: ``f″ ≡ 0`` (autograd's double backward returns explicit zeros where the rule returns
    ``None``). ``shape`` is the shape of the rule test (the kernels run :data:`KERNEL_SHAPES`).
    """

    op: object
    extra: tuple = ()
    regime: dict = field(default_factory=dict)
    flat: bool = False
    positive: bool = False
    shape: tuple = (3, 4)

    def x(self, *shape, seed=0):
        """float64 inputs of ``shape`` (default: the rule test's) in this case's regime."""
        shape = shape or self.shape
        if self.positive:
            return positive(*shape, seed=seed)
        return spread(*shape, seed=seed, **self.regime)

    def args(self, x):
        return (x, *self.extra)

    def active(self):
        return (True,) + (False,) * len(self.extra)


CASES = {
    "relu": Case(aten.relu.default, flat=True),
    "gelu-erf": Case(aten.gelu.default, ("none",)),
    "gelu-tanh": Case(aten.gelu.default, ("tanh",)),
    "silu": Case(aten.silu.default, shape=(2, 3, 4)),
    "tanh": Case(aten.tanh.default),
    "sigmoid": Case(aten.sigmoid.default),
    # all three pieces: x ≤ −3 (0), the parabola (f″ = 1/3) and x ≥ 3 (x)
    "hardswish": Case(aten.hardswish.default, regime={"scale": 3.0, "kinks": (-3.0, 3.0)}),
    "exp": Case(aten.exp.default, regime={"scale": 1.0}),
    "log": Case(aten.log.default, positive=True),
    "sqrt": Case(aten.sqrt.default, positive=True),
    "rsqrt": Case(aten.rsqrt.default, positive=True),
    "pow-2": Case(aten.pow.Tensor_Scalar, (2,), regime={"scale": 1.0}),
    "pow-3": Case(aten.pow.Tensor_Scalar, (3,), regime={"scale": 1.0}),
    "pow-half": Case(aten.pow.Tensor_Scalar, (0.5,), positive=True),
    "pow-neg-frac": Case(aten.pow.Tensor_Scalar, (-1.5,), positive=True),
    "pow-neg-int": Case(aten.pow.Tensor_Scalar, (-2,), regime={"scale": 1.5, "gap": 0.3}),
    "pow-1": Case(aten.pow.Tensor_Scalar, (1,), regime={"scale": 1.0}, flat=True),
    "pow-0": Case(aten.pow.Tensor_Scalar, (0,), regime={"scale": 1.0}, flat=True),
    "sin": Case(aten.sin.default),
    "cos": Case(aten.cos.default),
    "reciprocal": Case(aten.reciprocal.default, regime={"scale": 1.5, "gap": 0.3}),
    "abs": Case(aten.abs.default, regime={"scale": 1.5}, flat=True),
    "square": Case(aten.square.default, regime={"scale": 1.0}),
    "softplus": Case(aten.softplus.default, (1.0, 20.0)),
    # beta·x on both sides of the threshold: the linear region is exercised too
    "softplus-threshold": Case(
        aten.softplus.default, (2.0, 1.0), regime={"scale": 1.5, "kinks": (0.5,)}, shape=(4, 5)
    ),
    "leaky_relu": Case(aten.leaky_relu.default, (0.1,), regime={"scale": 1.5}, flat=True),
    "elu": Case(aten.elu.default, (1.0, 1, 1), regime={"scale": 1.5}),
    "elu-scaled": Case(aten.elu.default, (0.7, 1.3, 0.8), regime={"scale": 1.5}),
    "hardtanh": Case(
        aten.hardtanh.default, (-1.0, 1.0), regime={"scale": 1.5, "kinks": (-1.0, 1.0)}, flat=True
    ),
    "hardtanh-relu6": Case(
        aten.hardtanh.default, (0.0, 6.0), regime={"scale": 6.0, "kinks": (0.0, 6.0)}, flat=True
    ),
}

#: ``(shape, K)`` of the kernel tests, and the edge each one covers: odd sizes with K > 1, a
#: single element, several Triton programs (``BLOCK`` = 1024) ending in a masked tail that is also
#: not a whole 16-byte CUDA pack, and a size of whole packs (the CUDA kernels' vectorised path).
KERNEL_SHAPES = [((5, 7), 7), ((1,), 1), ((3, 515), 2), ((2, 8, 16), 1)]


DECLINED = {
    "integer": Declined(
        aten.relu.default,
        (torch.arange(3),),
        {
            "torch": "only real floating-point inputs",
            "triton": "only real floating-point inputs",
            "cuda": "takes a floating-point tensor input",
        },
    ),
    "complex": Declined(
        aten.tanh.default,
        (torch.ones(3, dtype=torch.complex64),),
        {
            "torch": "only real floating-point inputs",
            "triton": "only real floating-point inputs",
            "cuda": "takes a floating-point tensor input",
        },
    ),
    "gelu-unknown-approximate": Declined(
        aten.gelu.default,
        (torch.ones(3), "erf"),
        {backend: "unknown approximate='erf'" for backend in ("torch", "triton", "cuda")},
    ),
    "pow-complex-exponent": Declined(
        aten.pow.Tensor_Scalar, (torch.ones(3, dtype=D), 2j), {"torch": "not a real python number"}
    ),
    "tangent-dtype": Declined(
        aten.silu.default,
        (torch.ones(3),),
        {"cuda": "tangent dtype/device torch.float64/cpu differs"},
        tangents=(torch.ones(2, 3, dtype=D),),
    ),
    "tangent-shape": Declined(
        aten.hardswish.default,
        (torch.ones(3),),
        {"cuda": "tangent shape [2, 4] is not [K, *x.shape]"},
        tangents=(torch.ones(2, 4),),
    ),
}


def declined(backend):
    """The :data:`DECLINED` ids that ``backend`` refuses."""
    return refused_by(DECLINED, backend)


def declined_call(name):
    """``(op, Call, reason)`` of a :data:`DECLINED` entry (reasons by backend)."""
    d = DECLINED[name]
    return d.op, d.call(), d.reasons
