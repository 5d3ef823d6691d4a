import pytest
import torch
from harness import check_rule

aten = torch.ops.aten
D = torch.float64


def r(*s):
    return torch.randn(s, dtype=D)


CASES = {
    "linear-2d": (aten.linear.default, (r(5, 3), r(4, 3), r(4)), (True, True, True)),
    "linear-3d-nobias": (aten.linear.default, (r(2, 5, 3), r(4, 3), None), (True, True, False)),
    "linear-weight-only": (aten.linear.default, (r(6, 3), r(1, 3), r(1)), (False, True, True)),
    "linear-input-only": (aten.linear.default, (r(6, 3), r(2, 3), r(2)), (True, False, False)),
    "addmm": (aten.addmm.default, (r(4), r(5, 3), r(3, 4), 1, 1), (True, True, True, False, False)),
    "addmm-scaled": (
        aten.addmm.default,
        (r(5, 4), r(5, 3), r(3, 4), 0.5, 2.0),
        (True, True, True, False, False),
    ),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_linear_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    # linear's weight and bias as parameters whose gradient is not returned: ḡ_W, ḡ_b skipped
    skip = op is aten.linear.default and active[1]
    check_rule(op, args, active, k=k, unread=[i for i in (1, 2) if active[i]] if skip else None)
