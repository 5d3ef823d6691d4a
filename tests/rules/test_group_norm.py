"""``group_norm`` rule against autograd (float64, K = 1 and 3, every engine mode), its native
gradient path, and a depthwise Conv1d + GroupNorm + Mish net end to end against the
double-backward oracle, with no op falling back."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import check_model_end_to_end, check_rule

import hessfast
import hessfast.rules
from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
GN = aten.group_norm.default
D = torch.float64
g0 = torch.Generator().manual_seed(99)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


def gn(x, groups, w=True, b=True, eps=1e-5):
    c = x.shape[1]
    return (x, groups, r(c) if w else None, r(c) if b else None, eps, True)


ALL = (True, False, True, True, False, False)
CASES = {
    "1d": (gn(r(2, 6, 5), 3), ALL),
    "2d": (gn(r(3, 4, 3, 5), 2), ALL),
    "3d-odd": (gn(r(2, 6, 3, 2, 3), 3, eps=1e-3), ALL),
    "one-group": (gn(r(2, 5, 7), 1), ALL),
    "instance-like": (gn(r(2, 4, 3, 3), 4), ALL),
    "no-spatial": (gn(r(3, 6), 2), ALL),
    "no-affine": (gn(r(2, 6, 5), 3, w=False, b=False), (True, False, False, False, False, False)),
    "weight-only": (gn(r(2, 6, 5), 2, b=False), (True, False, True, False, False, False)),
    "input-only": (gn(r(2, 6, 5), 3), (True, False, False, False, False, False)),
    "affine-only": (gn(r(2, 6, 5), 3), (False, False, True, True, False, False)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_group_norm_rule_matches_autograd(case, k):
    args, active = CASES[case]
    check_rule(GN, args, active, k=k)


def test_gradient_runs_the_native_kernels():
    args, active = CASES["2d"]
    call = Call(GN, args, active, (None,) * 6, 0)
    _, _, res = registered_rule(GN).fwd_jvp(call)
    assert res[0] == "native"


@pytest.mark.parametrize(
    "args",
    [
        (torch.arange(12.0).reshape(2, 6).long(), 3, None, None, 1e-5, True),
        (r(2, 6, 4), 4, None, None, 1e-5, True),
        (r(6), 3, None, None, 1e-5, True),
        (r(2, 6, 4), 3, r(3), None, 1e-5, True),
    ],
)
def test_group_norm_declines(args):
    call = Call(GN, args, (True,) + (False,) * 5, (None,) * 6, 0)
    assert registered_rule(GN).declines(call) is not None


@pytest.fixture
def no_fallback(monkeypatch):
    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class ConvGNMish(nn.Module):
    """A 1-D conv net as audio/sequence models write it: pointwise and depthwise Conv1d, GroupNorm
    (several groups, then one), Mish, a global average."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(3, 8, 1)
        self.dw = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.gn1 = nn.GroupNorm(4, 8)
        self.pw = nn.Conv1d(8, 6, 1)
        self.gn2 = nn.GroupNorm(1, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.mish(self.gn1(self.dw(self.inp(x))))
        h = F.mish(self.gn2(self.pw(h)))
        return self.head(h.mean(-1))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_conv_groupnorm_mish_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = ConvGNMish().double()
    for m in model.modules():  # non-trivial affine parameters
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    x = torch.randn(3, 3, 11, dtype=D)
    y = torch.randint(0, 4, (3,))
    check_model_end_to_end(model, (x,), y, compile)


def test_native_residuals_with_a_cotangent_tangent():
    """A forward without tangents (native kernels) followed by a backward that does receive ``ġ``
    (an input tangent that is zero here): ``ġ_x = Jᵀ ġ``, the same as from the reference math."""
    args, active = CASES["2d"]
    rule = registered_rule(GN)
    _, _, res = rule.fwd_jvp(Call(GN, args, active, (None,) * 6, 0))
    x = args[0]
    g, gdot = r(*x.shape), r(2, *x.shape)
    got_g, got_gd = rule.bwd_jvp(res, g, gdot)
    zero = torch.zeros(2, *x.shape, dtype=D)
    tans = (zero, None, torch.zeros(2, x.shape[1], dtype=D), torch.zeros(2, x.shape[1], dtype=D))
    _, _, res2 = rule.fwd_jvp(Call(GN, args, active, (*tans, None, None), 2))
    want_g, want_gd = rule.bwd_jvp(res2, g, gdot)
    for a, b in zip(got_g + got_gd, want_g + want_gd):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
