import pytest
import torch
from harness import check_rule
from oracle import math_attention

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
D = torch.float64
GEN = torch.Generator().manual_seed(1234)


def r(*s):
    return torch.randn(*s, dtype=D, generator=GEN)


def bool_mask(*s):
    """Random boolean mask (True = attend) with the diagonal kept, so no row is fully masked."""
    m = torch.rand(*s, generator=GEN) > 0.5
    return m | torch.eye(s[-2], s[-1], dtype=torch.bool)


def case(q, k, v, mask=None, causal=False, scale=None, gqa=False, active=(True, True, True)):
    return (q, k, v, mask, 0.0, causal, scale, gqa), (*active, False, False, False, False, False)


_shared = r(2, 2, 4, 3)
_dead_row = bool_mask(4, 5)
_dead_row[2] = False

CASES = {
    "plain": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 6)),
    "causal": case(r(2, 2, 5, 3), r(2, 2, 5, 3), r(2, 2, 5, 4), causal=True),
    "causal-tq<tk": case(r(1, 2, 3, 3), r(1, 2, 6, 3), r(1, 2, 6, 2), causal=True),
    "causal-tq>tk": case(r(1, 2, 6, 3), r(1, 2, 3, 3), r(1, 2, 3, 2), causal=True),
    "bool-mask-2d": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), mask=bool_mask(4, 5)),
    "bool-mask-4d": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), mask=bool_mask(2, 1, 4, 5)),
    "bool-mask-dead-row": case(r(1, 2, 4, 3), r(1, 2, 5, 3), r(1, 2, 5, 3), mask=_dead_row),
    "float-mask": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), mask=r(2, 1, 4, 5)),
    "float-mask-inf": case(
        r(2, 2, 4, 3),
        r(2, 2, 5, 3),
        r(2, 2, 5, 3),
        mask=torch.zeros(4, 5, dtype=D).masked_fill(~bool_mask(4, 5), float("-inf")),
    ),
    "scale": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), scale=0.7),
    "scale-causal": case(r(1, 3, 4, 2), r(1, 3, 4, 2), r(1, 3, 4, 2), causal=True, scale=1.9),
    "gqa": case(r(2, 4, 3, 3), r(2, 2, 5, 3), r(2, 2, 5, 4), gqa=True),
    "gqa-causal-mqa": case(r(1, 4, 4, 3), r(1, 1, 4, 3), r(1, 1, 4, 2), causal=True, gqa=True),
    "gqa-mask": case(r(2, 4, 3, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), mask=bool_mask(3, 5), gqa=True),
    "t1": case(r(2, 2, 1, 3), r(2, 2, 1, 3), r(2, 2, 1, 3)),
    "t1-causal": case(r(2, 2, 1, 3), r(2, 2, 1, 3), r(2, 2, 1, 3), causal=True),
    "tq1": case(r(2, 2, 1, 3), r(2, 2, 4, 3), r(2, 2, 4, 3)),
    "only-q": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), active=(True, False, False)),
    "only-k": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), active=(False, True, False)),
    "only-v": case(r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3), active=(False, False, True)),
    "qk-not-v-gqa": case(
        r(1, 4, 3, 3), r(1, 2, 5, 3), r(1, 2, 5, 3), gqa=True, active=(True, True, False)
    ),
    "v-only-gqa": case(
        r(1, 4, 3, 3), r(1, 2, 5, 3), r(1, 2, 5, 3), gqa=True, active=(False, False, True)
    ),
    "same-tensor": case(_shared, _shared, _shared, causal=True),
    "3d-no-batch": case(r(2, 4, 3), r(2, 5, 3), r(2, 5, 2)),
    "3d-causal": case(r(2, 4, 3), r(2, 4, 3), r(2, 4, 3), causal=True),
    "2d": case(r(4, 3), r(5, 3), r(5, 2)),
    "5d": case(r(2, 1, 2, 3, 3), r(2, 1, 2, 4, 3), r(2, 1, 2, 4, 3)),
    "broadcast-batch": case(r(1, 2, 3, 3), r(2, 1, 4, 3), r(2, 2, 4, 3)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_attention_rule_matches_autograd(name, k):
    args, active = CASES[name]
    with math_attention():
        check_rule(SDPA, args, active, k=k)


def _call(args, active, k=1):
    tangents = tuple(
        torch.zeros(k, *a.shape, dtype=D) if act else None for a, act in zip(args, active)
    )
    return Call(SDPA, args, active, tangents, k)


def test_dropout_is_declined():
    args, active = CASES["plain"]
    args = (*args[:4], 0.1, *args[5:])
    assert registered_rule(SDPA).declines(_call(args, active)) is not None


def test_active_mask_is_declined():
    args, active = CASES["float-mask"]
    active = (*active[:3], True, *active[4:])
    assert registered_rule(SDPA).declines(_call(args, active)) is not None


def test_common_cases_are_accepted():
    rule = registered_rule(SDPA)
    for name, (args, active) in CASES.items():
        assert rule.declines(_call(args, active)) is None, name


def test_k_tangents_batched_match_one_at_a_time():
    """K vectors in one call give the same forward tangent as K separate calls."""
    args, active = CASES["gqa-mask"]
    rule = registered_rule(SDPA)
    tans = [r(3, *a.shape) if act else None for a, act in zip(args, active)]
    _, ydot, _ = rule.fwd_jvp(Call(SDPA, args, active, tuple(tans), 3))
    for i in range(3):
        one = tuple(t[i : i + 1] if t is not None else None for t in tans)
        _, yi, _ = rule.fwd_jvp(Call(SDPA, args, active, one, 1))
        torch.testing.assert_close(ydot[i : i + 1], yi)
