import pytest
import torch
from harness import check_rule

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
EMB = aten.embedding.default
ACTIVE = (True, False, False, False, False)


def r(*s):
    return torch.randn(s, dtype=D)


def idx(*v):
    return torch.tensor(v, dtype=torch.int64)


CASES = {
    "plain": (EMB, (r(7, 3), idx(0, 4, 6, 2), -1, False, False), ACTIVE),
    "repeated": (EMB, (r(5, 4), idx(1, 1, 3, 1, 0, 3), -1, False, False), ACTIVE),
    "2d-indices": (EMB, (r(6, 2), idx([0, 5, 2], [2, 2, 4]), -1, False, False), ACTIVE),
    "padding-idx": (EMB, (r(6, 3), idx(0, 2, 2, 5, 1), 2, False, False), ACTIVE),
    "padding-idx-2d-repeated": (EMB, (r(5, 3), idx([0, 0, 4], [1, 0, 3]), 0, False, False), ACTIVE),
    "padding-idx-unused": (EMB, (r(5, 3), idx(1, 2, 3), 4, False, False), ACTIVE),
    "int32-indices": (
        EMB,
        (r(5, 3), torch.tensor([4, 0, 4], dtype=torch.int32), -1, False, False),
        ACTIVE,
    ),
    "scalar-index": (EMB, (r(5, 3), torch.tensor(3), -1, False, False), ACTIVE),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_embedding_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k, reference=_padding_row_constant, unread=[0])


def _padding_row_constant(op, args):
    """``embedding`` whose ``padding_idx`` row is a constant on both sides (torch's gradient
    leaves it out; so must the tangent, or H is not symmetric)."""
    w, ind, pad = args[0], args[1], args[2]
    if pad is not None and pad >= 0:
        row = torch.arange(w.shape[0]).unsqueeze(1) == pad
        w = torch.where(row, w.detach(), w)
    return op(w, ind, *args[2:])


@pytest.mark.parametrize(
    "flags", [(True, False), (False, True)], ids=["scale-grad-by-freq", "sparse"]
)
def test_embedding_rule_declines_unsupported(flags):
    args = (r(5, 3), idx(0, 1), -1, *flags)
    call = Call(EMB, args, ACTIVE, (None,) * 5, 0)
    reason = registered_rule(EMB).declines(call)
    assert isinstance(reason, str) and reason


def test_embedding_inactive_weight_gives_no_cotangent():
    args = (r(5, 3), idx(0, 1), -1, False, False)
    rule = registered_rule(EMB)
    call = Call(EMB, args, (False,) * 5, (None,) * 5, 0)
    y, ydot, res = rule.fwd_jvp(call)
    assert ydot is None
    (gw, *_), (gdw, *_) = rule.bwd_jvp(res, torch.ones_like(y), None)
    assert gw is None and gdw is None
