import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64
BN = aten.batch_norm.default


def r(*s):
    return torch.randn(s, dtype=D)


def var(c):
    return torch.rand(c, dtype=D) + 0.5


def bn(shape, training, affine=True, active=None, eps=1e-5):
    """batch_norm on ``x`` of ``shape``; training passes no running statistics (as the engine)."""
    c = shape[1]
    w, b = (r(c), r(c)) if affine else (None, None)
    rm, rv = (None, None) if training else (r(c), var(c))
    if active is None:
        active = (True, affine, affine)
    return (
        BN,
        (r(*shape), w, b, rm, rv, training, 0.1, eps, False),
        (*active, False, False, False, False, False, False),
    )


CASES = {
    "eval-1d": bn((4, 3), False),
    "eval-1d-seq": bn((4, 3, 5), False),
    "eval-2d": bn((2, 3, 4, 4), False),
    "eval-2d-no-affine": bn((2, 3, 4, 4), False, affine=False),
    "eval-1d-input-only": bn((4, 3, 5), False, active=(True, False, False)),
    "eval-2d-weight-only": bn((2, 3, 4, 4), False, active=(False, True, False)),
    "train-1d": bn((6, 3), True),
    "train-1d-seq": bn((4, 3, 5), True),
    "train-2d": bn((2, 3, 4, 4), True, eps=1e-3),
    "train-2d-no-affine": bn((2, 3, 4, 4), True, affine=False),
    "train-2d-batch1": bn((1, 3, 3, 4), True),
    "train-1d-seq-batch1": bn((1, 2, 5), True, affine=False),
    "train-2d-input-only": bn((2, 3, 3, 3), True, active=(True, False, False)),
    "train-2d-weight-only": bn((2, 3, 3, 3), True, active=(False, True, False)),
    "train-2d-params-only": bn((2, 3, 3, 3), True, active=(False, True, True)),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_norm_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    check_rule(op, args, active, k=k)


def test_training_never_touches_running_stats():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    x, w, b = r(4, 3, 5), r(3), r(3)
    rm, rv = r(3), var(3)
    rm0, rv0 = rm.clone(), rv.clone()
    args = (x, w, b, rm, rv, True, 0.1, 1e-5, False)
    call = Call(
        BN, args, (True, True, True) + (False,) * 6, (r(2, 4, 3, 5), None, None) + (None,) * 6, 2
    )
    rule = registered_rule(BN)
    y, _, res = rule.fwd_jvp(call)
    rule.bwd_jvp(res, torch.randn_like(y), None)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    ref = BN(x, w, b, None, None, True, 0.1, 1e-5, False)
    torch.testing.assert_close(y, ref)


def test_declines_eval_without_running_stats_and_active_stats():
    from hessfast.rules import registered_rule
    from hessfast.rules.base import Call

    x = r(4, 3)
    rule = registered_rule(BN)
    no_stats = Call(
        BN,
        (x, None, None, None, None, False, 0.1, 1e-5, False),
        (True,) + (False,) * 8,
        (None,) * 9,
        0,
    )
    assert rule.declines(no_stats) is not None
    act = (True, False, False, True, False, False, False, False, False)
    active_stats = Call(
        BN, (x, None, None, r(3), var(3), False, 0.1, 1e-5, False), act, (None,) * 9, 0
    )
    assert rule.declines(active_stats) is not None
