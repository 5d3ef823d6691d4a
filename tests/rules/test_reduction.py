import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64
T, F = True, False


def r(*s):
    return torch.randn(s, dtype=D)


CASES = {
    "sum-dim": (aten.sum.dim_IntList, (r(2, 3, 4), [1], False, None), (T, F, F, F)),
    "sum-dims-neg-keepdim": (aten.sum.dim_IntList, (r(2, 3, 4), [-1, 0], True, None), (T, F, F, F)),
    "sum-dim-none-keepdim": (aten.sum.dim_IntList, (r(2, 3), None, True, None), (T, F, F, F)),
    "sum-dtype": (aten.sum.dim_IntList, (r(2, 3), [0], False, D), (T, F, F, F)),
    "mean-dim": (aten.mean.dim, (r(2, 3, 4), [-1], False, None), (T, F, F, F)),
    "mean-dims-keepdim": (aten.mean.dim, (r(2, 3, 4, 5), [1, 3], True, None), (T, F, F, F)),
    "mean-dim-none": (aten.mean.dim, (r(2, 3), None, True, None), (T, F, F, F)),
    "mean-dim-empty-keepdim": (aten.mean.dim, (r(2, 3), [], True, None), (T, F, F, F)),
}

# 0-d outputs (the harness draws random cotangents with ``randn(*shape)``, which rejects ``()``)
SCALAR_CASES = {
    "sum-all": (aten.sum.default, (r(2, 3, 4), None)),
    "sum-0d-input": (aten.sum.default, (r(), None)),
    "sum-dim-none": (aten.sum.dim_IntList, (r(2, 3), None, False, None)),
    "sum-dim-empty": (aten.sum.dim_IntList, (r(2, 3), [], False, None)),
    "mean-all": (aten.mean.default, (r(2, 3, 4), None)),
    "mean-dim-none": (aten.mean.dim, (r(2, 3), None, False, None)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_reduction_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_full_reduction_to_0d_matches_autograd(case, k):
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call, invoke

    op, args = SCALAR_CASES[case]
    x = args[0]
    rule = registered_rule(op)
    tx = r(k, *x.shape) if k else None
    active = (T,) + (F,) * (len(args) - 1)
    call = Call(op, args, active, (tx,) + (None,) * (len(args) - 1), k)
    assert rule.declines(call) is None
    y, ydot, res = rule.fwd_jvp(call)
    xr = x.clone().requires_grad_(True)
    yr = invoke(op, (xr, *args[1:]))
    torch.testing.assert_close(y, yr.detach())
    (jac,) = torch.autograd.grad(yr, xr)  # the (constant) gradient of the reduction
    if k:
        torch.testing.assert_close(ydot, (tx * jac).reshape(k, -1).sum(1))
    g, gd = r(), (r(k) if k else None)
    (gx, *_), (gdx, *_) = rule.bwd_jvp(res, g, gd)
    torch.testing.assert_close(gx, g * jac)
    if k:
        torch.testing.assert_close(gdx, gd.reshape(k, *[1] * x.dim()) * jac)
    else:
        assert gdx is None


def test_sum_dtype_upcast_casts_cotangent_back():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    x = torch.randn(2, 3, dtype=torch.float32)
    op = aten.sum.dim_IntList
    rule = registered_rule(op)
    call = Call(op, (x, [1], False, D), (T, F, F, F), (torch.randn(3, 2, 3), None, None, None), 3)
    y, ydot, res = rule.fwd_jvp(call)
    assert y.dtype == ydot.dtype == D and ydot.shape == (3, 2)
    (g, *_), (gd, *_) = rule.bwd_jvp(res, torch.ones(2, dtype=D), torch.ones(3, 2, dtype=D))
    assert g.dtype == gd.dtype == torch.float32 and g.shape == (2, 3) and gd.shape == (3, 2, 3)
