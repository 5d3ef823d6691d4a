import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64
T, F = True, False


def r(*s):
    return torch.randn(s, dtype=D)


def pos(*s):
    return torch.rand(s, dtype=D) + 0.5


CASES = {
    # add / sub / rsub (Tensor): same shape, broadcasting both ways, alpha, one/both active
    "add-same": (aten.add.Tensor, (r(3, 4), r(3, 4), 1), (T, T, F)),
    "add-bcast-b": (aten.add.Tensor, (r(2, 3, 4), r(4), 1), (T, T, F)),
    "add-bcast-a": (aten.add.Tensor, (r(4), r(2, 3, 4), 1), (T, T, F)),
    "add-bcast-both": (aten.add.Tensor, (r(3, 1), r(1, 4), 2.5), (T, T, F)),
    "add-only-a-bcast": (aten.add.Tensor, (r(3, 1), r(1, 4), 1), (T, F, F)),
    "add-only-b": (aten.add.Tensor, (r(2, 3), r(3), -0.5), (F, T, F)),
    "add-python-scalar": (aten.add.Tensor, (r(2, 3), 1.5, 1), (T, F, F)),
    "add-0d": (aten.add.Tensor, (r(2, 3), r(), 2), (T, T, F)),
    "sub-bcast": (aten.sub.Tensor, (r(2, 1, 4), r(3, 1), 1), (T, T, F)),
    "sub-alpha-only-b": (aten.sub.Tensor, (r(3, 4), r(4), 3.0), (F, T, F)),
    "rsub-tensor": (aten.rsub.Tensor, (r(3, 4), r(1, 4), 2.0), (T, T, F)),
    "add-scalar": (aten.add.Scalar, (r(3, 4), 2.0, 3), (T, F, F)),
    "sub-scalar": (aten.sub.Scalar, (r(3, 4), 2.0, 1), (T, F, F)),
    "rsub-scalar": (aten.rsub.Scalar, (r(3, 4), 1.0, 2.0), (T, F, F)),
    "neg": (aten.neg.default, (r(2, 3),), (T,)),
    # mul: bilinear, second-order term when both are active
    "mul-same": (aten.mul.Tensor, (r(3, 4), r(3, 4)), (T, T)),
    "mul-bcast-b": (aten.mul.Tensor, (r(2, 3, 4), r(3, 1)), (T, T)),
    "mul-bcast-a": (aten.mul.Tensor, (r(4), r(2, 3, 4)), (T, T)),
    "mul-bcast-both": (aten.mul.Tensor, (r(3, 1), r(1, 4)), (T, T)),
    "mul-only-a": (aten.mul.Tensor, (r(3, 1), r(2, 3, 4)), (T, F)),
    "mul-only-b": (aten.mul.Tensor, (r(2, 3, 4), r(4)), (F, T)),
    "mul-python-scalar": (aten.mul.Tensor, (r(2, 3), 0.25), (T, F)),
    "mul-0d": (aten.mul.Tensor, (r(2, 3), r()), (T, T)),
    "mul-bool-mask": (aten.mul.Tensor, (r(2, 3), torch.rand(2, 3) > 0.5), (T, F)),
    "mul-scalar": (aten.mul.Scalar, (r(2, 3), 1.5), (T, F)),
    # div: derivatives in both operands
    "div-same": (aten.div.Tensor, (r(3, 4), pos(3, 4)), (T, T)),
    "div-bcast-b": (aten.div.Tensor, (r(2, 3, 4), pos(4)), (T, T)),
    "div-bcast-a": (aten.div.Tensor, (r(3, 1), pos(2, 3, 4)), (T, T)),
    "div-only-a": (aten.div.Tensor, (r(2, 3, 4), pos(3, 1)), (T, F)),
    "div-only-b": (aten.div.Tensor, (r(3, 1), pos(2, 1, 4)), (F, T)),
    "div-python-scalar": (aten.div.Tensor, (r(2, 3), 8.0), (T, F)),
    "div-0d": (aten.div.Tensor, (r(2, 3), pos()), (T, T)),
    "div-scalar": (aten.div.Scalar, (r(2, 3), 3.0), (T, F)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_elementwise_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


def test_mixed_dtype_casts_tangents_and_cotangents():
    """float32 active operand promoted by a float64 one: ẏ has y's dtype, ḡ_a has a's."""
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    a = torch.randn(3, dtype=torch.float32)
    b = torch.randn(2, 3, dtype=D)
    rule = registered_rule(aten.mul.Tensor)
    call = Call(aten.mul.Tensor, (a, b), (True, False), (torch.randn(2, 3), None), 2)
    y, ydot, res = rule.fwd_jvp(call)
    assert ydot.dtype == y.dtype == D and ydot.shape == (2, 2, 3)
    (ga, _), (gda, _) = rule.bwd_jvp(res, torch.randn(2, 3, dtype=D), torch.randn(2, 2, 3, dtype=D))
    assert ga.dtype == gda.dtype == torch.float32 and ga.shape == (3,) and gda.shape == (2, 3)
