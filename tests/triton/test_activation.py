"""Triton activation kernels (``hessfast/triton/activation.py``) against the float64 oracle.

Every op × dtype × mode (hvp, hvp-second-order-only, ggn, grad) through ``check_impl``: float32
and float64 at the declared tolerance, bfloat16 and float16 within 2× plain torch's error; shapes
with a non-power-of-two size, size 1, several programs with a masked tail, K = 1 and K = 7, and a
transposed (non-contiguous) input. Then the properties the oracle does not see: every ``None``
combination the engine passes gives the torch rule's results and ``None``-ness, non-contiguous
tangents and cotangents, K-batched = a loop over K, determinism, relative accuracy of ``y`` for
small and large inputs, empty tensors, mixed operand dtypes, the declines, and dispatch: an MLP's
HVP with ``backend="triton"`` runs these kernels for its activations and equals the torch backend.

On a machine without a GPU these run in Triton's interpreter (``tests/conftest.py``).
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from cases.activation import CASES, KERNEL_SHAPES, declined, declined_call
from kernels.harness import check_impl, count_calls
from torch import nn

import hessfast
from hessfast.rules import registered_rule, rule_for
from hessfast.rules.base import Call, invoke
from hessfast.triton import activation
from hessfast.triton.activation import BLOCK, IMPLEMENTATIONS

pytestmark = pytest.mark.triton

aten = torch.ops.aten
D = torch.float64
IMPLS = {impl.op: impl for impl in IMPLEMENTATIONS}
# the cases of the family's table that these kernels implement
OPS = [name for name, c in CASES.items() if c.op in IMPLS]
CURVED = [n for n in OPS if not CASES[n].flat]


def values(name, *shape, seed=0):
    """float64 inputs of case ``name``: spread over the regimes of every formula (|x| up to about
    6, both tanh branches), away from the kinks."""
    return CASES[name].x(*shape, seed=seed)


def case(name, x):
    c = CASES[name]
    return c.op, c.args(x), c.active()


def test_every_implementation_has_cases():
    """A kernel added to ``IMPLEMENTATIONS`` runs the family's cases: its op is in the table."""
    assert {CASES[n].op for n in OPS} == set(IMPLS)


def test_kernel_shapes_cover_several_programs_with_a_masked_tail():
    sizes = [math.prod(shape) for shape, _ in KERNEL_SHAPES]
    assert any(n > BLOCK and n % BLOCK for n in sizes) and 1 in sizes


@pytest.mark.parametrize("shape,k", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPS)
def test_matches_oracle(name, dtype, shape, k, kernel_device):
    op, args, active = case(name, values(name, *shape))
    check_impl(IMPLS[op], op, args, active, dtype=dtype, device=kernel_device, k=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("name", OPS)
def test_matches_oracle_other_dtypes(name, dtype, kernel_device):
    op, args, active = case(name, values(name, 4, 9, seed=1))
    check_impl(IMPLS[op], op, args, active, dtype=dtype, device=kernel_device, k=3)


@pytest.mark.parametrize("name", OPS)
def test_transposed_input_matches_oracle(name, kernel_device):
    x = values(name, 9, 6, seed=2).t()
    assert not x.is_contiguous()
    op, args, active = case(name, x)
    check_impl(IMPLS[op], op, args, active, dtype=torch.float32, device=kernel_device, k=2)


def _run(rule, name, x, tx, g, gdot, active=True):
    """``fwd_jvp`` then ``bwd_jvp``: ``[y, ẏ, ḡ_x, ġ_x]`` (the cotangents of ``x`` only; the
    other arguments' slots must be ``None``)."""
    c = CASES[name]
    args = c.args(x)
    k = 0 if tx is None else tx.shape[0]
    n = len(c.extra)
    call = Call(c.op, args, (active,) + (False,) * n, (tx,) + (None,) * n, k)
    y, ydot, res = rule.fwd_jvp(call)
    gx, gdx = rule.bwd_jvp(res, g, gdot)
    assert len(gx) == len(gdx) == len(args) and all(t is None for t in (*gx[1:], *gdx[1:]))
    return [y, ydot, gx[0], gdx[0]]


def _assert_same(got, want, **tol):
    for what, a, b in zip(("y", "ẏ", "ḡ_x", "ġ_x"), got, want, strict=True):
        assert (a is None) == (b is None), f"{what}: got {a is None=}, want {b is None=}"
        if b is not None:
            assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
            torch.testing.assert_close(a, b, msg=lambda m, w=what: f"{w}: {m}", **tol)


@pytest.mark.parametrize("name", OPS)
def test_none_combinations_match_torch_rule(name, kernel_device):
    """Every (ḡ, ġ, K) combination and an inactive input: values and None-ness as the torch rule
    (float64, where both compute the same formulas)."""
    dev = kernel_device
    x = values(name, 3, 5, seed=3).to(dev)
    gen = torch.Generator().manual_seed(4)
    tx = torch.randn(2, 3, 5, dtype=D, generator=gen).to(dev)
    g = torch.randn(3, 5, dtype=D, generator=gen).to(dev)
    gdot = torch.randn(2, 3, 5, dtype=D, generator=gen).to(dev)
    impl, ref = IMPLS[CASES[name].op], registered_rule(CASES[name].op)
    combos = [
        (tx, g, gdot, True),
        (tx, g, None, True),
        (tx, None, gdot, True),
        (tx, None, None, True),
        (None, g, None, True),
        (tx, g, gdot, False),
    ]
    for t, gg, gd, active in combos:
        got = _run(impl, name, x, t, gg, gd, active)
        want = _run(ref, name, x, t, gg, gd, active)
        _assert_same(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_tangents_and_cotangents(name, kernel_device):
    dev = kernel_device
    gen = torch.Generator().manual_seed(5)
    x = values(name, 6, 4, seed=6).t().to(dev)
    tx = torch.randn(3, 6, 4, dtype=D, generator=gen).transpose(1, 2).to(dev)
    g = torch.randn(6, 4, dtype=D, generator=gen).t().to(dev)
    gdot = torch.randn(4, 3, 6, dtype=D, generator=gen).permute(1, 0, 2).to(dev)
    assert not any(t.is_contiguous() for t in (x, tx, g, gdot))
    op = CASES[name].op
    got = _run(IMPLS[op], name, x, tx, g, gdot)
    want = _run(registered_rule(op), name, x, tx, g, gdot)
    _assert_same(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", CURVED)
def test_k_batched_equals_loop_and_is_deterministic(name, kernel_device):
    dev = kernel_device
    gen = torch.Generator().manual_seed(7)
    x = values(name, 5, 7, seed=8).float().to(dev)
    tx = torch.randn(4, 5, 7, generator=gen).to(dev)
    g = torch.randn(5, 7, generator=gen).to(dev)
    gdot = torch.randn(4, 5, 7, generator=gen).to(dev)
    impl = IMPLS[CASES[name].op]
    batched = _run(impl, name, x, tx, g, gdot)
    again = _run(impl, name, x, tx, g, gdot)
    for a, b in zip(batched, again):
        assert (a is None and b is None) or torch.equal(a, b)
    y, ydot, gx, gdx = batched
    for i in range(4):
        y1, ydot1, gx1, gdx1 = _run(impl, name, x, tx[i : i + 1], g, gdot[i : i + 1])
        assert torch.equal(y1, y) and torch.equal(gx1, gx)
        assert torch.equal(ydot1[0], ydot[i]) and torch.equal(gdx1[0], gdx[i])


def _exact(name, x):
    """The float64 value of activation ``name``; gelu-tanh as ``x σ(2u)``, which does not cancel
    for negative ``x`` (torch's ``½ x (1 + tanh u)`` does, in float64 too, beyond ``x ≈ −6``)."""
    if name == "gelu-tanh":
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return invoke(CASES[name].op, CASES[name].args(x))


@pytest.mark.parametrize("name", CURVED)
def test_y_keeps_relative_accuracy(name, kernel_device):
    """float32 ``y`` of each element within a few ulps times ``1 + κ`` (``κ = |x f′/f|``, the
    condition number: how much the rounding of intermediate values like ``u`` is amplified), for
    ``|x|`` from 1e-6 to 9, where a formula with cancellation loses all relative accuracy (tanh
    near 0; gelu-tanh for negative ``x``, where torch's float32 gelu is 30% off at ``x = −5``).
    gelu-erf's ``1 + erf(x/√2)`` cancels for negative ``x`` in torch too: there the bound is also
    at least 4× torch's own float32 error."""
    mag = torch.logspace(-6, 0.95, 301, dtype=D)
    x = torch.cat([mag, -mag])
    want = _exact(name, x)
    h = 1e-6
    kappa = ((_exact(name, x * (1 + h)) - _exact(name, x * (1 - h))) / (2 * h * want)).abs()
    limit = 5e-7 * (1 + kappa) * want.abs()
    if name == "gelu-erf":
        torch32 = invoke(CASES[name].op, CASES[name].args(x.float())).double()
        limit = torch.maximum(limit, 4 * (torch32 - want).abs())
    ones = torch.ones(1, *x.shape, device=kernel_device)
    op = CASES[name].op
    got = _run(IMPLS[op], name, x.float().to(kernel_device), ones, None, None)[0].cpu().double()
    bad = (got - want).abs() > limit
    assert not bad.any(), (
        f"x = {x[bad][:4].tolist()}: y = {got[bad][:4].tolist()}, want {want[bad][:4].tolist()}"
    )


@pytest.mark.parametrize("name", ["relu", "gelu-tanh", "sigmoid"])
def test_empty_tensor(name, kernel_device):
    x = torch.empty(0, 3, device=kernel_device)
    t = torch.empty(2, 0, 3, device=kernel_device)
    y, ydot, gx, gdx = _run(IMPLS[CASES[name].op], name, x, t, x, t)
    assert y.shape == gx.shape == (0, 3) and ydot.shape == gdx.shape == (2, 0, 3)


def test_mixed_dtypes_follow_torch_promotion(kernel_device):
    """bfloat16 inputs with float32 cotangents: float32 cotangents (torch's promotion, as the torch
    rule returns), computed exactly as from the same values all in float32."""
    dev = kernel_device
    gen = torch.Generator().manual_seed(9)
    x = values("silu", 4, 6, seed=10).to(dev, torch.bfloat16)
    tx = torch.randn(2, 4, 6, generator=gen).to(dev, torch.bfloat16)
    g = torch.randn(4, 6, generator=gen).to(dev)
    gdot = torch.randn(2, 4, 6, generator=gen).to(dev)
    for name in ("gelu-erf", "silu"):
        op = CASES[name].op
        got = _run(IMPLS[op], name, x, tx, g, gdot)
        want = _run(registered_rule(op), name, x, tx, g, gdot)
        assert [t.dtype for t in got] == [t.dtype for t in want]
        same = _run(IMPLS[op], name, x.float(), tx.float(), g, gdot)
        assert torch.equal(got[0], same[0].bfloat16()) and torch.equal(got[1], same[1].bfloat16())
        assert torch.equal(got[2], same[2]) and torch.equal(got[3], same[3])


@triton.jit
def _store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    activation._store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask)


def test_bfloat16_stores_round_to_nearest_even(kernel_device):
    """The kernels' bfloat16 rounding equals torch's (round to nearest, ties to even) bit for bit,
    ties, overflow to inf, inf, NaN and subnormals included."""
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31, (900,), generator=gen, dtype=torch.int64)
    ties = (bits[:100] & ~0xFFFF) | 0x8000
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, -1e-40]
    )
    x = torch.cat(
        [
            bits.to(torch.int32).view(torch.float32),
            ties.to(torch.int32).view(torch.float32),
            special,
        ]
    )
    x = x.to(kernel_device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=kernel_device)
    _store_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("name", declined("triton"))
def test_declines_with_its_reason(name):
    op, call, reasons = declined_call(name)
    why = IMPLS[op].not_supported_reasons(call)
    assert why and any(reasons["triton"] in w for w in why), why


def test_mlp_hvp_runs_triton_activations_and_matches_torch(kernel_device, monkeypatch):
    dev = kernel_device
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.SiLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(dev)
    x, y = torch.randn(4, 5, device=dev), torch.tensor([0, 2, 1, 2], device=dev)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    call = Call(aten.gelu.default, (x, "none"), (True, False), (None, None), 0)
    assert rule_for(aten.gelu.default, call, "triton") is IMPLS[aten.gelu.default]

    ran = count_calls(monkeypatch, IMPLEMENTATIONS)
    # the interpreter calls each rule once per product (a traced product also calls them while
    # tracing and checks its first replay against the interpreter: tests/triton/test_traced_ops.py)
    hv = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", compile="interpret")
    assert {key: ran[key] for key in ran} == {
        (name, phase): 1 for name in ("gelu", "silu", "tanh") for phase in ("fwd_jvp", "bwd_jvp")
    }
    ran.clear()
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    assert not ran
    for n in v:
        torch.testing.assert_close(hv[n], want[n], rtol=1e-5, atol=1e-6)
