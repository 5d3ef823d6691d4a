"""The Triton layer/RMS norm rules (``hessfast/triton/layer_norm.py``) against the float64 oracle
and torch, on the family's case table (``tests/cases/layer_norm.py``, which the torch and CUDA
tests run too).

Rows of 37 (not a power of two: masked tail of the 64-wide block), of 1 and of 1031 / 2053,
several rows per tile, 3-D inputs, a normalized_shape over two dims, non-contiguous (transposed)
inputs, with and without weight/bias, with only the affine parameters active; every engine mode,
K = 1 and K = 7.
The backward's row-group split (partial sums over several programs and several tiles per
program) is forced at small sizes by shrinking the kernel's tile and program targets.
"""

import textwrap
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from cases.layer_norm import CASES, DECLINED, LOW_PRECISION, declined, kernel_params
from kernels.harness import check_impl, compile_for_gpu_in_subprocess
from torch import nn

import hessfast
from hessfast.dispatch import reasons
from hessfast.rules import implementations
from hessfast.rules.base import Call
from hessfast.triton import layer_norm as tln

pytestmark = pytest.mark.triton

aten = torch.ops.aten
LN, RMS = aten.layer_norm.default, aten.rms_norm.default
LN_IMPL, RMS_IMPL = tln.IMPLEMENTATIONS
D = torch.float64
T, F_ = True, False


def r(*s):
    return torch.randn(s, dtype=D)


def _impl(op):
    return LN_IMPL if op is LN else RMS_IMPL


@pytest.mark.parametrize("case,k", kernel_params())
def test_float32_matches_oracle(case, k, kernel_device):
    op, args, active = CASES[case].call()
    check_impl(_impl(op), op, args, active, dtype=torch.float32, device=kernel_device, k=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LOW_PRECISION)
def test_half_within_twice_torch(case, dtype, kernel_device):
    op, args, active = CASES[case].call()
    check_impl(_impl(op), op, args, active, dtype=dtype, device=kernel_device, k=3)


@pytest.mark.parametrize("case", ["ln-odd-row", "rms-3d-odd-row"])
def test_row_groups_and_tiles_split(case, kernel_device):
    """Rows of 37 one per tile (TILE = 64) and at most 8 programs: each program loops over several
    tiles, several programs write partial sums of ġ_γ, ġ_β, and the masked last group is short."""
    op, args, active = CASES[case].call()
    with mock.patch.object(tln, "TILE", 64), mock.patch.object(tln, "BWD_PROGRAMS", 8):
        check_impl(_impl(op), op, args, active, dtype=torch.float32, device=kernel_device, k=3)


def _call(op, args, active, k, dev):
    args = tuple(a.to(dev, torch.float32) if isinstance(a, torch.Tensor) else a for a in args)
    tans = tuple(
        torch.randn(k, *a.shape, device=dev) if act else None for a, act in zip(args, active)
    )
    return Call(op, args, active, tans, k)


def _hvp(impl, call, g, gdot):
    y, ydot, res = impl.fwd_jvp(call)
    return [ydot, *impl.bwd_jvp(res, g, gdot)[1]]


def _cotangents(call, k, dev):
    shape = call.args[0].shape
    return torch.randn(shape, device=dev), torch.randn(k, *shape, device=dev)


@pytest.mark.parametrize("case", ["ln-odd-row", "rms-3d-odd-row"])
def test_k_batched_equals_loop_over_k(case, kernel_device):
    """Tangent k's results do not depend on the other K − 1 (the same row groups: bitwise)."""
    op, args, active = CASES[case].call()
    call = _call(op, args, active, 4, kernel_device)
    g, gdot = _cotangents(call, 4, kernel_device)
    impl = _impl(op)
    batched = _hvp(impl, call, g, gdot)
    for kk in range(4):
        one_t = tuple(None if t is None else t[kk : kk + 1] for t in call.tangents)
        one = _hvp(impl, Call(op, call.args, active, one_t, 1), g, gdot[kk : kk + 1])
        for a, b in zip(batched, one):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a[kk], b[0])


def test_deterministic(kernel_device):
    """Two identical calls agree bitwise, partial sums over several row groups included."""
    op, args, active = CASES["ln-odd-row"].call()
    call = _call(op, args, active, 3, kernel_device)
    g, gdot = _cotangents(call, 3, kernel_device)
    with mock.patch.object(tln, "TILE", 64), mock.patch.object(tln, "BWD_PROGRAMS", 8):
        first, second = _hvp(LN_IMPL, call, g, gdot), _hvp(LN_IMPL, call, g, gdot)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", declined("triton"))
def test_declines_with_its_reason(name):
    d = DECLINED[name]
    why = _impl(d.op).not_supported_reasons(d.call())
    assert any(d.reasons["triton"] in w for w in why), why


def test_declines_long_rows_empty_inputs_and_float64():
    x = torch.randn(2, tln.MAX_D + 1)
    long_rows = Call(RMS, (x, [x.shape[1]], None, 1e-6), (T, F_, F_, F_), (None,) * 4, 0)
    assert any(
        "exceed the kernel's maximum" in w for w in RMS_IMPL.not_supported_reasons(long_rows)
    )
    empty = Call(RMS, (torch.randn(0, 8), [8], None, 1e-6), (T, F_, F_, F_), (None,) * 4, 0)
    assert any("empty input" in w for w in RMS_IMPL.not_supported_reasons(empty))
    f64 = Call(LN, (r(3, 8), [8], r(8), r(8), 1e-5, True), (T, F_, T, T, F_, F_), (None,) * 6, 0)
    assert any("float64" in w for w in reasons(LN_IMPL, f64, explicit=True))
    ok = Call(
        LN, (torch.randn(3, 8), [8], None, None, 1e-5, True), (T,) + (F_,) * 5, (None,) * 6, 0
    )
    assert LN_IMPL.not_supported_reasons(ok) == []


#: Compiles both kernels for sm_90 (H100/H200) with every feature switched on, in a process
#: without TRITON_INTERPRET: Triton's GPU front end type-checks what the interpreter lets pass.
_COMPILE_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hessfast.triton import layer_norm as tln

    SCALARS = {"N": "i32", "D": "i32", "ND": "i64", "K": "i32", "NG": "i32", "G": "i32",
               "ROWS_PER_GROUP": "i32", "eps": "fp32"}
    STATS = {"mean_ptr", "rstd_ptr", "a_ptr", "t_ptr", "pw_ptr", "pb_ptr"}
    for kernel in (tln._norm_fwd_kernel, tln._norm_bwd_kernel):
        names = kernel.arg_names
        flags = [n for n in names if n.isupper() and n not in SCALARS]
        sig = {n: "constexpr" if n in flags else SCALARS.get(n) or
               ("*fp32" if n in STATS else "*bf16") for n in names}
        consts = {(names.index(n),): True for n in flags}
        consts[(names.index("BLOCK_R"),)] = 2
        consts[(names.index("BLOCK_D"),)] = 2048
        out = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 16})
        assert out.asm["cubin"], kernel
    print("compiled")
    """
)


@pytest.mark.slow  # a fresh process compiling for sm_90: tens of seconds
def test_kernels_compile_for_hopper():
    compile_for_gpu_in_subprocess(_COMPILE_SM90)


def test_registered_for_the_norm_ops():
    assert LN_IMPL in implementations(LN) and RMS_IMPL in implementations(RMS)


class LlamaRMSNorm(nn.Module):
    """RMSNorm written out as Llama does (no upcast): fused into aten.rms_norm at capture."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))


def _compare_backends(model, x, y, impl, calls):
    """hvp and ggn_vp with backend='triton' equal backend='torch'; ``impl`` ran ``calls`` times
    (its backward, in the two products)."""
    v = {n: torch.randn(2, *p.shape, device=x.device) for n, p in model.named_parameters()}
    # the interpreter calls each rule once per product (a traced product also calls them while
    # tracing and checks its first replay against the interpreter: tests/triton/test_traced_ops.py)
    with mock.patch.object(impl, "bwd_jvp", wraps=impl.bwd_jvp) as spy:
        got = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", compile="interpret")
        ggn = hessfast.ggn_vp(
            model, F.cross_entropy, x, y, v, backend="triton", compile="interpret"
        )
    assert spy.call_count == calls
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    ggn_want = hessfast.ggn_vp(model, F.cross_entropy, x, y, v, backend="torch")
    for n in v:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ggn[n], ggn_want[n], rtol=1e-4, atol=1e-5)


def test_layer_norm_model_matches_torch_backend(kernel_device):
    dev = kernel_device
    model = nn.Sequential(nn.Linear(5, 11), nn.LayerNorm(11), nn.Tanh(), nn.Linear(11, 3)).to(dev)
    x, y = torch.randn(2, 4, 5, device=dev), torch.randint(0, 3, (2, 4), device=dev)
    _compare_backends(model, x, y, LN_IMPL, 2)


def test_rms_norm_model_matches_torch_backend(kernel_device):
    """nn.RMSNorm (aten.rms_norm, eps=None) and a Llama-style written-out RMSNorm, which capture
    fuses into aten.rms_norm: both run the Triton kernel."""
    dev = kernel_device
    model = nn.Sequential(
        nn.Linear(5, 11), LlamaRMSNorm(11), nn.Tanh(), nn.Linear(11, 7), nn.RMSNorm(7)
    ).to(dev)
    x, y = torch.randn(2, 4, 5, device=dev), torch.randint(0, 7, (2, 4), device=dev)
    _compare_backends(model, x, y, RMS_IMPL, 4)
