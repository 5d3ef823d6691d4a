"""``where`` and ``index.Tensor`` rules against autograd (float64, K = 1 and 3, every engine
mode), and a small model using both end to end against the double-backward oracle, with no op
falling back."""

import pytest
import torch
import torch.nn as nn
from harness import check_model_end_to_end, check_rule

import hessfast
import hessfast.rules
from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
g0 = torch.Generator().manual_seed(11)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


def mask(*s):
    return torch.rand(*s, generator=g0) > 0.5


def ix(*s, n):
    return torch.randint(0, n, s, generator=g0)


W = aten.where.self
IDX = aten.index.Tensor
CASES = {
    "where": (W, (mask(3, 4), r(3, 4), r(3, 4)), (False, True, True)),
    "where-broadcast": (W, (mask(3, 1), r(1, 4), r(3, 4)), (False, True, True)),
    "where-cond-bigger": (W, (mask(2, 3, 4), r(3, 4), r(4)), (False, True, True)),
    "where-one-active": (W, (mask(3, 4), r(3, 4), r(3, 4)), (False, False, True)),
    "where-scalar-other": (
        aten.where.ScalarOther,
        (mask(3, 4), r(3, 4), 0.5),
        (False, True, False),
    ),
    "where-scalar-self": (aten.where.ScalarSelf, (mask(3, 4), -1.0, r(4)), (False, False, True)),
    "index-rows": (IDX, (r(5, 3), [ix(7, n=5)]), (True, False)),
    "index-middle": (IDX, (r(2, 5, 3), [None, ix(4, n=5)]), (True, False)),
    "index-2d-idx": (IDX, (r(5, 3), [ix(2, 4, n=5)]), (True, False)),
    "index-two-adjacent": (IDX, (r(2, 4, 5, 3), [None, ix(6, n=4), ix(6, n=5)]), (True, False)),
    "index-broadcast-pair": (IDX, (r(4, 5), [ix(3, 1, n=4), ix(1, 2, n=5)]), (True, False)),
    "index-repeated": (IDX, (r(3, 2), [torch.tensor([0, 0, 2, 0])]), (True, False)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_select_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


@pytest.mark.parametrize(
    "op,args",
    [
        (IDX, (r(4, 3), [mask(4)])),
        (IDX, (r(4, 3, 5), [ix(2, n=4), None, ix(2, n=5)])),
        (IDX, (torch.arange(6).reshape(2, 3), [ix(2, n=2)])),
        (W, (r(3) > 0, torch.arange(3), r(3))),
    ],
)
def test_select_declines(op, args):
    active = (False, True, True) if op is W else (True, False)
    call = Call(op, args, active, (None,) * len(args), 0)
    assert registered_rule(op).declines(call) is not None


@pytest.fixture
def no_fallback(monkeypatch):
    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class GatherNet(nn.Module):
    """Rows picked by an index tensor (a pooled-token head, as sequence classifiers take the last
    token), a masked fill through ``where`` and a ``where`` between two active branches."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.other = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x, pick, keep):
        h = torch.tanh(self.inp(x))  # [N, T, 6]
        h = torch.where(keep, h, torch.sigmoid(self.other(x)))
        h = torch.where(h > 0.2, h, 0.0)
        rows = h[torch.arange(h.shape[0]), pick]  # [N, 6]
        return self.head(rows * h[:, [0, 2, 2]].sum(1))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_where_index_net_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = GatherNet().double()
    x = torch.randn(4, 5, 3, dtype=D)
    pick = torch.tensor([4, 0, 2, 4])
    keep = torch.rand(4, 5, 1) > 0.3
    y = torch.randint(0, 4, (4,))
    inputs = (x, pick, keep)
    check_model_end_to_end(model, inputs, y, compile)
