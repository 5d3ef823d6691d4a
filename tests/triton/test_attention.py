"""The flash-style Triton attention rule against the float64 oracle, in every engine mode.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), on
small shapes whose lengths are not multiples of the interpreter's 16/32-wide tiles (tails, several
tiles per row, and ``BLOCK_M ≠ BLOCK_N`` in the backward); with a GPU the same cases run compiled,
plus realistic sizes (``cuda_device`` tests). The oracle is ``tests/kernels/harness.py``'s float64
autograd through SDPA's math backend.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernels.harness import check_impl, compile_for_gpu_in_subprocess
from models.zoo import gpt
from oracle import math_attention

import hessfast
from hessfast.dispatch import reasons
from hessfast.rules import rule_for
from hessfast.rules.base import Call
from hessfast.triton.attention import IMPLEMENTATIONS

pytestmark = pytest.mark.triton

SDPA = torch.ops.aten.scaled_dot_product_attention.default
IMPL = IMPLEMENTATIONS[0]
D64 = torch.float64
QKV = (True, True, True)
ALL_MODES = ("hvp", "hvp-second-order-only", "ggn", "grad")


def _randn(gen, *shape):
    return torch.randn(*shape, dtype=D64, generator=gen)


def sdpa_case(
    b=1,
    h=2,
    hkv=None,
    tq=19,
    tk=None,
    d=16,
    dv=None,
    causal=False,
    mask=None,
    scale=None,
    active=QKV,
    seed=0,
):
    """``(args, active)`` for SDPA on ``[B, H, T, D]`` float64 inputs; ``mask`` is ``"bool"`` or
    ``"float"`` (Hugging Face's ``[B, 1, Tq, Tk]``: causal plus left-padded keys, and one query row
    fully masked: ``P = 0`` there for the boolean mask; the float mask uses ``finfo(float32).min``
    plus a random additive part, which torch turns into uniform weights on that row) or ``None``."""
    gen = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    tk = tk or tq
    dv = dv or d
    q = _randn(gen, b, h, tq, d)
    k = _randn(gen, b, hkv, tk, d)
    v = _randn(gen, b, hkv, tk, dv)
    m = None
    if mask is not None:
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).expand(b, 1, tq, tk).clone()
        keep[-1, ..., : tk // 3] = False
        keep[0, 0, 0] = False
        if mask == "bool":
            m = keep
        else:
            m = torch.zeros(b, 1, tq, tk, dtype=D64).masked_fill(
                ~keep, torch.finfo(torch.float32).min
            )
            m = m + 0.5 * _randn(gen, b, 1, tq, tk)
    args = (q, k, v, m, 0.0, causal, scale, hkv != h)
    return args, (*active, False, False, False, False, False)


def check(case, dtype=torch.float32, device="cpu", k=3, modes=ALL_MODES):
    args, active = case
    with math_attention():
        return check_impl(IMPL, SDPA, args, active, dtype=dtype, device=device, k=k, modes=modes)


#: K tangents are the launches' second grid axis, a program each: ``causal K=3`` shows several,
#: the other cases take one or two (each tangent costs its share of the interpreter's time).
CASES = {
    "causal K=3": (sdpa_case(causal=True), 3, ("hvp", "ggn")),
    "causal T=1": (sdpa_case(tq=1, causal=True), 1, ALL_MODES),
    "non-causal Tq<Tk, Dv≠D": (sdpa_case(tq=5, tk=37, dv=32), 1, ("hvp", "ggn")),
    "causal Tq>Tk": (sdpa_case(tq=21, tk=7, causal=True), 1, ("hvp",)),
    "bool mask [B,1,Tq,Tk], dead row": (
        sdpa_case(b=2, tq=12, tk=19, mask="bool"),
        2,
        ("hvp", "ggn"),
    ),
    "float mask [B,1,Tq,Tk]": (sdpa_case(b=2, tq=7, tk=19, mask="float"), 1, ALL_MODES),
    "GQA causal H=4 Hkv=2": (sdpa_case(h=4, hkv=2, causal=True), 2, ("hvp", "grad")),
    "GQA MQA Hkv=1, scale": (sdpa_case(h=3, hkv=1, tq=5, scale=0.3), 1, ("hvp",)),
    "head dim 24 (padded)": (sdpa_case(tq=5, d=24, dv=8, causal=True), 1, ("hvp",)),
    "only q active": (sdpa_case(tq=5, active=(True, False, False)), 1, ALL_MODES),
    "only v active": (sdpa_case(tq=5, active=(False, False, True)), 1, ALL_MODES),
    "q, k active, GQA": (sdpa_case(h=4, hkv=2, tq=5, active=(True, True, False)), 1, ("hvp",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_oracle(name, kernel_device):
    case, k, modes = CASES[name]
    check(case, device=kernel_device, k=k, modes=modes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_plain_torch(dtype, kernel_device):
    check(sdpa_case(causal=True), dtype=dtype, device=kernel_device, k=1, modes=("hvp", "ggn"))


def test_bfloat16_bool_mask_gqa(kernel_device):
    case = sdpa_case(b=2, h=4, hkv=2, tq=7, tk=19, mask="bool")
    check(case, dtype=torch.bfloat16, device=kernel_device, k=1, modes=("hvp",))


def test_other_ranks(kernel_device):
    """2-D ``[T, D]`` and 3-D ``[H, T, D]`` inputs (no batch axis), and a 5-D one."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((5, 16), (2, 5, 16), (2, 1, 2, 5, 16)):
        x = [_randn(gen, *shape) for _ in range(3)]
        case = ((*x, None, 0.0, True, None, False), (*QKV, *(False,) * 5))
        check(case, device=kernel_device, k=1, modes=("hvp",))


def _call(args, active, k, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args = tuple(
        a.to(device, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )
    tangents = tuple(
        torch.randn(k, *a.shape, generator=gen).to(device, dtype) if act and k else None
        for a, act in zip(args, active)
    )
    return Call(SDPA, args, active, tangents, k)


def _cotangents(y, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(y.shape, generator=gen).to(y)
    return g, torch.randn(k, *y.shape, generator=gen).to(y)


def _hvp(call, cotangents=None):
    """Run the rule in hvp mode (random cotangents unless given); returns every output."""
    y, ydot, res = IMPL.fwd_jvp(call)
    g, gd = cotangents or _cotangents(y, call.k)
    gx, gdx = IMPL.bwd_jvp(res, g, gd)
    return [y, ydot, *gx[:3], *gdx[:3]]


def test_non_contiguous_inputs(kernel_device):
    """Hugging Face's layout: q, k, v and their tangents are ``[B, T, H, D] → [B, H, T, D]``
    transposed views (read in place through their strides); the results equal those of contiguous
    copies, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    x = [_randn(gen, 1, 19, 2, 16).transpose(1, 2) for _ in range(3)]
    active = (*QKV, *(False,) * 5)
    call = _call((*x, None, 0.0, True, None, False), active, 2, kernel_device)
    tangents = tuple(
        t.transpose(-3, -2).contiguous().transpose(-3, -2) if t is not None else None
        for t in call.tangents
    )
    strided = Call(SDPA, call.args, active, tangents, 2)
    assert not any(t.is_contiguous() for t in (*strided.args[:3], *tangents[:3]))
    dense = Call(
        SDPA,
        tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in strided.args),
        active,
        tuple(t.contiguous() if t is not None else None for t in strided.tangents),
        2,
    )
    for a, b in zip(_hvp(strided), _hvp(dense)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_k_batched_equals_one_at_a_time_and_deterministic(kernel_device):
    """Tangent ``k`` is its own grid program: K at once equals K separate calls, bit for bit, in the
    forward tangent and the cotangent tangents; and two identical calls agree bit for bit (no
    atomics: GQA sums its heads in registers)."""
    args, active = sdpa_case(h=4, hkv=2, tq=7, causal=True, seed=5)
    call = _call(args, active, 2, kernel_device)
    out = _hvp(call)
    for a, b in zip(out, _hvp(call)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g, gd = _cotangents(out[0], 2)
    for i in range(2):
        tangents = tuple(t[i : i + 1] if t is not None else None for t in call.tangents)
        one = _hvp(Call(SDPA, call.args, active, tangents, 1), (g, gd[i : i + 1]))
        for a, b in zip(one[:1] + one[2:5], out[:1] + out[2:5]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip([one[1], *one[5:]], [out[1], *out[5:]]):
            torch.testing.assert_close(a, b[i : i + 1], rtol=0, atol=0)


def test_declines_with_reasons():
    args, active = sdpa_case(tq=5)
    q, k, v = args[:3]

    def why(new_args, act=active, dtype=torch.float32):
        call = _call(new_args, act, 1, "cpu", dtype)
        return " ".join(reasons(IMPL, call, explicit=True))

    assert "dropout" in why((*args[:4], 0.1, *args[5:]))
    assert "float64" in why(args, dtype=torch.float64)
    assert "mask that depends" in why(
        (*args[:3], torch.zeros(5, 5, dtype=D64), *args[4:]), (*active[:3], True, *active[4:])
    )
    assert "head dim 160" in why((q.new_zeros(1, 2, 5, 160), k.new_zeros(1, 2, 5, 160), *args[2:]))
    assert "batch axes" in why((q, k.expand(3, 2, 5, 16), v.expand(3, 2, 5, 16), *args[3:]))
    assert "enable_gqa" in why((q, k[:, :1], v[:, :1], *args[3:]))
    assert "not broadcastable" in why((*args[:3], torch.ones(3, 5, dtype=torch.bool), *args[4:]))
    assert why(args) == ""


def test_dispatch_picks_the_kernel_only_when_asked(kernel_device):
    args, active = sdpa_case(tq=5)
    call = _call(args, active, 1, kernel_device)
    assert rule_for(SDPA, call, "triton") is IMPL
    if kernel_device.type == "cpu":
        assert rule_for(SDPA, call, "auto") is not IMPL


@pytest.mark.slow  # a whole GPT through the interpreter
def test_gpt_hvp_and_ggn_with_triton_attention_equal_plain_torch(kernel_device, monkeypatch):
    """A whole GPT (zoo ``gpt``: SDPA with ``is_causal``, LayerNorm, tied head) in float32: the HVP
    and the GGN-VP with ``backend="triton"`` equal ``backend="torch"``, and the Triton attention
    implementation really ran (once per layer and product, forward and backward). One layer of the
    zoo's two: a second one repeats the same launches, and each costs seconds in the interpreter;
    one vector (the K tangents are the kernels' grid axis, tested on their own above)."""
    model, loss_fn, inputs, targets = gpt()
    if kernel_device.type == "cpu":
        del model.blocks[1:]
    model = model.float().to(kernel_device)
    inputs = tuple(x.to(kernel_device) for x in inputs)
    targets = targets.to(kernel_device)
    gen = torch.Generator().manual_seed(6)
    v = {
        n: torch.randn(p.shape, generator=gen).to(kernel_device)
        for n, p in model.named_parameters()
    }
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = IMPL.fwd_jvp, IMPL.bwd_jvp

    def counted_fwd(call):
        calls["fwd"] += 1
        return fwd(call)

    def counted_bwd(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(IMPL, "fwd_jvp", counted_fwd)
    monkeypatch.setattr(IMPL, "bwd_jvp", counted_bwd)
    layers = len(model.blocks)
    for product in (hessfast.hvp, hessfast.ggn_vp):
        want = product(model, loss_fn, inputs, targets, v, backend="torch")
        before = dict(calls)
        # the interpreter: each rule once per product (tests/triton/test_traced_ops.py traces)
        got = product(model, loss_fn, inputs, targets, v, backend="triton", compile="interpret")
        assert calls["fwd"] - before["fwd"] == layers and calls["bwd"] - before["bwd"] == layers
        for name in want:
            scale = want[name].abs().max()
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale)


#: Compiles the three kernels for sm_90 (H100/H200) in a process without TRITON_INTERPRET: Triton's
#: GPU front end type-checks what the interpreter lets pass (compile-time branches, the stride
#: tuples, streamed operands passed as sources, switched-off ones as the constant 0). Each kernel
#: with every switch on (a mask and causal) and as a first-order launch (gradient, GGN), with the
#: GPU tiles of bfloat16 at head dim 64.
_COMPILE_SM90 = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hessfast.triton import attention as att

    TUPLES = {"sq": 3, "sk": 3, "sv": 3, "sg": 3, "stq": 4, "stk": 4, "stv": 4, "sc": 4, "msk": 4}
    SCALARS = {"sm_scale": "fp32", "Tq": "i32", "Tk": "i32", "H": "i32", "HKV": "i32",
               "GROUPS": "i32"}
    FP32 = {"STATS", "MU", "DELTA", "D0"}
    FIRST_ORDER = {"FIRST", "NEED_DK", "NEED_DV"}
    SWITCHES = {"SECOND", "HAS_TQ", "HAS_TK", "HAS_TV", "SDOT", "TANGENT"} | FIRST_ORDER
    KERNELS = {"fwd": att._sdpa_fwd_kernel, "kv": att._sdpa_bwd_kv_kernel,
               "q": att._sdpa_bwd_q_kernel}

    def type_of(name, mask):
        if name in TUPLES:
            return ("i32",) * TUPLES[name]
        if name in SCALARS:
            return SCALARS[name]
        if name == "Mask":
            return "*u8" if mask == 1 else "*fp32"
        return "*fp32" if name in FP32 else "*bf16"

    for kind, kernel in KERNELS.items():
        for heavy, mask, causal in ((True, 1, True), (False, 2, False)):
            block_m, block_n, warps = att._GPU_TILES[(kind, True, False, heavy)]
            consts = dict(D=64, DV=64, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=64, BLOCK_DV=64,
                          CAUSAL=causal, MASK=mask, PREC="tf32x3", DT=tl.bfloat16, RNE=False)
            consts.update({s: heavy or s in FIRST_ORDER for s in SWITCHES})
            names = kernel.arg_names
            sig = {n: "constexpr" if n in consts else type_of(n, mask) for n in names}
            constexprs = {(names.index(n),): v for n, v in consts.items() if n in names}
            out = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": warps, "num_stages": 2})
            assert out.asm["cubin"], (kind, heavy)
    print("compiled")
    """
)


@pytest.mark.slow  # a fresh process compiling for sm_90: tens of seconds
def test_kernels_compile_for_hopper():
    compile_for_gpu_in_subprocess(_COMPILE_SM90)


# ---- GPU only: realistic sizes ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_sized_heads_on_gpu(dtype, cuda_device):
    """GPT-2 small's attention (12 heads of 64) at T = 1024 and an HF-style padded causal mask."""
    check(sdpa_case(h=12, tq=1024, d=64, causal=True), dtype=dtype, device=cuda_device, k=1)
    check(
        sdpa_case(b=2, h=4, hkv=2, tq=300, tk=517, d=128, mask="bool"),
        dtype=dtype,
        device=cuda_device,
        k=2,
        modes=("hvp", "ggn"),
    )


def test_no_t_by_t_memory_on_gpu(cuda_device):
    """The memory of an HVP through attention (12 heads of 64, bf16) grows linearly in T: doubling
    T from 4096 to 8192 at most doubles it (plus slack), where one ``T × T`` score matrix per head
    would quadruple; and it stays below one such matrix at T = 8192."""
    extra = {}
    for t in (4096, 8192):
        args, active = sdpa_case(h=12, tq=t, d=64, causal=True)
        call = _call(args, active, 1, cuda_device, torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _hvp(call)
        torch.cuda.synchronize()
        extra[t] = torch.cuda.max_memory_allocated() - base
    assert extra[8192] < 2.5 * extra[4096], extra
    assert extra[8192] < 12 * 8192 * 8192 * 2, extra
