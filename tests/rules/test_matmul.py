import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64
T, F = True, False


def r(*s):
    return torch.randn(s, dtype=D)


CASES = {
    "mm": (aten.mm.default, (r(4, 3), r(3, 5)), (T, T)),
    "mm-only-a": (aten.mm.default, (r(4, 3), r(3, 5)), (T, F)),
    "mm-only-b": (aten.mm.default, (r(4, 3), r(3, 5)), (F, T)),
    "bmm": (aten.bmm.default, (r(2, 4, 3), r(2, 3, 5)), (T, T)),
    "matmul-2d": (aten.matmul.default, (r(4, 3), r(3, 5)), (T, T)),
    "matmul-3d-2d": (aten.matmul.default, (r(2, 4, 3), r(3, 5)), (T, T)),
    "matmul-2d-3d": (aten.matmul.default, (r(4, 3), r(2, 3, 5)), (T, T)),
    "matmul-3d-2d-weight-only": (aten.matmul.default, (r(2, 4, 3), r(3, 5)), (F, T)),
    "matmul-3d-2d-only-a": (aten.matmul.default, (r(2, 4, 3), r(3, 5)), (T, F)),
    # a tied head, h @ W.T: a batched a, a transposed (non-contiguous) 2-D b
    "matmul-4d-2d-transposed-b": (aten.matmul.default, (r(2, 3, 4, 5), r(6, 5).T), (T, T)),
    # column-major 2-D operands: cotangents computed transposed, as autograd's mm backward
    "mm-transposed-both": (aten.mm.default, (r(3, 4).T, r(5, 3).T), (T, T)),
    "mm-transposed-b-only-b": (aten.mm.default, (r(4, 3), r(5, 3).T), (F, T)),
    "matmul-3d-2d-transposed-b-only-b": (aten.matmul.default, (r(2, 4, 3), r(5, 3).T), (F, T)),
    "matmul-4d-4d": (aten.matmul.default, (r(2, 3, 4, 5), r(2, 3, 5, 4)), (T, T)),
    "matmul-4d-4d-bcast": (aten.matmul.default, (r(2, 1, 4, 5), r(1, 3, 5, 2)), (T, T)),
    "matmul-4d-3d-bcast-only-b": (aten.matmul.default, (r(2, 3, 4, 5), r(1, 5, 2)), (F, T)),
    "matmul-4d-4d-bcast-only-a": (aten.matmul.default, (r(2, 1, 4, 5), r(2, 3, 5, 2)), (T, F)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_matmul_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


def test_matmul_declines_vectors():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    rule = registered_rule(aten.matmul.default)
    call = Call(aten.matmul.default, (r(3), r(3, 4)), (T, T), (None, None), 0)
    assert rule.declines(call)


def test_column_major_cotangents_come_out_in_the_operands_layout():
    """A transposed 2-D operand gets its cotangent column-major, like autograd's (so a tied
    weight's gradient is contiguous after the transpose above it)."""
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    rule = registered_rule(aten.mm.default)
    a, b = r(3, 4).T, r(5, 3).T
    _, _, res = rule.fwd_jvp(Call(aten.mm.default, (a, b), (T, T), (None, None), 0))
    (ga, gb), _ = rule.bwd_jvp(res, r(4, 5), None)
    assert ga.stride() == a.stride() and gb.stride() == b.stride()
    g = r(4, 5)
    want_ga, want_gb = g @ b.T, a.T @ g
    torch.testing.assert_close(rule.bwd_jvp(res, g, None)[0][0], want_ga)
    torch.testing.assert_close(rule.bwd_jvp(res, g, None)[0][1], want_gb)
