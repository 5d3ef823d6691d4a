"""``pad`` / ``constant_pad_nd``, ``roll``, ``chunk`` and ``type_as`` rules against autograd (float64,
K = 1 and 3, every engine mode), and a small model using all of them end to end against the
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
D = torch.float64
g0 = torch.Generator().manual_seed(5)


def r(*s, dtype=D):
    return torch.randn(*s, dtype=dtype, generator=g0)


X1 = (True, False, False, False)
CASES = {
    "constant_pad_nd": (aten.constant_pad_nd.default, (r(2, 3, 4), [1, 2, 0, 1], 0.5), X1[:3]),
    "constant_pad_nd-crop": (aten.constant_pad_nd.default, (r(2, 5, 6), [-1, 2, 1, -2], 0), X1[:3]),
    "pad-constant": (aten.pad.default, (r(2, 3, 5), [2, 1], "constant", 1.5), X1),
    "pad-constant-none": (aten.pad.default, (r(3, 4), [1, 1, 2, 0], "constant", None), X1),
    "pad-reflect1d": (aten.pad.default, (r(2, 3, 6), [2, 3], "reflect", None), X1),
    "pad-reflect1d-unbatched": (aten.pad.default, (r(3, 6), [1, 2], "reflect", None), X1),
    "pad-reflect2d": (aten.pad.default, (r(2, 3, 5, 6), [1, 2, 2, 1], "reflect", None), X1),
    "pad-reflect3d": (
        aten.pad.default,
        (r(1, 2, 4, 4, 5), [1, 1, 2, 1, 0, 2], "reflect", None),
        X1,
    ),
    "pad-replicate1d": (aten.pad.default, (r(2, 3, 5), [3, 1], "replicate", None), X1),
    "pad-replicate2d": (aten.pad.default, (r(3, 5, 6), [2, 2, 1, 3], "replicate", None), X1),
    "pad-replicate3d": (
        aten.pad.default,
        (r(1, 2, 3, 4, 5), [1, 2, 1, 1, 2, 0], "replicate", None),
        X1,
    ),
    "roll": (aten.roll.default, (r(3, 4, 5), [1], [-1]), X1[:3]),
    "roll-two-dims": (aten.roll.default, (r(3, 4, 5), [-2, 3], [0, 2]), X1[:3]),
    "roll-flat": (aten.roll.default, (r(3, 4), [5], []), X1[:3]),
    "chunk": (aten.chunk.default, (r(3, 7), 3, 1), X1[:3]),
    "chunk-neg-dim": (aten.chunk.default, (r(4, 2, 6), 2, -1), X1[:3]),
    "type_as": (aten.type_as.default, (r(3, 4), r(2, dtype=torch.float32)), (True, False)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", [c for c in CASES if c != "type_as"])
def test_structural_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


def test_type_as_casts_tangents_and_cotangents():
    op, (x, other), active = CASES["type_as"]
    rule = registered_rule(op)
    tx = r(2, *x.shape)
    y, ydot, res = rule.fwd_jvp(Call(op, (x, other), active, (tx, None), 2))
    assert y.dtype == ydot.dtype == torch.float32
    torch.testing.assert_close(ydot, tx.float())
    g, gd = r(*x.shape, dtype=torch.float32), r(2, *x.shape, dtype=torch.float32)
    (gx, go), (gdx, gdo) = rule.bwd_jvp(res, g, gd)
    assert gx.dtype == gdx.dtype == D and go is None and gdo is None
    torch.testing.assert_close(gdx, gd.double())


@pytest.mark.parametrize(
    "op,args",
    [
        (aten.pad.default, (r(2, 3, 5), [1, 1], "circular", None)),
        (aten.pad.default, (r(2, 3, 4, 5), [1, 1], "reflect", None)),
        (aten.pad.default, (torch.arange(6.0).reshape(2, 3).long(), [1, 1], "constant", 0.0)),
        (aten.roll.default, (r(3, 4), [1, 2], [])),
    ],
)
def test_structural_declines(op, args):
    call = Call(op, args, (True,) + (False,) * (len(args) - 1), (None,) * len(args), 0)
    assert registered_rule(op).declines(call) is not None


@pytest.fixture
def no_fallback(monkeypatch):
    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class PadRollNet(nn.Module):
    """Reflect-padded and replicate-padded convolutions, a constant pad, a roll (a shifted-window
    trick), a gated chunk (GLU-style) and a type_as."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4 * 6 + 4, 5)

    def forward(self, x):
        h = self.conv(F.pad(x, (1, 1), mode="reflect"))  # [N, 8, L]
        a, b = h.chunk(2, dim=1)
        h = torch.tanh(a) * torch.sigmoid(b)  # [N, 4, L]
        h = h + torch.roll(h, 2, -1)
        z = F.pad(h.unsqueeze(-1).expand(-1, -1, -1, 3), (1, 1, 1, 1), mode="replicate")
        z = torch.tanh(self.conv2(z)).mean((2, 3))  # [N, 4]
        p = F.pad(h, (1, 0), value=0.3)[..., :6].flatten(1)
        return self.head(torch.cat([p, z.type_as(p)], 1))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_pad_roll_chunk_net_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = PadRollNet().double()
    x = torch.randn(3, 3, 7, dtype=D)
    y = torch.randint(0, 5, (3,))
    check_model_end_to_end(model, (x,), y, compile)
