"""CUDA C++ implementations of the elementwise activation rules (``csrc/activation.cu``).

Same contract as :class:`hessfast.rules.activation.ElementwiseUnary` for relu, gelu (erf and tanh),
silu, tanh, sigmoid and hardswish: for ``y = f(x)`` elementwise, with K tangents ``ẋ [K, *x.shape]``,

- ``fwd_jvp``: ``y`` and ``ẏ = f′(x) ẋ`` (``None`` without ``ẋ``), one kernel
  (``torch.ops.hessfast.act_fwd_jvp``) that reads ``x`` and each tangent row once;
- ``bwd_jvp``: ``ḡ_x = f′ ḡ`` and ``ġ_x = f′ ġ + f″ ẋ ḡ``, one kernel
  (``torch.ops.hessfast.act_bwd_jvp``); the second-order term only when ``ḡ`` and ``ẋ`` are
  present (not in GGN mode) and ``f″ ≢ 0``.

Residuals and ``None``-ness are the torch rule's: the backward keeps ``y`` (relu, tanh, sigmoid)
or ``x`` (gelu, silu, hardswish), and ``ẋ`` only where ``f″ ≢ 0``. ``f′`` and ``f″`` (table in
``csrc/activation.cuh``) are evaluated in float32 registers for every storage dtype. Cotangents in
another dtype than the residual are computed in the promoted dtype, which is the dtype the
results then have (torch's promotion, as in the torch rule). Non-contiguous inputs are made
contiguous first.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rules.base import TORCH_TOLERANCES, Call, nones
from . import CudaRule, ops

Tensor = torch.Tensor
aten = torch.ops.aten

#: dtypes the CUDA kernels take.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``(rtol, atol)`` against the float64 oracle (float32 math in registers; f″ of gelu-tanh cancels
#: near its zeros, so float32 promises what the torch rule does).
TOLERANCES = dict(TORCH_TOLERANCES)


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


class CudaActivation(CudaRule):
    """One activation on the CUDA kernels; ``kind`` is the kernel's name for it.

    ``from_result``: the backward's residual is ``y`` (else ``x``); ``curved``: ``f″ ≢ 0``.
    """

    dtypes = DTYPES
    tolerances = TOLERANCES

    def __init__(self, op: Any, name: str, *, from_result: bool, curved: bool):
        self.op = op
        self.ops = (op,)
        self.name = name
        self.from_result = from_result
        self.curved = curved

    def kind(self, args: tuple) -> str:
        """The kernel's activation name (``gelu`` with ``approximate="tanh"``: ``gelu_tanh``)."""
        if self.op == aten.gelu.default and args[1] == "tanh":
            return "gelu_tanh"
        return self.name

    def not_supported_reasons(self, call: Call) -> list[str]:
        x = call.args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return [f"{self.name}: the CUDA kernel takes a floating-point tensor input"]
        if self.op == aten.gelu.default and call.args[1] not in ("none", "tanh"):
            return [f"gelu: unknown approximate={call.args[1]!r}"]
        tx = call.tangents[0]
        if tx is not None:
            if tx.dtype != x.dtype or tx.device != x.device:
                return [
                    f"{self.name}: tangent dtype/device {tx.dtype}/{tx.device} differs from the "
                    f"input's {x.dtype}/{x.device}"
                ]
            if tuple(tx.shape[1:]) != tuple(x.shape):
                return [f"{self.name}: tangent shape {list(tx.shape)} is not [K, *x.shape]"]
        return []

    def fwd_jvp(self, call: Call):
        x = call.args[0].contiguous()
        # the tangent of an inactive input is ignored, as the torch rule does
        tx = _contig(call.tangents[0]) if call.is_active(0) else None
        kind = self.kind(call.args)
        y, ydot = ops().act_fwd_jvp(x, tx, kind)
        src = y if self.from_result else x
        keep_tx = tx if self.curved else None
        res = (src, keep_tx, kind, call.is_active(0), len(call.args))
        return y, (ydot if tx is not None else None), res

    def bwd_jvp(self, res, g, gdot):
        src, tx, kind, active, nargs = res
        if not active or (g is None and gdot is None):
            return nones(nargs), nones(nargs)
        dtype = src.dtype
        for t in (g, gdot):
            if t is not None:
                dtype = torch.promote_types(dtype, t.dtype)
        second = self.curved and g is not None and tx is not None

        def cast(t):
            return None if t is None else t.to(dtype).contiguous()

        gx, gdx = ops().act_bwd_jvp(
            cast(src), cast(g), cast(gdot), cast(tx) if second else None, kind
        )
        rest = nones(nargs - 1)
        gx = gx if g is not None else None
        gdx = gdx if (gdot is not None or second) else None
        return (gx, *rest), (gdx, *rest)


IMPLEMENTATIONS = [
    CudaActivation(aten.relu.default, "relu", from_result=True, curved=False),
    CudaActivation(aten.gelu.default, "gelu", from_result=False, curved=True),
    CudaActivation(aten.silu.default, "silu", from_result=False, curved=True),
    CudaActivation(aten.tanh.default, "tanh", from_result=True, curved=True),
    CudaActivation(aten.sigmoid.default, "sigmoid", from_result=True, curved=True),
    CudaActivation(aten.hardswish.default, "hardswish", from_result=False, curved=True),
]
