"""Softmax / log-softmax rules against autograd (float64, K = 1 and 3, every engine mode)."""

import pytest
import torch
from harness import check_rule

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
g0 = torch.Generator().manual_seed(4321)


def r(*s):
    return torch.randn(*s, dtype=D, generator=g0)


CASES = {}
for dim in (0, 1, -1):
    CASES[f"softmax-3d-dim{dim}"] = (aten.softmax.int, (r(3, 4, 5), dim, None))
    CASES[f"_softmax-3d-dim{dim}"] = (aten._softmax.default, (r(3, 4, 5), dim, False))
    CASES[f"log_softmax-3d-dim{dim}"] = (aten.log_softmax.int, (r(3, 4, 5), dim, None))
    CASES[f"_log_softmax-3d-dim{dim}"] = (aten._log_softmax.default, (r(3, 4, 5), dim, False))
CASES["softmax-3d-dim-2"] = (aten.softmax.int, (r(3, 4, 5), -2, None))
CASES["log_softmax-3d-dim-2"] = (aten.log_softmax.int, (r(3, 4, 5), -2, None))
CASES["softmax-1d"] = (aten.softmax.int, (r(6), 0, None))
CASES["softmax-same-dtype"] = (aten.softmax.int, (r(2, 5), -1, D))
CASES["log_softmax-1d"] = (aten.log_softmax.int, (r(6), -1, None))
CASES["log_softmax-same-dtype"] = (aten.log_softmax.int, (r(2, 5), 1, D))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_rule_matches_autograd(case, k):
    op, args = CASES[case]
    check_rule(op, args, (True, False, False), k=k)


@pytest.mark.parametrize("op", [aten.softmax.int, aten.log_softmax.int])
def test_dtype_upcast_matches_float64_rule(op):
    """``dtype=float64`` on a float32 input: same values as the float64 rule on the upcast input,
    cotangents returned in float32."""
    x32 = r(3, 4).float()
    tx32 = r(2, 3, 4).float()
    g, gd = r(3, 4), r(2, 3, 4)
    rule = registered_rule(op)

    def run(x, tx, dtype):
        call = Call(op, (x, -1, dtype), (True, False, False), (tx, None, None), 2)
        assert rule.declines(call) is None
        y, ydot, res = rule.fwd_jvp(call)
        (gx, *_), (gdx, *_) = rule.bwd_jvp(res, g, gd)
        return y, ydot, gx, gdx

    got = run(x32, tx32, D)
    want = run(x32.double(), tx32.double(), None)
    assert got[0].dtype == D and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2].float())
    torch.testing.assert_close(got[3], want[3].float())


@pytest.mark.parametrize(
    "op,args",
    [
        (aten.softmax.int, (torch.tensor(1.0, dtype=D), 0, None)),
        (aten.softmax.int, (r(3), 0, torch.int64)),
        (aten.log_softmax.int, (torch.arange(3), 0, None)),
    ],
)
def test_declines(op, args):
    call = Call(op, args, (True, False, False), (None, None, None), 0)
    assert registered_rule(op).declines(call) is not None
