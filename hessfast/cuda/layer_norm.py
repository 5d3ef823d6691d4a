"""CUDA C++ implementations of the normalisation rules ``aten.layer_norm`` and ``aten.rms_norm``
(``csrc/layer_norm.cu``).

Same contract as :class:`hessfast.rules.layer_norm.LayerNorm` / ``RMSNorm``. The input is viewed as
rows ``[M, N]`` (``N`` = the product of ``normalized_shape``); ``x̂ = (x − mean) r`` (LayerNorm) or
``x r`` (RMSNorm) per row, ``y = γ x̂ + β``, K tangents on a leading axis. The math, with the index
conventions, is in ``csrc/layer_norm.cuh``:

- ``fwd_jvp``: ``torch.ops.hessfast.norm_fwd_jvp``, one block per row: the row statistics, their K
  tangents (``mean ẋ``, ``mean(x̂ ẋ)``) and ``y``, ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇`` from one read of each row;
- ``bwd_jvp``: ``torch.ops.hessfast.norm_bwd_jvp``: ``ḡ_x, ġ_x`` one block per row, and the column
  sums ``ḡ_γ, ġ_γ, ḡ_β, ġ_β``; second-order terms only when ``ḡ`` is present.

Residuals are ``x``, ``γ``, ``ẋ``, ``γ̇`` (tensors the engine already holds) and the float32 row
statistics ``[M, 2]`` and ``[K, M, 2]`` — not ``x̂`` and ``ẋ̂``, which the backward recomputes.
``None``-ness and output dtypes are the torch rule's (cotangents in the dtypes of ``x``, ``γ``, ``β``;
cotangents arriving in a wider dtype than ``x`` are taken in that dtype). Accumulation is in float32.
Declined: ``γ``/``β``/tangents in another dtype than ``x``, and rows longer than the GPU's
shared-memory row cache (16 bytes per column in the backward: N ≈ 14,000 on an H100).
"""

from __future__ import annotations

import math

import torch

from ..rules.base import TORCH_TOLERANCES, Call
from ..rules.layer_norm import LayerNormSchema, RMSNormSchema, compute_dtype
from . import CudaRule, ops

Tensor = torch.Tensor
aten = torch.ops.aten

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCES = dict(TORCH_TOLERANCES)
#: shared memory the backward kernel caches per column (four float32 rows) and keeps in reserve
_BYTES_PER_COLUMN, _RESERVED_BYTES = 16, 1024


def _rows(t: Tensor | None, *shape: int) -> Tensor | None:
    return None if t is None else t.reshape(shape).contiguous()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' statistics dtype: float64 for float64 rows (CPU only), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_columns(device: torch.device, dtype: torch.dtype) -> int:
    """The longest row (N) the backward kernel's shared-memory row cache holds on ``device``."""
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    pack = 16 // torch.empty((), dtype=dtype).element_size()
    return (optin - _RESERVED_BYTES) // _BYTES_PER_COLUMN // pack * pack


class _CudaNorm(CudaRule):
    """Shared body of the layer/RMS norm implementations (``slots``: positions of x, γ, β)."""

    dtypes = DTYPES
    tolerances = TOLERANCES

    def not_supported_reasons(self, call: Call) -> list[str]:
        x, ns, w, b, _ = self._unpack(call)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return [f"{self.name}: the CUDA kernel takes a floating-point input"]
        ns = tuple(int(s) for s in ns)
        if len(ns) == 0 or x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns) :]) != ns:
            return [
                f"{self.name}: normalized_shape {list(ns)} does not match the input's trailing dims"
            ]
        if math.prod(ns) == 0:
            return [f"{self.name}: normalized_shape {list(ns)} is empty"]
        why = []
        ix, iw, ib = self.slots
        named = [("weight", w, ns), ("bias", b, ns)]
        k = call.k
        named += [
            (f"tangent of {what}", call.tangents[i], (k, *shape))
            for what, i, shape in (("input", ix, x.shape), ("weight", iw, ns), ("bias", ib, ns))
            if i is not None
        ]
        for what, t, shape in named:
            if t is None:
                continue
            if tuple(t.shape) != tuple(shape):
                why.append(f"{self.name}: {what} has shape {list(t.shape)}, want {list(shape)}")
            elif t.dtype != x.dtype or t.device != x.device:
                why.append(
                    f"{self.name}: {what} is {t.dtype} on {t.device}, the input {x.dtype} on "
                    f"{x.device} (the CUDA kernel takes one dtype)"
                )
        if x.is_cuda and not why:
            limit = max_columns(x.device, x.dtype)
            if math.prod(ns) > limit:
                why.append(
                    f"{self.name}: rows of {math.prod(ns)} elements exceed the kernel's "
                    f"shared-memory row cache ({limit} on this GPU)"
                )
        return why

    def fwd_jvp(self, call: Call):
        x, ns, w, b, eps = self._unpack(call)
        ix, iw, ib = self.slots
        tx, tw = call.tangents[ix], call.tangents[iw]
        tb = call.tangents[ib] if ib is not None else None
        n = math.prod(int(s) for s in ns)
        m = x.numel() // n
        k = call.k
        if eps is None:
            eps = torch.finfo(compute_dtype(x.dtype)).eps
        x2, w1, b1 = _rows(x, m, n), _rows(w, n), _rows(b, n)
        tx2, tw2, tb2 = _rows(tx, k, m, n), _rows(tw, k, n), _rows(tb, k, n)
        y, ydot, stats, tstats = ops().norm_fwd_jvp(
            x2, w1, b1, tx2, tw2, tb2, float(eps), self.center
        )
        has_tangent = tx is not None or tw is not None or tb is not None
        ydot = ydot.reshape(k, *x.shape) if has_tangent else None
        need = (
            call.is_active(ix),
            w is not None and call.is_active(iw),
            ib is not None and b is not None and call.is_active(ib),
        )
        shapes = (x.shape, None if w is None else w.shape, None if b is None else b.shape)
        res = (x2, w1, tx2, tw2, stats, tstats, need, shapes)
        return y.reshape(x.shape), ydot, res

    def _bwd(self, res, g, gdot):
        """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` with the torch rule's ``None``-ness."""
        x2, w1, tx2, tw2, stats, tstats, need, shapes = res
        need_x, need_w, need_b = need
        if g is None and gdot is None:
            return (None, None, None), (None, None, None)
        m, n = x2.shape
        kd = x2.dtype
        for t in (g, gdot):
            if t is not None:
                kd = torch.promote_types(kd, t.dtype)

        def cast(t, *shape):
            return None if t is None else t.reshape(shape).to(kd).contiguous()

        gx, gdx, gw, gdw, gb, gdb = ops().norm_bwd_jvp(
            cast(x2, m, n),
            cast(w1, n),
            cast(tx2, -1, m, n),
            cast(tw2, -1, n),
            stats.to(_stats_dtype(kd)),
            tstats.to(_stats_dtype(kd)),
            cast(g, m, n),
            cast(gdot, -1, m, n),
            self.center,
            need_x,
            need_w,
            need_b,
        )
        second = g is not None and tx2 is not None
        present = (
            need_x and g is not None,
            need_x and (gdot is not None or second or (g is not None and tw2 is not None)),
            need_w and g is not None,
            need_w and (gdot is not None or second),
            need_b and g is not None,
            need_b and gdot is not None,
        )
        xs, ws, bs = shapes
        out = []
        for i, (t, on) in enumerate(zip((gx, gdx, gw, gdw, gb, gdb), present)):
            shape = (xs, ws, bs)[i // 2]
            if not on:
                out.append(None)
            elif i % 2:
                out.append(t.reshape(t.shape[0], *shape).to(x2.dtype))
            else:
                out.append(t.reshape(shape).to(x2.dtype))
        return (out[0], out[2], out[4]), (out[1], out[3], out[5])


class CudaLayerNorm(LayerNormSchema, _CudaNorm):
    """``layer_norm`` on the CUDA kernels."""


class CudaRMSNorm(RMSNormSchema, _CudaNorm):
    """``rms_norm`` on the CUDA kernels."""


IMPLEMENTATIONS = [CudaLayerNorm(), CudaRMSNorm()]
