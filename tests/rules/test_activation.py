"""Elementwise activation rules against autograd (float64, K = 1 and 3, every engine mode), on the
family's case table (``tests/cases/activation.py``, which the Triton and CUDA tests run too).

Inputs avoid kinks (never exactly at 0 / the clip bounds) and keep log/sqrt/rsqrt/fractional pow on
positive values. For ops with ``f″ ≡ 0`` autograd's double backward returns explicit zeros where the
rule returns ``None`` (zero), so the second-order-only mode is checked separately for them.
"""

import pytest
import torch
from cases.activation import CASES, declined, declined_call
from harness import check_rule

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

D = torch.float64


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_activation_rule_matches_autograd(name, k):
    case = CASES[name]
    args = case.args(case.x())
    check_rule(case.op, args, case.active(), k=k)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.flat])
def test_flat_activation_has_no_second_order_term(name):
    case = CASES[name]
    x = case.x()
    args = case.args(x)
    gen = torch.Generator().manual_seed(1)
    tx = torch.randn(2, *x.shape, dtype=D, generator=gen)
    rule = registered_rule(case.op)
    call = Call(case.op, args, case.active(), (tx,) + (None,) * len(case.extra), 2)
    _, _, res = rule.fwd_jvp(call)
    _, gdx = rule.bwd_jvp(res, torch.randn(x.shape, dtype=D, generator=gen), None)
    assert gdx[0] is None or torch.count_nonzero(gdx[0]) == 0


@pytest.mark.parametrize("name,inside", [("softplus-threshold", None), ("hardswish", (-3.0, 3.0))])
def test_piecewise_cases_span_every_piece(name, inside):
    """The inputs reach both sides of softplus's threshold and all three pieces of hardswish."""
    case = CASES[name]
    x = case.x()
    if inside is None:
        beta, thr = case.extra
        assert (x * beta > thr).any() and (x * beta <= thr).any()
    else:
        lo, hi = inside
        assert (x < lo).any() and ((x > lo) & (x < hi)).any() and (x > hi).any()


@pytest.mark.parametrize("name", declined("torch"))
def test_declines_with_its_reason(name):
    op, call, reasons = declined_call(name)
    why = registered_rule(op).declines(call)
    assert why is not None and reasons["torch"] in why
