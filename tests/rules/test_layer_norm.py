"""LayerNorm / RMSNorm rules against autograd (float64, K = 1 and 3, every engine mode), on the
family's case table (``tests/cases/layer_norm.py``, which the Triton and CUDA tests run too)."""

import pytest
from cases.layer_norm import CASES
from harness import check_rule


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_norm_rule_matches_autograd(case, k):
    op, args, active = CASES[case].call()
    check_rule(op, args, active, k=k)
