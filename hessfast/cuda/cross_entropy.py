"""CUDA C++ implementation of the softmax cross-entropy rows (``csrc/cross_entropy.cu``).

The pseudo-op ``"hessfast::cross_entropy_rows"`` (shared with the Triton implementation and the
torch reference ``cross_entropy_rows_ref`` in ``hessfast/rules/cross_entropy.py``):
:meth:`CudaCrossEntropyRows.rows` ``(z, zdot, target, weight, ignore_index, label_smoothing, scale,
want_grad) -> (loss_rows, gz, gdz)`` for logits ``z [M, V]``, K tangents ``zdot [K, M, V]`` (or
``None``), targets ``[M]``, class weights ``[V]`` (or ``None``). With ``p = softmax(z_n)`` and the
coefficients ``a_{n,c} = (1−ε) w_{y_n} δ_{c,y_n} + (ε/V) w_c`` (zero on rows whose target is
``ignore_index``), ``A_n = Σ_c a_{n,c}``:

- ``loss_rows [M]`` float32: ``−scale Σ_c a_{n,c} log p_{n,c}``;
- ``gz [M, V]`` (z's dtype): ``scale (A_n p_n − a_n)``, ``None`` unless ``want_grad``;
- ``gdz [K, M, V]`` (z's dtype): ``scale A_n (p_n ⊙ u − p_n ⟨p_n, u⟩)``, ``u = zdot[k, n]``;
  ``None`` without ``zdot``.

One kernel (``torch.ops.hessfast.cross_entropy_rows``), one block per row: an online softmax over
one read of ``z`` and of every tangent row gives ``lse`` and every ``⟨p, u_k⟩``; a second sweep
writes ``gz`` and ``gdz`` (formulas in ``csrc/cross_entropy.cuh``). float32 accumulation. A target
outside ``[0, V)`` that is not ``ignore_index`` gives NaN rows (torch would raise).
"""

from __future__ import annotations

import torch

from ..rules.base import TORCH_TOLERANCES, Call
from ..rules.cross_entropy import rows_arg_reasons
from . import CudaRule, ops

Tensor = torch.Tensor

OP = "hessfast::cross_entropy_rows"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CudaCrossEntropyRows(CudaRule):
    """The cross-entropy rows on the CUDA kernel (see the module docstring)."""

    ops = (OP,)
    name = "cross_entropy_rows"
    dtypes = DTYPES
    tolerances = dict(TORCH_TOLERANCES)

    def not_supported_reasons(self, call: Call) -> list[str]:
        return rows_arg_reasons(call)

    def rows(
        self,
        z: Tensor,
        zdot: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        scale: float,
        want_grad: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(loss_rows, gz, gdz)`` for logits rows ``z [M, V]`` (see the module docstring)."""
        loss, gz, gdz = ops().cross_entropy_rows(
            z.contiguous(),
            None if zdot is None else zdot.contiguous(),
            target.to(torch.int64).contiguous(),
            None if weight is None else weight.to(_acc(z.dtype)).contiguous(),
            int(ignore_index),
            float(label_smoothing),
            float(scale),
            bool(want_grad),
        )
        return loss, (gz if want_grad else None), (gdz if zdot is not None else None)


IMPLEMENTATIONS = [CudaCrossEntropyRows()]
