"""A softmax head whose rows saturate: the loss-Hessian product ``ġ_z`` of a saturated row is
subnormal in float32; and what the tests of the subnormal scale read of it
(``tests/test_ggn_scale.py``, ``tests/test_fallback_scale.py``)."""

import copy

import torch
import torch.nn.functional as F
from oracle import ggn_vp
from torch import nn

#: How far a saturated row's leading class leads the others: e^-95 is below float32's tiny.
GAP = 95.0


def saturated_head(
    pre: bool, saturated_first: bool = False, all_saturated: bool = False, gap: float = GAP
):
    """Inputs of 8 rows and 6 classes through ``[Linear(6, 6) ≈ I,] head``, ``head = Linear(6, 6) ≈
    I``, bias-free: ``(model, x, y, v)`` with two tangents per parameter. Four rows (all with
    ``all_saturated``) are saturated: one class leads every other by ``gap`` (every entry of their
    ``ġ_z`` is subnormal); rows 0–3 with ``saturated_first``, else 4–7. Class 5 trails every row's
    leader by ``gap``."""
    g = torch.Generator().manual_seed(0)
    n, v = 8, 6
    x = 2 * torch.randn(n, v, generator=g)
    for r in range(n):
        if all_saturated or (r < 4) == saturated_first:
            x[r] = -gap
            x[r, r % 5] = 0.0
    x[:, 5] = x[:, :5].amax(1) - gap
    layers = []
    for _ in range(2 if pre else 1):
        lin = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(v) + 1e-3 * torch.randn(v, v, generator=g))
        layers.append(lin)
    model = nn.Sequential(*layers)
    y = torch.randint(0, 5, (n,), generator=g)
    vec = {name: torch.randn(2, *p.shape, generator=g) for name, p in model.named_parameters()}
    return model, x, y, vec


def subnormals(x: torch.Tensor) -> int:
    """The number of subnormal entries of ``x``."""
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())


def ggn_oracle(model, x, y, vec, loss_fn=F.cross_entropy):
    """The float64 torch.func GGN-VP of a float64 copy of ``model``."""
    x = x.double() if x.is_floating_point() else x
    vec = {n: t.double() for n, t in vec.items()}
    return ggn_vp(copy.deepcopy(model).double(), loss_fn, (x,), y, vec)


def product_errors(out, ref) -> list[float]:
    """Per product: the worst relative error (max-norm, per parameter) against the oracle."""
    return [
        max(
            float((out[n][k].double() - ref[n][k]).abs().max() / ref[n][k].abs().max()) for n in out
        )
        for k in range(next(iter(out.values())).shape[0])
    ]
