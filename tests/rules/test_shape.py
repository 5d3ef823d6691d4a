import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64
T, F = True, False


def r(*s):
    return torch.randn(s, dtype=D)


CASES = {
    "view": (aten.view.default, (r(2, 3, 4), [6, 4]), (T, F)),
    "view-infer": (aten.view.default, (r(2, 3, 4), [-1, 12]), (T, F)),
    "reshape": (aten.reshape.default, (r(2, 3, 4), [4, -1]), (T, F)),
    "unsafe-view": (aten._unsafe_view.default, (r(6, 4), [2, 3, 4]), (T, F)),
    "permute": (aten.permute.default, (r(2, 3, 4), [2, 0, 1]), (T, F)),
    "permute-neg": (aten.permute.default, (r(2, 3, 4, 5), [0, -2, 1, -1]), (T, F)),
    "transpose": (aten.transpose.int, (r(2, 3, 4), 0, 2), (T, F, F)),
    "transpose-neg": (aten.transpose.int, (r(2, 3, 4), -1, -2), (T, F, F)),
    "t": (aten.t.default, (r(3, 4),), (T,)),
    "t-1d": (aten.t.default, (r(3),), (T,)),
    "expand": (aten.expand.default, (r(3, 1), [2, 3, 4], False), (T, F, F)),
    "expand-keep": (aten.expand.default, (r(1, 4), [-1, 4], False), (T, F, F)),
    "unsqueeze": (aten.unsqueeze.default, (r(2, 3), 1), (T, F)),
    "unsqueeze-neg": (aten.unsqueeze.default, (r(2, 3), -1), (T, F)),
    "squeeze-default": (aten.squeeze.default, (r(2, 1, 3, 1),), (T,)),
    "squeeze-dim": (aten.squeeze.dim, (r(2, 1, 3), -2), (T, F)),
    "squeeze-dims": (aten.squeeze.dims, (r(1, 2, 1, 3), [0, -2]), (T, F)),
    "flatten": (aten.flatten.using_ints, (r(2, 3, 4, 5), 1, -2), (T, F, F)),
    "unflatten": (aten.unflatten.int, (r(2, 12), -1, [3, 4]), (T, F, F)),
    "slice": (aten.slice.Tensor, (r(4, 6), 1, 1, 5, 1), (T, F, F, F, F)),
    "slice-step": (aten.slice.Tensor, (r(4, 7), -1, 1, None, 2), (T, F, F, F, F)),
    "slice-neg-bounds": (aten.slice.Tensor, (r(5, 3), 0, -4, -1, 2), (T, F, F, F, F)),
    "slice-open": (aten.slice.Tensor, (r(5, 3), 0, None, None, 1), (T, F, F, F, F)),
    "select": (aten.select.int, (r(3, 4, 5), 1, 2), (T, F, F)),
    "select-neg": (aten.select.int, (r(3, 4, 5), -1, -1), (T, F, F)),
    "cat": (aten.cat.default, ([r(2, 3), r(4, 3), r(1, 3)], 0), ([T, T, T], F)),
    "cat-inactive-member": (aten.cat.default, ([r(2, 3), r(2, 5), r(2, 1)], -1), ([T, F, T], F)),
    "cat-one-active": (aten.cat.default, ([r(2, 3, 2), r(2, 1, 2)], 1), ([F, T], F)),
    "stack": (aten.stack.default, ([r(2, 3), r(2, 3)], 1), ([T, T], F)),
    "stack-neg-inactive": (aten.stack.default, ([r(2, 3), r(2, 3), r(2, 3)], -1), ([T, F, T], F)),
    "contiguous": (aten.contiguous.default, (r(3, 4).t(), torch.contiguous_format), (T, F)),
    "clone": (aten.clone.default, (r(3, 4), None), (T, F)),
    "alias": (aten.alias.default, (r(3, 4),), (T,)),
    "dropout-eval": (aten.dropout.default, (r(3, 4), 0.5, False), (T, F, F)),
    "to-copy-same": (
        aten._to_copy.default,
        (r(3, 4), None, None, None, None, False, None),
        (T, F, F, F, F, F, F),
    ),
    "to-dtype-same": (aten.to.dtype, (r(3, 4), D, False, False, None), (T, F, F, F, F)),
    "split": (aten.split.Tensor, (r(2, 7), 3, -1), (T, F, F)),
    "split-with-sizes": (aten.split_with_sizes.default, (r(5, 2), [1, 4], 0), (T, F, F)),
    "unbind": (aten.unbind.int, (r(2, 3, 4), 1), (T, F)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_shape_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


def test_reshape_to_and_from_0d():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    rule = registered_rule(aten.view.default)
    x = r(1, 1)
    call = Call(aten.view.default, (x, []), (T, F), (r(3, 1, 1), None), 3)
    y, ydot, res = rule.fwd_jvp(call)
    assert y.shape == () and ydot.shape == (3,)
    (g, _), (gd, _) = rule.bwd_jvp(res, r(), r(3))
    assert g.shape == (1, 1) and gd.shape == (3, 1, 1)
    call = Call(aten.unsqueeze.default, (r(), 0), (T, F), (r(3), None), 3)
    y, ydot, res = rule.fwd_jvp(call)
    assert ydot.shape == (3, 1)
    (g, _), (gd, _) = rule.bwd_jvp(res, r(1), r(3, 1))
    assert g.shape == () and gd.shape == (3,)


def _rule_and_call(op, args, active, tangents, k):
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    return registered_rule(op), Call(op, args, active, tangents, k)


def test_cast_changes_dtype_of_tangents_and_back():
    x = torch.randn(3, 4, dtype=torch.float32)
    args = (x, D, None, None, None, False, None)
    rule, call = _rule_and_call(
        aten._to_copy.default,
        args,
        (True,) + (False,) * 6,
        (torch.randn(2, 3, 4),) + (None,) * 6,
        2,
    )
    assert rule.declines(call) is None
    y, ydot, res = rule.fwd_jvp(call)
    assert y.dtype == ydot.dtype == D
    torch.testing.assert_close(ydot, call.tangents[0].to(D))
    (g, *_), (gd, *_) = rule.bwd_jvp(res, torch.randn(3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D))
    assert g.dtype == gd.dtype == torch.float32


def test_cast_declines_device_change_and_active_dropout():
    x = torch.randn(3)
    rule, call = _rule_and_call(
        aten._to_copy.default,
        (x, None, None, torch.device("meta"), None, False, None),
        (True,) + (False,) * 6,
        (None,) * 7,
        0,
    )
    assert rule.declines(call)
    rule, call = _rule_and_call(aten.dropout.default, (x, 0.1, True), (True, F, F), (None,) * 3, 0)
    assert rule.declines(call)


def test_cat_gradient_only_run_with_no_tangent_list():
    """The engine passes ``None`` (not a list) as a list argument's tangent when K = 0."""
    xs = [r(2, 3), r(1, 3)]
    rule, call = _rule_and_call(aten.cat.default, (xs, 0), ([T, F], F), (None, None), 0)
    y, ydot, res = rule.fwd_jvp(call)
    assert ydot is None
    (gl, _), (gdl, _) = rule.bwd_jvp(res, torch.ones(3, 3, dtype=D), None)
    assert gl[1] is None and gdl is None and gl[0].shape == (2, 3)


def test_split_backward_fills_outputs_nobody_used_with_zeros():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    x = r(2, 6)
    call = Call(aten.split.Tensor, (x, 2, 1), (T, F, F), (r(3, 2, 6), None, None), 3)
    rule = registered_rule(aten.split.Tensor)
    ys, _, res = rule.fwd_jvp(call)
    g = (None, torch.ones_like(ys[1]), None)
    gx, _ = rule.bwd_jvp(res, g, None)
    expected = torch.zeros_like(x)
    expected[:, 2:4] = 1
    torch.testing.assert_close(gx[0], expected)
