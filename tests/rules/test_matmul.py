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
