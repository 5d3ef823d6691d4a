"""Elementwise activation rules against autograd (float64, K = 1 and 3, every engine mode).

Inputs avoid kinks (never exactly at 0 / the clip bounds) and keep log/sqrt/rsqrt/fractional pow on
positive values. For ops with ``f″ ≡ 0`` autograd's double backward returns explicit zeros where the
rule returns ``None`` (zero), so the second-order-only mode is checked separately for them.
"""

import pytest
import torch
from harness import check_rule

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
g0 = torch.Generator().manual_seed(1234)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


def pos(*s):
    return torch.rand(*s, dtype=D, generator=g0) + 0.5


def away(*s, kinks=(0.0,), gap=0.05, scale=1.5):
    """Random values (standard deviation ``scale``) at least ``gap`` away from every kink."""
    x = r(*s) * scale
    for c in kinks:
        near = (x - c).abs() < gap
        x = torch.where(near, x + 2 * gap * torch.sign(x - c + 1e-12), x)
    return x


# (op, args, flat) with ``flat`` marking f″ ≡ 0.
CASES = {
    "relu": (aten.relu.default, (away(3, 4),), True),
    "gelu-erf": (aten.gelu.default, (r(3, 4) * 2, "none"), False),
    "gelu-tanh": (aten.gelu.default, (r(3, 4) * 2, "tanh"), False),
    "silu": (aten.silu.default, (r(2, 3, 4) * 2,), False),
    "tanh": (aten.tanh.default, (r(3, 4),), False),
    "sigmoid": (aten.sigmoid.default, (r(3, 4) * 2,), False),
    "exp": (aten.exp.default, (r(3, 4),), False),
    "log": (aten.log.default, (pos(3, 4),), False),
    "sqrt": (aten.sqrt.default, (pos(3, 4),), False),
    "rsqrt": (aten.rsqrt.default, (pos(3, 4),), False),
    "pow-2": (aten.pow.Tensor_Scalar, (r(3, 4), 2), False),
    "pow-3": (aten.pow.Tensor_Scalar, (r(3, 4), 3), False),
    "pow-half": (aten.pow.Tensor_Scalar, (pos(3, 4), 0.5), False),
    "pow-neg-frac": (aten.pow.Tensor_Scalar, (pos(3, 4), -1.5), False),
    "pow-neg-int": (aten.pow.Tensor_Scalar, (away(3, 4, gap=0.3), -2), False),
    "pow-1": (aten.pow.Tensor_Scalar, (r(3, 4), 1), True),
    "pow-0": (aten.pow.Tensor_Scalar, (r(3, 4), 0), True),
    "sin": (aten.sin.default, (r(3, 4) * 2,), False),
    "cos": (aten.cos.default, (r(3, 4) * 2,), False),
    "reciprocal": (aten.reciprocal.default, (away(3, 4, gap=0.3),), False),
    "abs": (aten.abs.default, (away(3, 4),), True),
    "square": (aten.square.default, (r(3, 4),), False),
    "softplus": (aten.softplus.default, (r(3, 4) * 2, 1.0, 20.0), False),
    # beta·x on both sides of the threshold: the linear region is exercised too
    "softplus-threshold": (aten.softplus.default, (away(4, 5, kinks=(0.5,)), 2.0, 1.0), False),
    "leaky_relu": (aten.leaky_relu.default, (away(3, 4), 0.1), True),
    "elu": (aten.elu.default, (away(3, 4), 1.0, 1, 1), False),
    "elu-scaled": (aten.elu.default, (away(3, 4), 0.7, 1.3, 0.8), False),
    "hardtanh": (aten.hardtanh.default, (away(3, 4, kinks=(-1.0, 1.0)), -1.0, 1.0), True),
    "hardtanh-relu6": (
        aten.hardtanh.default,
        (away(3, 4, kinks=(0.0, 6.0), scale=6.0), 0.0, 6.0),
        True,
    ),
}


def _active(args):
    return (True,) + (False,) * (len(args) - 1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_rule_matches_autograd(case, k):
    op, args, _ = CASES[case]
    check_rule(op, args, _active(args), k=k)


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[2]])
def test_flat_activation_has_no_second_order_term(case):
    op, args, _ = CASES[case]
    rule = registered_rule(op)
    tx = r(2, *args[0].shape)
    call = Call(op, args, _active(args), (tx,) + (None,) * (len(args) - 1), 2)
    _, _, res = rule.fwd_jvp(call)
    _, gdx = rule.bwd_jvp(res, r(*args[0].shape), None)
    assert gdx[0] is None or torch.count_nonzero(gdx[0]) == 0


def test_softplus_threshold_case_spans_both_regions():
    x, beta, thr = CASES["softplus-threshold"][1]
    assert (x * beta > thr).any() and (x * beta <= thr).any()


@pytest.mark.parametrize(
    "op,args",
    [
        (aten.gelu.default, (r(3), "erf")),
        (aten.pow.Tensor_Scalar, (r(3), 2j)),
        (aten.relu.default, (torch.arange(3),)),
    ],
)
def test_declines(op, args):
    call = Call(op, args, _active(args), (None,) * len(args), 0)
    assert registered_rule(op).declines(call) is not None
