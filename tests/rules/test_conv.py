import pytest
import torch
from harness import check_rule

from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
C1 = aten.conv1d.default
C2 = aten.conv2d.default
C3 = aten.conv3d.default
CV = aten.convolution.default


def r(*s):
    return torch.randn(s, dtype=D)


def conv2d(x, w, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return (x, w, b, list(stride), list(padding), list(dilation), groups)


ALL3 = (True, True, True, False, False, False, False)
XW = (True, True, False, False, False, False, False)

CASES = {
    "conv1d": (C1, (r(2, 3, 9), r(4, 3, 3), r(4), [1], [0], [1], 1), ALL3),
    "conv1d-stride-pad-dil": (C1, (r(2, 3, 11), r(4, 3, 3), r(4), [2], [2], [2], 1), ALL3),
    "conv1d-groups": (C1, (r(2, 4, 8), r(6, 2, 3), r(6), [1], [1], [1], 2), ALL3),
    "conv2d": (C2, conv2d(r(2, 3, 6, 5), r(4, 3, 3, 3), r(4)), ALL3),
    "conv2d-stride2-pad": (C2, conv2d(r(2, 3, 7, 6), r(4, 3, 3, 3), r(4), (2, 2), (1, 1)), ALL3),
    "conv2d-dilation": (C2, conv2d(r(2, 2, 8, 7), r(3, 2, 3, 2), r(3), dilation=(2, 1)), ALL3),
    "conv2d-groups2": (
        C2,
        conv2d(r(2, 4, 5, 5), r(6, 2, 3, 3), r(6), padding=(1, 1), groups=2),
        ALL3,
    ),
    "conv2d-groups2-stride": (
        C2,
        conv2d(r(3, 6, 7, 7), r(4, 3, 2, 3), r(4), (2, 1), (1, 0), (1, 2), groups=2),
        ALL3,
    ),
    "conv2d-depthwise": (
        C2,
        conv2d(r(2, 3, 5, 5), r(3, 1, 3, 3), r(3), padding=(1, 1), groups=3),
        ALL3,
    ),
    "conv2d-nobias": (C2, conv2d(r(2, 3, 6, 6), r(4, 3, 3, 3), None, (2, 2), (1, 1)), XW),
    "conv2d-weight-only": (
        C2,
        conv2d(r(2, 3, 6, 6), r(4, 3, 3, 3), r(4), padding=(1, 1)),
        (False, True, True, False, False, False, False),
    ),
    "conv2d-input-only": (
        C2,
        conv2d(r(2, 3, 6, 6), r(4, 3, 3, 3), r(4), (2, 2)),
        (True, False, False, False, False, False, False),
    ),
    "conv2d-odd-sizes": (C2, conv2d(r(3, 5, 7, 9), r(3, 5, 1, 4), r(3), (3, 2), (0, 2)), ALL3),
    "conv2d-batch1": (C2, conv2d(r(1, 3, 5, 6), r(2, 3, 2, 2), r(2)), ALL3),
    "conv2d-unbatched": (C2, conv2d(r(3, 5, 6), r(2, 3, 2, 2), r(2), padding=(1, 0)), ALL3),
    "conv2d-1x1": (C2, conv2d(r(2, 4, 3, 3), r(5, 4, 1, 1), None), XW),
    "conv3d": (
        C3,
        (r(1, 2, 4, 5, 4), r(3, 2, 2, 3, 2), r(3), [1, 2, 1], [1, 0, 1], [1, 1, 1], 1),
        ALL3,
    ),
    "convolution-2d": (
        CV,
        (r(2, 4, 6, 6), r(6, 2, 3, 3), r(6), [2, 1], [1, 1], [1, 1], False, [0, 0], 2),
        (True, True, True, False, False, False, False, False, False),
    ),
    "convolution-1d-nobias": (
        CV,
        (r(2, 3, 7), r(2, 3, 2), None, [1], [0], [2], False, [0], 1),
        (True, True, False, False, False, False, False, False, False),
    ),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_rule_matches_autograd(case, k):
    op, args, active = CASES[case]
    # the weight and bias as parameters whose gradient is not returned: ḡ_W, ḡ_b skipped
    unread = [i for i in (1, 2) if active[i]] if active[1] else None
    check_rule(op, args, active, k=k, unread=unread)


def _call(op, args, active):
    return Call(op, tuple(args), tuple(active), (None,) * len(args), 0)


DECLINED = {
    "transposed": (
        CV,
        (r(2, 3, 5, 5), r(3, 4, 3, 3), r(4), [1, 1], [0, 0], [1, 1], True, [0, 0], 1),
        (True, True, True, False, False, False, False, False, False),
    ),
    "integer-input": (
        C2,
        conv2d(
            torch.ones(1, 1, 3, 3, dtype=torch.int64),
            torch.ones(1, 1, 2, 2, dtype=torch.int64),
            None,
        ),
        (False, False, False, False, False, False, False),
    ),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_conv_rule_declines_unsupported(case):
    op, args, active = DECLINED[case]
    reason = registered_rule(op).declines(_call(op, args, active))
    assert isinstance(reason, str) and reason


def test_string_padding_overload_not_registered():
    assert registered_rule(aten.conv2d.padding) is None
