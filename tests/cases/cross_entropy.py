"""The cross-entropy row op's cases (``hessfast::cross_entropy_rows``), written once as data and
run by every backend that implements it: the Triton kernel (``tests/triton/test_cross_entropy.py``)
and the CUDA kernel (``tests/cuda/test_cross_entropy.py``), both against :func:`oracle`; the torch
reference ``cross_entropy_rows_ref`` is the low-precision baseline of both and is itself checked
against the same oracle in ``tests/rules/test_linear_cross_entropy.py``.

A :class:`RowsCase` holds the shapes (M rows, V classes, K tangents), the loss's options (class
weights, label smoothing, ``ignore_index`` and the ignored rows, the scale, ``want_grad``) and the
logits' regime: their spread, a ramp along every row (the online softmax's running max changes at
each step), classes masked with ``-inf`` (a whole first tile of a row included), rows offset by
a large constant (``exp`` would overflow without the max). ``tiles`` are block sizes for the
Triton kernel where a case needs several tiles of a row or several blocks of tangents (the CUDA
kernel has no such knob).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from hessfast.rules.base import Call
from hessfast.rules.cross_entropy import ROWS_OP

D = torch.float64


@dataclass(frozen=True)
class RowsCase:
    m: int
    v: int
    k: int
    weight: bool = False
    smoothing: float = 0.0
    ignore_index: int = -100
    ignored: tuple = ()
    scale: float | None = None  # None: the mean's 1 / (number of rows not ignored)
    want_grad: bool = True
    spread: float = 3.0
    ramp: float = 0.0
    masked: dict = field(default_factory=dict)  # row -> the columns set to -inf (a slice)
    offset: dict = field(default_factory=dict)  # row -> a constant added to its logits
    targets: dict = field(default_factory=dict)  # row -> its target (instead of a random one)
    tiles: dict = field(default_factory=dict)  # Triton block sizes: block_v, block_k

    def args(self, seed=0):
        """float64 ``(z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad)``
        on the CPU, the row op's argument order."""
        gen = torch.Generator().manual_seed(seed)
        m, v, k = self.m, self.v, self.k
        z = self.spread * torch.randn(m, v, generator=gen, dtype=D)
        z = z + torch.linspace(0, self.ramp, v, dtype=D)
        zdot = torch.randn(k, m, v, generator=gen, dtype=D) if k else None
        target = torch.randint(0, v, (m,), generator=gen)
        for row, cols in self.masked.items():
            z[row, cols] = -torch.inf
        for row, c in self.offset.items():
            z[row] += c
        for row, t in self.targets.items():
            target[row] = t
        target[list(self.ignored)] = self.ignore_index
        weight = torch.rand(v, generator=gen, dtype=D) + 0.5 if self.weight else None
        scale = self.scale if self.scale is not None else 1 / max(m - len(self.ignored), 1)
        return z, zdot, target, weight, self.ignore_index, self.smoothing, scale, self.want_grad


CASES = {
    "one-row-k1": RowsCase(1, 37, 1),
    "one-class": RowsCase(3, 1, 2, ignored=(1,), scale=0.25),
    "one-row-long": RowsCase(1, 200, 1, weight=True, smoothing=0.1, scale=0.25),
    # an odd vocabulary: a tail that is not a whole 16-byte pack
    "odd-vocab": RowsCase(5, 37, 3, ignored=(1,), scale=0.25),
    "odd-vocab-weighted-smoothed": RowsCase(
        5, 37, 3, weight=True, smoothing=0.1, ignored=(1,), scale=0.25
    ),
    "k7": RowsCase(4, 64, 7, ignored=(1,), scale=0.25),
    "tiles-k7-weights-smoothing": RowsCase(
        5, 300, 7, weight=True, smoothing=0.1, ignored=(1,), tiles={"block_v": 128}
    ),
    "grad-only": RowsCase(4, 100, 0, weight=True, smoothing=0.2, ignored=(0,)),
    "ggn-k2-custom-ignore": RowsCase(
        6, 50, 2, want_grad=False, ignore_index=3, ignored=(2, 5), tiles={"block_v": 16, "block_k": 1}
    ),
    "sum-smoothing": RowsCase(3, 129, 3, smoothing=0.3, scale=1.0),
    "full-smoothing-weighted": RowsCase(6, 29, 3, weight=True, smoothing=1.0, scale=1 / 3),
    # more tangents than one CUDA launch takes (32)
    "k40": RowsCase(3, 24, 40, weight=True, smoothing=0.05, ignored=(1,), scale=1.0),
    # the running max changes at every step of a row; row 0 has masked classes, row 2 a 1e4 offset
    # (its loss is (max − z_y) + log Σ in every implementation: formed as (max + log Σ) − z_y it
    # was rounded at float32's spacing near 1e4, 1e-3, a 1.5e-5 relative error)
    "ramp-masked-offset": RowsCase(
        4, 300, 2, ramp=30.0, masked={0: slice(None, None, 3)}, targets={0: 1}, offset={2: 1e4},
        scale=1.0,
    ),
    # -inf over the first 16-wide tiles of rows 0 (two and a half) and 3 (exactly one): a masked
    # vocabulary prefix; an online softmax started from max = -inf computed exp(-inf - -inf) = NaN
    # (issue 17's audit)
    "first-tile-minus-inf": RowsCase(
        4, 64, 3, weight=True, ignored=(1,), masked={0: slice(0, 40), 3: slice(0, 16)},
        targets={0: 50, 3: 20}, tiles={"block_v": 16},
    ),
}  # fmt: skip

#: The cases run in bfloat16 and float16 too (within 2× the reference's error on the same inputs);
#: under Triton's interpreter (seconds a case) the first three.
LOW_PRECISION = [
    "odd-vocab-weighted-smoothed",
    "tiles-k7-weights-smoothing",
    "ggn-k2-custom-ignore",
    "one-class",
    "one-row-long",
    "odd-vocab",
    "k7",
]


def oracle(z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad):
    """float64 ``(loss_rows, gz, gdz)`` by autograd through ``F.cross_entropy`` (torch's own
    weights, ``ignore_index`` and label smoothing): the loss rows ``scale ×
    F.cross_entropy(..., reduction="none")``, their gradient and its ``jvp`` along each tangent;
    ``None`` where the op returns none."""

    def rows(zz):
        return scale * F.cross_entropy(
            zz,
            target,
            weight=weight,
            ignore_index=ignore_index,
            reduction="none",
            label_smoothing=label_smoothing,
        )

    def total(zz):
        return rows(zz).sum()

    gz = grad(total)(z) if want_grad else None
    gdz = None
    if zdot is not None:
        gdz = vmap(lambda u: jvp(grad(total), (z,), (u,))[1])(zdot)
    return rows(z), gz, gdz


def cast(args, dtype, device):
    """The row op's arguments with ``z``, ``zdot`` in ``dtype`` and everything on ``device``
    (class weights in float32 for the 16-bit types, float64 for float64, as the op takes them)."""
    z, zdot, target, weight, *rest = args
    wdt = D if dtype == D else torch.float32
    return (
        z.to(device, dtype),
        None if zdot is None else zdot.to(device, dtype),
        target.to(device),
        None if weight is None else weight.to(device, wdt),
        *rest,
    )


DECLINED = {
    "1-d-logits": ((torch.randn(3), None, torch.zeros(3, dtype=torch.long), None), (), "[M, V]"),
    "tangent-shape": (
        (torch.randn(3, 4), torch.randn(2, 3, 5), torch.zeros(3, dtype=torch.long), None),
        (),
        "are not [K, 3, 4]",
    ),
    "target-shape": (
        (torch.randn(3, 4), None, torch.zeros(4, dtype=torch.long), None),
        (),
        "targets must be [3] class indices",
    ),
    "float-target": (
        (torch.randn(3, 4), None, torch.zeros(3), None),
        (),
        "targets must be [3] class indices",
    ),
    "weight-shape": (
        (torch.randn(3, 4), None, torch.zeros(3, dtype=torch.long), torch.ones(5)),
        (),
        "class weights [5] are not [4]",
    ),
    "smoothing": (
        (torch.randn(3, 4), None, torch.zeros(3, dtype=torch.long), None),
        (1.5,),
        "label_smoothing 1.5 is not in [0, 1]",
    ),
}


def declined_call(name):
    """``(Call, reason)`` of a :data:`DECLINED` entry: a row-op call every kernel refuses, and the
    reason it must give (the checks all implementations share, ``rows_arg_reasons``)."""
    tensors, smoothing, reason = DECLINED[name]
    args = (*tensors, -100, *(smoothing or (0.0,)), 1.0, True)
    return Call(ROWS_OP, args, (), (), 0), reason
