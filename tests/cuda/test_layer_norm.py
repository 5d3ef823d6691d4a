"""CUDA LayerNorm / RMSNorm kernels (``csrc/layer_norm.cu``, ``hessfast/cuda/layer_norm.py``), on
the family's case table (``tests/cases/layer_norm.py``, which the torch and Triton tests run too).

On ``cpu`` the ops run their CPU implementations over the same header algebra
(``csrc/layer_norm.cuh``); on ``cuda`` the kernels (skipped without a GPU). Against the float64
oracle through ``check_impl`` in every engine mode: float32 at the declared tolerance, bfloat16 and
float16 within 2× plain torch's error, float64 (CPU only) to 1e-10; affine and not, weight or bias
alone, several normalised dims, ``eps=None``, rows of odd length (a tail that is not a whole
16-byte pack, longer than one pass of the block), one row, K = 1 and K = 7, a transposed input.
Then the torch rule's ``None``-ness for every (ḡ, ġ, tangent) combination, K-batched = a loop over
K, determinism, more than 16 tangents (the weight kernel's tangent chunks), mixed-dtype
cotangents, the declines, the ops' argument checks and ``opcheck``.
"""

import pytest
import torch
from cases.layer_norm import CASES, DECLINED, LOW_PRECISION, declined, kernel_params
from kernels.harness import check_impl

from hessfast.cuda.layer_norm import IMPLEMENTATIONS, max_columns
from hessfast.rules import registered_rule
from hessfast.rules.base import Call

aten = torch.ops.aten
D = torch.float64
LN = aten.layer_norm.default
RMS = aten.rms_norm.default
IMPLS = {impl.ops[0]: impl for impl in IMPLEMENTATIONS}
T, F = True, False


def r(*s, seed):
    return torch.randn(*s, dtype=D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case,k", kernel_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(case, k, dtype, dev):
    op, args, active = CASES[case].call()
    check_impl(IMPLS[op], op, args, active, dtype=dtype, device=dev, k=k)


@pytest.mark.parametrize("case", LOW_PRECISION)
def test_matches_oracle_float16(case, dev):
    op, args, active = CASES[case].call()
    check_impl(IMPLS[op], op, args, active, dtype=torch.float16, device=dev, k=3)


@pytest.mark.parametrize("case", list(CASES))
def test_header_math_float64(case, ext, float64_probe):
    """The CPU implementation in float64: the header algebra itself, to 1e-10."""
    op, args, active = CASES[case].call()
    check_impl(float64_probe(IMPLS[op]), op, args, active, dtype=D, device="cpu", k=2)


def run(rule, op, args, active, tangents, g, gdot):
    k = next((t.shape[0] for t in tangents if t is not None), 0)
    call = Call(op, args, active, tangents, k)
    assert not rule.not_supported_reasons(call)
    y, ydot, res = rule.fwd_jvp(call)
    gx, gdx = rule.bwd_jvp(res, g, gdot)
    return [y, ydot, *gx, *gdx]


def inputs(op, dev, dtype, k, seed):
    """``(args, active, tangents [K, ...] of x, γ, β, ḡ, ġ)`` for a 5×8 LayerNorm / RMSNorm."""
    x, w, b = r(5, 8, seed=seed).to(dev, dtype), r(8, seed=seed + 1), r(8, seed=seed + 2)
    w, b = (1 + 0.3 * w).to(dev, dtype), (0.3 * b).to(dev, dtype)
    tx, tw, tb = (
        r(k, *s, seed=seed + 3 + i).to(dev, dtype) for i, s in enumerate([(5, 8), (8,), (8,)])
    )
    g, gdot = r(5, 8, seed=seed + 6).to(dev, dtype), r(k, 5, 8, seed=seed + 7).to(dev, dtype)
    if op == LN:
        return (
            (x, [8], w, b, 1e-5, True),
            (T, F, T, T, F, F),
            (tx, None, tw, tb, None, None),
            g,
            gdot,
        )
    return (x, [8], w, 1e-6), (T, F, T, F), (tx, None, tw, None), g, gdot


def same(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"output {i}: got {a is None=}, want {b is None=}"
        if b is not None and isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}"
            torch.testing.assert_close(a, b, msg=lambda m, i=i: f"output {i}: {m}", **tol)


@pytest.mark.parametrize("op", [LN, RMS], ids=["ln", "rms"])
def test_none_combinations_match_torch_rule(op, dev):
    """Every combination of present tangents (x, γ, β), ḡ, ġ and active arguments: the torch
    rule's values and None-ness (float64 on the CPU implementation, float32 on the GPU)."""
    dtype = D if dev.type == "cpu" else torch.float32
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == D else {"rtol": 1e-4, "atol": 1e-5}
    args, active, tans, g, gdot = inputs(op, dev, dtype, 2, seed=10)
    slots = [i for i, t in enumerate(tans) if t is not None]
    for keep in range(1 << len(slots)):
        t, act = list(tans), list(active)
        for bit, i in enumerate(slots):
            if not keep >> bit & 1:
                t[i] = None
        for gg, gd in [(g, gdot), (g, None), (None, gdot)]:
            for inactive in [None, *slots]:
                a, tt = list(act), list(t)
                if inactive is not None:
                    a[inactive], tt[inactive] = False, None
                got = run(IMPLS[op], op, args, tuple(a), tuple(tt), gg, gd)
                want = run(registered_rule(op), op, args, tuple(a), tuple(tt), gg, gd)
                same(got, want, **tol)


@pytest.mark.parametrize("op", [LN, RMS], ids=["ln", "rms"])
def test_k_batched_equals_loop_and_is_deterministic(op, dev):
    """Also K = 19: more than the 16 tangents of one weight-kernel chunk."""
    args, active, tans, g, gdot = inputs(op, dev, torch.float32, 19, seed=20)
    impl = IMPLS[op]
    batched = run(impl, op, args, active, tans, g, gdot)
    again = run(impl, op, args, active, tans, g, gdot)
    n = len(args)
    assert all(a is b or torch.equal(a, b) for a, b in zip(batched, again))
    for i in (0, 15, 16, 18):
        one = run(
            impl,
            op,
            args,
            active,
            tuple(t if t is None else t[i : i + 1] for t in tans),
            g,
            gdot[i : i + 1],
        )
        torch.testing.assert_close(one[1][0], batched[1][i], rtol=1e-6, atol=1e-6)
        for j in range(n):
            if batched[2 + n + j] is not None:
                torch.testing.assert_close(
                    one[2 + n + j][0], batched[2 + n + j][i], rtol=1e-6, atol=1e-6
                )


def test_mixed_dtype_cotangents(dev):
    """bfloat16 rows with float32 cotangents: cotangents in the dtypes of x, γ, β (as the torch
    rule), computed from the float32 cotangents."""
    args, active, tans, g, gdot = inputs(LN, dev, torch.bfloat16, 2, seed=30)
    got = run(IMPLS[LN], LN, args, active, tans, g.float(), gdot.float())
    want = run(registered_rule(LN), LN, args, active, tans, g.float(), gdot.float())
    assert [t.dtype if t is not None else None for t in got] == [
        t.dtype if t is not None else None for t in want
    ]
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def call_for(op, args, tangents=None):
    n = len(args)
    tangents = tangents or (None,) * n
    k = next((t.shape[0] for t in tangents if t is not None), 0)
    return Call(op, args, (True,) + (False,) * (n - 1), tangents, k)


@pytest.mark.parametrize("name", declined("cuda"))
def test_declines_with_its_reason(name):
    d = DECLINED[name]
    why = IMPLS[d.op].not_supported_reasons(d.call())
    assert any(d.reasons["cuda"] in w for w in why), why


def test_declines_rows_longer_than_the_row_cache(gpu):
    n = max_columns(gpu, torch.float32) + 8
    call = call_for(RMS, (torch.randn(2, n, device=gpu), [n], None, None))
    assert any("row cache" in w for w in IMPLS[RMS].not_supported_reasons(call))


def test_ops_reject_bad_arguments_naming_them(ext):
    x, w = torch.randn(3, 4), torch.randn(4)
    fwd, bwd = torch.ops.hessfast.norm_fwd_jvp, torch.ops.hessfast.norm_bwd_jvp
    with pytest.raises(RuntimeError, match="argument 'weight' must have shape"):
        fwd(x, torch.randn(5), None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="argument 'x' must be 2-D"):
        fwd(x.view(3, 2, 2), None, None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="'tweight' is given without 'weight'"):
        fwd(x, None, None, None, torch.randn(2, 4), None, 1e-5, True)
    with pytest.raises(RuntimeError, match="different numbers of tangents"):
        fwd(x, w, None, torch.randn(2, 3, 4), torch.randn(3, 4), None, 1e-5, True)
    _, _, stats, tstats = fwd(x, w, None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="argument 'tstats' must have shape"):
        bwd(x, w, torch.randn(2, 3, 4), None, stats, tstats, x, None, True, True, True, False)
    with pytest.raises(RuntimeError, match="need_weight is true but 'weight' is None"):
        bwd(x, None, None, None, stats, tstats, x, None, True, True, True, False)


@pytest.mark.parametrize("center", [True, False], ids=["ln", "rms"])
def test_opcheck(center, dev):
    gen = torch.Generator().manual_seed(40)

    def rn(*s):
        return torch.randn(*s, generator=gen).to(dev)

    x, w, b, tx, tw, tb = rn(4, 6), rn(6), rn(6), rn(2, 4, 6), rn(2, 6), rn(2, 6)
    fwd, bwd = torch.ops.hessfast.norm_fwd_jvp.default, torch.ops.hessfast.norm_bwd_jvp.default
    torch.library.opcheck(fwd, (x, w, b, tx, tw, tb, 1e-5, center))
    torch.library.opcheck(fwd, (x, None, None, None, None, None, 1e-5, center))
    _, _, stats, tstats = fwd(x, w, b, tx, tw, tb, 1e-5, center)
    torch.library.opcheck(
        bwd, (x, w, tx, tw, stats, tstats, rn(4, 6), rn(2, 4, 6), center, True, True, True)
    )
    torch.library.opcheck(
        bwd, (x, w, tx, tw, stats, tstats, None, rn(2, 4, 6), center, True, False, True)
    )
