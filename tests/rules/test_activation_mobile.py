"""``hardsigmoid``, ``hardswish`` and ``mish`` rules against autograd (float64, K = 1 and 3, every
engine mode), torch's derivative conventions at the kinks (x = ±3), and a MobileNetV3-style block
(in-place hardswish, hardsigmoid squeeze-excite) end to end against the double-backward oracle,
with no op falling back."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import check_model_end_to_end, check_rule

import hessfast
import hessfast.rules

aten = torch.ops.aten
D = torch.float64
g0 = torch.Generator().manual_seed(77)


def r(*s, scale=1.0):
    return torch.randn(*s, dtype=D, generator=g0) * scale


def with_kinks(*s, scale=3.0):
    """Random values with the kinks −3, 3 (and 0) planted exactly: the rule must follow torch's
    one-sided conventions there, in the first and the second derivative."""
    x = r(*s, scale=scale).flatten()
    x[:5] = torch.tensor([-3.0, 3.0, 0.0, -3.0, 3.0], dtype=D)
    return x.reshape(s)


CASES = {
    "hardsigmoid": (aten.hardsigmoid.default, (r(3, 5, scale=3.0),)),
    "hardsigmoid-kinks": (aten.hardsigmoid.default, (with_kinks(4, 5),)),
    "hardswish": (aten.hardswish.default, (r(3, 5, scale=3.0),)),
    "hardswish-kinks": (aten.hardswish.default, (with_kinks(4, 5),)),
    "hardswish-4d": (aten.hardswish.default, (r(2, 3, 4, 5, scale=4.0),)),
    "mish": (aten.mish.default, (r(3, 5, scale=2.0),)),
    # the far tails: softplus is linear beyond 20, exp underflows far below 0
    "mish-tails": (
        aten.mish.default,
        (torch.tensor([[-40.0, -15.0, -3.0, 0.0], [2.5, 19.0, 21.0, 35.0]], dtype=D),),
    ),
}


def hardsigmoid_composite(x):
    """``hardsigmoid`` as ``hardtanh(x + 3, 0, 6) / 6``: the same values, the same derivative
    convention at ±3 (``hardtanh_backward`` is 0 on the bounds), and twice differentiable by
    autograd (torch has no derivative for ``hardsigmoid_backward``: double backward through
    ``hardsigmoid`` raises, which is why the oracles use this form)."""
    return F.hardtanh(x + 3, 0.0, 6.0) / 6


def _reference(op, args):
    if op is aten.hardsigmoid.default:
        return hardsigmoid_composite(args[0])
    return op(*args)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_mobile_activation_matches_autograd(case, k):
    op, args = CASES[case]
    check_rule(op, args, (True,), k=k, reference=_reference)


def test_hardswish_conventions_at_the_kinks():
    """As torch's kernels: hardswish f′(−3) = 0, f′(3) = 1 (the outer pieces), f″(±3) = 0 (its
    double backward); hardsigmoid f′(±3) = 0. The K = 3 path (``f′`` formed, not the fused
    kernel) is checked against ``hardswish_backward`` itself."""
    from hessfast.rules.activation import hardsigmoid_derivs, hardswish_derivs

    x = torch.tensor([-3.0, 3.0, -4.0, 0.0, 4.0], dtype=D)
    d1, d2 = hardswish_derivs(x, second=True)
    assert d1.tolist() == aten.hardswish_backward(torch.ones_like(x), x).tolist()
    assert d1.tolist() == [0.0, 1.0, 0.0, 0.5, 1.0] and d2.tolist() == [0, 0, 0, 1 / 3, 0]
    s1, _ = hardsigmoid_derivs(x)
    # exactly 1/6 in float64: torch's CPU hardsigmoid_backward multiplies by a float32 1/6
    assert s1.tolist() == [0.0, 0.0, 0.0, 1 / 6, 0.0]


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def no_fallback(monkeypatch):
    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class SqueezeExcite(nn.Module):
    def __init__(self, c, hidden, gate=F.hardsigmoid):
        super().__init__()
        self.gate = gate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(self.pool(x))))
        return x * self.gate(s)


class MobileBlock(nn.Module):
    """MobileNetV3's inverted residual: expand 1×1, hardswish (in place, as torchvision writes
    it), depthwise 3×3, squeeze-excite gated by hardsigmoid, project 1×1; a Mish head."""

    def __init__(self, gate=F.hardsigmoid):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.act = nn.Hardswish(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = SqueezeExcite(8, 4, gate)
        self.project = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        h = F.hardswish(self.stem(x))
        z = self.act(self.expand(h))
        z = self.se(F.hardswish(self.dw(z)))
        h = h + self.project(z)
        return self.head(F.mish(h.mean((2, 3))))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_mobile_block_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = MobileBlock().double()
    # scaled so that the hard activations see all three of their regions
    x = 3 * torch.randn(3, 3, 9, 7, dtype=D)
    y = torch.randint(0, 6, (3,))
    # the oracles differentiate a twin whose gate is the composite hardsigmoid (torch cannot
    # differentiate its hardsigmoid twice)
    twin = MobileBlock(gate=hardsigmoid_composite).double()
    twin.load_state_dict(model.state_dict())
    check_model_end_to_end(model, (x,), y, compile, reference=twin)
