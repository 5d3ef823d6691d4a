"""The layer / RMS norm family's cases, written once as data and run by every backend: the torch
rules (``tests/rules/test_layer_norm.py``), the Triton kernels (``tests/triton/test_layer_norm.py``)
and the CUDA kernels (``tests/cuda/test_layer_norm.py``), each through its oracle harness in every
engine mode.

A :class:`NormCase` is ``layer_norm(x, normalized_shape, weight, bias, eps)`` (``bias`` set) or
``rms_norm(x, normalized_shape, weight, eps)``: the input's shape (rows of odd length, of one
element, longer than one pass of a CUDA block, several normalised dims, one row), which parameters
exist and which arguments are active, ``eps`` (``None`` for RMS norm's default), a transposed
(non-contiguous) input, and the K the kernels run (the torch rules run K = 1 and 3).

Inputs are float64 on the CPU: ``x = 2 r + 0.5`` (rows with a mean to remove; rows of one
element ``x = r``), ``γ = 1 + 0.3 r``, ``β = 0.3 r``, each from the case's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .declined import Declined, refused_by

aten = torch.ops.aten
D = torch.float64
LN = aten.layer_norm.default
RMS = aten.rms_norm.default


def _r(*shape, seed):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class NormCase:
    op: object
    shape: tuple
    ns: tuple
    weight: bool = True
    bias: bool | None = True  # None: RMS norm (no bias argument)
    eps: float | None = 1e-5
    active: tuple = (True, True, True)  # x, weight, bias (inactive where absent)
    transposed: bool = False  # x is the transpose of a contiguous tensor (its last two dims)
    ks: tuple = (2,)  # the K the kernel tests run (K = 1 and 7 on the basic shapes)
    seed: int = 0
    spread: float = 2.0  # x = spread · r + shift
    shift: float = 0.5

    def x(self):
        shape = self.shape
        if self.transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        x = self.spread * _r(*shape, seed=self.seed) + self.shift
        return x.transpose(-1, -2) if self.transposed else x

    def call(self):
        """``(op, args, active)`` with float64 CPU tensors, as the harnesses take them."""
        ns = list(self.ns)
        w = 1 + 0.3 * _r(*ns, seed=self.seed + 1) if self.weight else None
        ax, aw, ab = self.active
        if self.op is RMS:
            return RMS, (self.x(), ns, w, self.eps), (ax, False, aw and self.weight, False)
        b = 0.3 * _r(*ns, seed=self.seed + 2) if self.bias else None
        active = (ax, False, aw and self.weight, ab and bool(self.bias), False, False)
        return LN, (self.x(), ns, w, b, self.eps, True), active


def ln(shape, ns, **kw):
    return NormCase(LN, shape, ns, **kw)


def rms(shape, ns, *, eps=1e-6, **kw):
    return NormCase(RMS, shape, ns, bias=None, eps=eps, **kw)


X_ONLY = (True, False, False)

CASES = {
    "ln": ln((6, 10), (10,), ks=(1, 7)),
    "ln-3d": ln((2, 3, 5), (5,)),
    "ln-odd-row": ln((6, 37), (37,), ks=(1, 7)),
    "ln-two-dims": ln((2, 3, 4), (3, 4)),
    "ln-two-dims-4d": ln((2, 3, 4, 5), (4, 5)),
    "ln-all-dims": ln((3, 4), (3, 4), eps=1e-3),
    "ln-long-odd-row": ln((3, 1031), (1031,)),
    "ln-one-row": ln((1, 7), (7,)),
    # a row of one element normalises to ±1 (RMS) or β (layer): its derivatives are ε/(x² + ε)
    # times O(1), which float32 cancels, so x is kept of order one (absolute errors stay small)
    "ln-row-of-one": ln((5, 1), (1,), ks=(1, 7), spread=1.0, shift=0.0),
    "ln-transposed": ln((6, 37), (37,), transposed=True, ks=(1, 7)),
    "ln-no-affine": ln((4, 9), (9,), weight=False, bias=False),
    "ln-weight-no-bias": ln((4, 9), (9,), bias=False),
    # weight None with input and bias both active trips torch's own layer_norm double backward
    # ("Expected a proper Tensor but got None"), so the oracle cannot run; split the case instead
    "ln-bias-no-weight-input": ln((4, 6), (6,), weight=False, active=X_ONLY),
    "ln-bias-no-weight-bias": ln((4, 6), (6,), weight=False, active=(False, False, True)),
    "ln-input-only": ln((3, 5), (5,), active=X_ONLY),
    "ln-weight-only": ln((3, 5), (5,), active=(False, True, False)),
    "ln-params-only": ln((2, 3, 4), (3, 4), active=(False, True, True)),
    "rms": rms((6, 10), (10,), ks=(1, 7)),
    "rms-3d-odd-row": rms((2, 3, 37), (37,)),
    "rms-two-dims": rms((2, 3, 4), (3, 4)),
    "rms-long-odd-row": rms((2, 2053), (2053,)),
    "rms-row-of-one": rms((5, 1), (1,), ks=(1, 7), spread=1.0, shift=0.0),
    "rms-transposed": rms((2, 3, 37), (37,), transposed=True, ks=(1, 7)),
    "rms-no-weight": rms((2, 3, 4), (4,), weight=False),
    "rms-eps-none": rms((3, 5), (5,), eps=None),
    "rms-eps-none-no-weight": rms((6, 37), (37,), weight=False, eps=None),
    "rms-weight-only": rms((3, 8), (8,), active=(False, True, False)),
}

#: The cases run in bfloat16 and float16 too (within 2× plain torch's error).
LOW_PRECISION = [
    "ln",
    "ln-two-dims-4d",
    "ln-transposed",
    "rms-3d-odd-row",
    "rms-eps-none-no-weight",
]


def kernel_params():
    """``(case, K)`` pairs the kernel tests run."""
    return [(name, k) for name, c in CASES.items() for k in c.ks]


DECLINED = {
    "integer": Declined(
        LN,
        (torch.arange(6).view(2, 3), [3], None, None, 1e-5, True),
        {"triton": "needs a floating-point input", "cuda": "takes a floating-point input"},
    ),
    "shape-mismatch": Declined(
        LN,
        (torch.ones(2, 3), [4], None, None, 1e-5, True),
        {b: "normalized_shape [4] does not match the input's trailing dims" for b in ("triton", "cuda")},
    ),
    "weight-dtype": Declined(
        LN,
        (torch.ones(2, 3), [3], torch.ones(3, dtype=D), None, 1e-5, True),
        {"cuda": "weight is torch.float64 on cpu, the input torch.float32"},
    ),
    "weight-shape": Declined(
        RMS,
        (torch.ones(2, 3), [3], torch.ones(4), None),
        {"triton": "weight must be a floating-point tensor of shape [3]", "cuda": "weight has shape [4], want [3]"},
    ),
    "tangent-dtype": Declined(
        RMS,
        (torch.ones(2, 3), [3], None, None),
        {"cuda": "tangent of input is torch.float64 on cpu"},
        tangents=(torch.ones(2, 2, 3, dtype=D), None, None, None),
    ),
}  # fmt: skip


def declined(backend):
    """The :data:`DECLINED` ids that ``backend`` refuses."""
    return refused_by(DECLINED, backend)
