"""The Triton linear rule (``hessfast/triton/linear.py``) against the float64 oracle and torch.

Shapes are small and deliberately off the tiles (rows 37, Din 19, Dout 23 against the
interpreter's 32×16×16 tiles: several tiles, masked tails in every dimension), plus N = 1, a 1-D
input, 3-D inputs and non-contiguous (transposed) operands, in every engine mode, K = 1 and K = 3 (the K
tangents are the launch's batch axis: three show what seven did, at three sevenths of the
interpreter's time).
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from kernels.harness import check_impl
from torch import nn

import hessfast
from hessfast.dispatch import reasons
from hessfast.rules import implementations
from hessfast.rules.base import Call
from hessfast.rules.linear import linear_bwd_jvp_ref, linear_fwd_jvp_ref
from hessfast.triton.linear import (
    _GPU_CONFIGS,
    IMPLEMENTATIONS,
    _prune_configs,
    dual_gemm,
    linear_bwd_jvp,
    linear_fwd_jvp,
)

pytestmark = pytest.mark.triton

aten = torch.ops.aten
LINEAR = aten.linear.default
IMPL = IMPLEMENTATIONS[0]
D = torch.float64
T, F_ = True, False


def r(*s):
    return torch.randn(s, dtype=D)


#: name -> (build args, active); built lazily so that each test gets the autouse seed.
CASES = {
    "bias": (lambda: (r(37, 19), r(23, 19), r(23)), (T, T, T)),
    "no-bias": (lambda: (r(37, 19), r(23, 19), None), (T, T, F_)),
    "weight-only": (lambda: (r(37, 19), r(23, 19), r(23)), (F_, T, T)),
    "input-only": (lambda: (r(37, 19), r(23, 19), r(23)), (T, F_, F_)),
    "bias-only": (lambda: (r(37, 19), r(23, 19), r(23)), (F_, F_, T)),
    "3d": (lambda: (r(2, 9, 19), r(23, 19), r(23)), (T, T, T)),
    "n1": (lambda: (r(1, 19), r(23, 19), r(23)), (T, T, T)),
    "vector-x": (lambda: (r(19), r(23, 19), None), (T, T, F_)),
    "transposed": (lambda: (r(19, 37).t(), r(19, 23).t(), r(23)), (T, T, T)),
    "transposed-3d": (lambda: (r(2, 19, 9).transpose(1, 2), r(23, 19), None), (T, T, F_)),
}


#: K = 3 on the cases that exercise distinct kernel paths (K = 1 on all): keeps the interpreter fast.
K3 = ["bias", "weight-only", "input-only", "transposed"]


@pytest.mark.parametrize(
    ("case", "k"), [(c, 1) for c in CASES] + [(c, 3) for c in K3], ids=lambda v: str(v)
)
def test_float32_matches_oracle(case, k, kernel_device):
    build, active = CASES[case]
    check_impl(IMPL, LINEAR, build(), active, dtype=torch.float32, device=kernel_device, k=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["bias", "weight-only", "input-only", "3d", "transposed"])
def test_half_within_twice_torch(case, dtype, kernel_device):
    build, active = CASES[case]
    check_impl(IMPL, LINEAR, build(), active, dtype=dtype, device=kernel_device, k=2)


def _call(x, w, b, k, active=(T, T, T)):
    tans = tuple(
        torch.randn(k, *a.shape, dtype=a.dtype, device=a.device) if act else None
        for a, act in zip((x, w, b), active)
    )
    return Call(LINEAR, (x, w, b), active, tans, k)


def _hvp(call, g, gdot):
    y, ydot, res = IMPL.fwd_jvp(call)
    return ydot, IMPL.bwd_jvp(res, g, gdot)[1]


def test_k_batched_equals_loop_over_k(kernel_device):
    """Each tangent's results do not depend on the other K − 1 (bitwise: same tiles, same order)."""
    dev = kernel_device
    x, w, b = (torch.randn(s, device=dev) for s in ((37, 19), (23, 19), (23,)))
    call = _call(x, w, b, 3)
    g, gdot = torch.randn(37, 23, device=dev), torch.randn(3, 37, 23, device=dev)
    ydot, gd = _hvp(call, g, gdot)
    for kk in range(3):
        one = Call(LINEAR, call.args, call.active, tuple(t[kk : kk + 1] for t in call.tangents), 1)
        ydot1, gd1 = _hvp(one, g, gdot[kk : kk + 1])
        assert torch.equal(ydot1[0], ydot[kk])
        for a, b1 in zip(gd, gd1):
            assert torch.equal(b1[0], a[kk])


def test_deterministic(kernel_device):
    dev = kernel_device
    x, w, b = (torch.randn(s, device=dev) for s in ((2, 9, 19), (23, 19), (23,)))
    call = _call(x, w, b, 3)
    g, gdot = torch.randn(2, 9, 23, device=dev), torch.randn(3, 2, 9, 23, device=dev)
    first, second = _hvp(call, g, gdot), _hvp(call, g, gdot)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, c) for a, c in zip(first[1], second[1]))


def test_empty_rows_give_empty_outputs_and_zero_weight_tangents(kernel_device):
    """N = 0: nothing to launch for ẏ and ġ_x, and ġ_W is an empty reduction (zeros)."""
    dev = kernel_device
    x, w, b = torch.randn(0, 19, device=dev), torch.randn(23, 19, device=dev), None
    tx, tw = torch.randn(2, 0, 19, device=dev), torch.randn(2, 23, 19, device=dev)
    g, gdot = torch.randn(0, 23, device=dev), torch.randn(2, 0, 23, device=dev)
    y, ydot = linear_fwd_jvp(x, w, b, tx, tw, None)
    assert ydot.shape == (2, 0, 23)
    got = linear_bwd_jvp(x, w, tx, tw, g, gdot, True, True, False)
    want = linear_bwd_jvp_ref(x, w, tx, tw, g, gdot, True, True, False)
    assert got[1][0].shape == want[1][0].shape == (2, 0, 19)
    assert torch.equal(got[1][1], want[1][1]) and got[1][1].shape == (2, 23, 19)
    assert linear_fwd_jvp_ref(x, w, b, tx, tw, None)[1].shape == ydot.shape


def test_dual_gemm_rejects_mixed_dtypes(kernel_device):
    a = torch.randn(1, 16, 16, device=kernel_device)
    with pytest.raises(TypeError, match="operands"):
        dual_gemm(torch.empty(1, 16, 16, device=kernel_device), (a, a[0].half()), None)


def test_gpu_autotuning_is_pruned_to_the_problem_size():
    """Small GEMMs (the tests' shapes, a tiny layer) compile one tile; large ones tune all."""
    small = _prune_configs(_GPU_CONFIGS, {"M": 37, "N": 23})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in small] == [(64, 32)]
    tiny = _prune_configs(_GPU_CONFIGS, {"M": 1, "N": 5})
    assert len(tiny) == 1
    assert _prune_configs(_GPU_CONFIGS, {"M": 8192, "N": 4096}) == _GPU_CONFIGS
    mid = _prune_configs(_GPU_CONFIGS, {"M": 100, "N": 40})
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in mid} == {
        (128, 64),
        (64, 32),
        (32, 64),
    }


def test_declines_with_reasons():
    x, w, b = r(5, 3), r(4, 3), r(4)
    assert any("float64" in why for why in reasons(IMPL, _call(x, w, b, 2), explicit=True))
    mixed = _call(x.float(), w.half(), b.float(), 2)
    assert any("mixed dtypes" in why for why in IMPL.not_supported_reasons(mixed))
    wide = _call(x.float(), w.float(), torch.randn(1), 2)
    assert any("bias of shape [1]" in why for why in IMPL.not_supported_reasons(wide))
    assert IMPL.not_supported_reasons(_call(x.float(), w.float(), b.float(), 2)) == []


def test_registered_for_aten_linear():
    assert IMPL in implementations(LINEAR)


def test_mlp_hvp_and_ggn_match_torch_backend(kernel_device):
    """End to end: the products of a small MLP with backend='triton' equal backend='torch', and
    the Triton linear rule is the one that ran (both layers, backward of hvp and GGN). Softplus
    keeps the other ops on their torch rules, so this checks the linear kernels alone."""
    dev = kernel_device
    model = nn.Sequential(nn.Linear(7, 13), nn.Softplus(), nn.Linear(13, 5)).to(dev)
    x, y = torch.randn(11, 7, device=dev), torch.randn(11, 5, device=dev)
    v = {n: torch.randn(2, *p.shape, device=dev) for n, p in model.named_parameters()}
    # the interpreter calls each rule once per product (a traced product also calls them while
    # tracing and checks its first replay against the interpreter: tests/triton/test_traced_ops.py)
    with mock.patch.object(IMPL, "bwd_jvp", wraps=IMPL.bwd_jvp) as spy:
        got = hessfast.hvp(model, F.mse_loss, x, y, v, backend="triton", compile="interpret")
        ggn = hessfast.ggn_vp(model, F.mse_loss, x, y, v, backend="triton", compile="interpret")
    assert spy.call_count == 4
    want = hessfast.hvp(model, F.mse_loss, x, y, v, backend="torch")
    ggn_want = hessfast.ggn_vp(model, F.mse_loss, x, y, v, backend="torch")
    for n in v:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ggn[n], ggn_want[n], rtol=1e-4, atol=1e-5)
