"""``baddbmm`` rule against autograd (float64, K = 1 and 3, every engine mode), and an attention-
score model written with ``torch.baddbmm`` end to end against the double-backward oracle, with no
op falling back."""

import pytest
import torch
import torch.nn as nn
from harness import check_model_end_to_end, check_rule

import hessfast
import hessfast.rules

aten = torch.ops.aten
OP = aten.baddbmm.default
D = torch.float64
g0 = torch.Generator().manual_seed(21)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


ALL = (True, True, True, False, False)
CASES = {
    "plain": ((r(2, 3, 4), r(2, 3, 5), r(2, 5, 4), 1, 1), ALL),
    "scaled": ((r(2, 3, 4), r(2, 3, 5), r(2, 5, 4), 0.5, -1.5), ALL),
    "broadcast-bias": ((r(4), r(3, 2, 5), r(3, 5, 4), 2.0, 0.7), ALL),
    "bias-rowwise": ((r(3, 1, 4), r(3, 2, 5), r(3, 5, 4), 1, 0.3), ALL),
    "beta-zero": ((r(2, 3, 4), r(2, 3, 5), r(2, 5, 4), 0, 1), (False, True, True, False, False)),
    "a-only": ((r(2, 3, 4), r(2, 3, 5), r(2, 5, 4), 1, 2), (False, True, False, False, False)),
    "b-and-bias": ((r(2, 3, 4), r(2, 3, 5), r(2, 5, 4), 1, 2), (True, False, True, False, False)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_baddbmm_rule_matches_autograd(case, k):
    args, active = CASES[case]
    check_rule(OP, args, active, k=k)


@pytest.fixture
def no_fallback(monkeypatch):
    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class BAddScores(nn.Module):
    """Attention scores as GPT-2's ``_upcast_and_reordered_attn`` writes them: a learned bias
    plus ``alpha · q kᵀ`` through ``torch.baddbmm``."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.k = nn.Linear(4, 6)
        self.bias = nn.Parameter(torch.randn(5, 5))
        self.head = nn.Linear(5 * 5, 3)

    def forward(self, x):
        q, k = self.q(x), self.k(x)  # [N, T, 6]
        s = torch.baddbmm(self.bias.expand(x.shape[0], 5, 5), q, k.transpose(1, 2), alpha=0.4)
        return self.head(torch.softmax(s, -1).flatten(1))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_baddbmm_model_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = BAddScores().double()
    x = torch.randn(3, 5, 4, dtype=D)
    y = torch.randint(0, 3, (3,))
    check_model_end_to_end(model, (x,), y, compile)
