"""Pooling rules against autograd (float64, K = 1 and 3, every engine mode), and conv nets built
with pooling layers end to end against the double-backward oracle, with no op falling back.

Max-pool inputs are random: ties within a window (where the argmax is a convention) have
probability zero.
"""

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
g0 = torch.Generator().manual_seed(4321)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


MP1, MP2, MP3 = aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default
MPI1 = aten.max_pool1d_with_indices.default
MPI2 = aten.max_pool2d_with_indices.default
MPI3 = aten.max_pool3d_with_indices.default
AMP2, AMP3 = aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default
AP1, AP2, AP3 = aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default
AAP1, AAP2, AAP3 = (
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
)
_AAP2, _AAP3 = aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default

# (op, args): the input is always the only active argument
CASES = {
    # max pools: kernel, stride, padding, dilation, ceil_mode
    "max1d": (MP1, (r(2, 3, 11), [3], [2], [1], [1], False)),
    "max1d-ceil-dil": (MP1, (r(2, 3, 12), [3], [2], [1], [2], True)),
    "max1d-unbatched": (MP1, (r(3, 10), [2], [], [0], [1], False)),
    "max2d": (MP2, (r(2, 3, 9, 9), [3, 3], [2, 2], [1, 1], [1, 1], False)),
    "max2d-default-stride": (MP2, (r(2, 3, 8, 6), [2, 2], [], [0, 0], [1, 1], False)),
    "max2d-ceil-odd": (MP2, (r(3, 2, 7, 9), [3, 2], [2, 3], [0, 1], [1, 1], True)),
    "max2d-dilation": (MP2, (r(2, 2, 11, 10), [3, 2], [1, 2], [1, 0], [2, 3], False)),
    "max2d-unbatched": (MP2, (r(3, 7, 7), [3, 3], [2, 2], [1, 1], [1, 1], True)),
    "max2d-overlap": (MP2, (r(2, 3, 6, 5), [3, 3], [1, 1], [1, 1], [1, 1], False)),
    "max3d": (MP3, (r(2, 2, 5, 6, 7), [2, 3, 2], [2, 2, 1], [1, 1, 0], [1, 1, 2], True)),
    "max3d-unbatched": (MP3, (r(2, 5, 5, 5), [2, 2, 2], [], [0, 0, 0], [1, 1, 1], False)),
    "max1d-indices": (MPI1, (r(2, 3, 9), [3], [2], [1], [1], False)),
    "max2d-indices": (MPI2, (r(2, 3, 9, 8), [3, 3], [2, 2], [1, 1], [1, 1], True)),
    "max3d-indices": (MPI3, (r(1, 2, 5, 5, 6), [2, 2, 3], [2, 2, 2], [0, 1, 1], [1, 1, 1], False)),
    "adaptive-max2d": (AMP2, (r(2, 3, 9, 7), [3, 2])),
    "adaptive-max2d-unbatched": (AMP2, (r(3, 5, 7), [2, 4])),
    "adaptive-max3d": (AMP3, (r(2, 2, 5, 6, 7), [2, 3, 3])),
    # average pools: kernel, stride, padding, ceil_mode, count_include_pad[, divisor_override]
    "avg1d": (AP1, (r(2, 3, 11), [3], [2], [1], False, True)),
    "avg1d-ceil-nopad-count": (AP1, (r(2, 3, 10), [3], [2], [1], True, False)),
    "avg1d-unbatched": (AP1, (r(3, 9), [2], [], [0], False, True)),
    "avg2d": (AP2, (r(2, 3, 9, 9), [3, 3], [2, 2], [1, 1], False, True, None)),
    "avg2d-ceil-odd": (AP2, (r(3, 2, 7, 9), [3, 2], [2, 3], [1, 1], True, False, None)),
    "avg2d-divisor": (AP2, (r(2, 3, 8, 7), [2, 3], [2, 2], [0, 1], False, True, 5)),
    "avg2d-unbatched": (AP2, (r(3, 8, 8), [2, 2], [], [0, 0], False, True, None)),
    "avg3d": (AP3, (r(2, 2, 5, 6, 7), [2, 3, 2], [2, 2, 1], [1, 1, 0], True, False, None)),
    "avg3d-divisor": (AP3, (r(1, 2, 4, 4, 4), [2, 2, 2], [], [0, 0, 0], False, True, 3)),
    # adaptive average pools: output size
    "adaptive-avg1d": (AAP1, (r(2, 3, 11), [4])),
    "adaptive-avg1d-global": (AAP1, (r(2, 3, 11), [1])),
    "adaptive-avg2d": (AAP2, (r(2, 3, 9, 7), [3, 4])),
    "adaptive-avg2d-global": (AAP2, (r(2, 3, 9, 7), [1, 1])),
    "adaptive-avg2d-unbatched": (AAP2, (r(3, 5, 7), [2, 3])),
    "adaptive-avg2d-upsample": (AAP2, (r(2, 2, 3, 4), [5, 6])),
    "_adaptive-avg2d": (_AAP2, (r(2, 3, 8, 8), [3, 3])),
    "_adaptive-avg2d-global": (_AAP2, (r(2, 3, 8, 8), [1, 1])),
    "adaptive-avg3d": (AAP3, (r(2, 2, 5, 6, 7), [2, 3, 4])),
    "adaptive-avg3d-global": (AAP3, (r(2, 2, 5, 6, 7), [1, 1, 1])),
    "_adaptive-avg3d": (_AAP3, (r(1, 2, 5, 6, 7), [2, 2, 3])),
}


def _active(args):
    return (True,) + (False,) * (len(args) - 1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_pool_rule_matches_autograd(case, k):
    op, args = CASES[case]
    check_rule(op, args, _active(args), k=k)


@pytest.mark.parametrize("case", ["max2d", "avg2d", "adaptive-avg2d-global", "max2d-indices"])
def test_pool_has_no_second_order_term(case):
    op, args = CASES[case]
    rule = registered_rule(op)
    x = args[0]
    call = Call(op, args, _active(args), (r(2, *x.shape),) + (None,) * (len(args) - 1), 2)
    y, _, res = rule.fwd_jvp(call)
    y = y[0] if isinstance(y, tuple) else y
    g = r(*y.shape)
    _, gdx = rule.bwd_jvp(res, (g, None) if op is MPI2 else g, None)
    assert gdx[0] is None


@pytest.mark.parametrize(
    "op,args,active",
    [
        (
            MP2,
            (torch.arange(16.0).reshape(1, 1, 4, 4).long(), [2, 2], [], [0, 0], [1, 1], False),
            (True, False, False, False, False, False),
        ),
        (MP2, (r(4, 4), [2, 2], [], [0, 0], [1, 1], False), (True,) + (False,) * 5),
        (AAP2, (r(1, 2, 4, 4), [2.5, 2]), (True, False)),
    ],
)
def test_pool_declines(op, args, active):
    call = Call(op, args, active, (None,) * len(args), 0)
    assert registered_rule(op).declines(call) is not None


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def no_fallback(monkeypatch):
    """Any op reaching the ``torch.func`` fallback fails the test."""

    def boom(op):
        raise AssertionError(f"{op} fell back to torch.func")

    monkeypatch.setattr(hessfast.rules, "fallback_for", boom)


class PoolNet(nn.Module):
    """A small conv net with every common pooling layer: ResNet's stem max pool, an average
    pool, a 1-D branch, and a global adaptive average pool before the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv = nn.Conv2d(6, 8, 3)
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.amax = nn.AdaptiveMaxPool2d((2, 3))
        self.aavg = nn.AdaptiveAvgPool2d((2, 2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv1d(8, 4, 3)
        self.pool1 = nn.MaxPool1d(2, ceil_mode=True)
        self.avg1 = nn.AdaptiveAvgPool1d(3)
        self.head = nn.Linear(8 + 8 * 6 + 8 * 4 + 4 * 3, 5)

    def forward(self, x):
        h = self.pool(torch.tanh(self.stem(x)))
        h = self.avg(torch.tanh(self.conv(h)))
        s = torch.tanh(self.conv1(h.flatten(2)))
        feats = [
            self.gap(h).flatten(1),
            self.amax(h).flatten(1),
            self.aavg(h).flatten(1),
            self.avg1(self.pool1(s)).flatten(1),
        ]
        return self.head(torch.cat(feats, 1))


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_pool_net_end_to_end(compile, no_fallback):
    torch.manual_seed(0)
    model = PoolNet().double()
    x = torch.randn(4, 3, 13, 11, dtype=D)
    y = torch.randint(0, 5, (4,))
    check_model_end_to_end(model, (x,), y, compile)
