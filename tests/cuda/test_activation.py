"""CUDA activation kernels (``csrc/activation.cu``, ``hessfast/cuda/activation.py``).

On ``cpu`` the ops run their CPU implementations, plain loops over the same ``__host__ __device__``
math (``csrc/activation.cuh``) as the kernels; on ``cuda`` the kernels themselves (skipped without
a GPU). Against the float64 oracle through ``check_impl`` in every engine mode: float32 at the
declared tolerance, bfloat16 and float16 within 2× plain torch's error, float64 (CPU only) to 1e-10;
shapes with odd sizes, size 1, a tail that is not a whole 16-byte pack, K = 1 and K = 7, a
transposed input. Then what the oracle does not see: the torch rule's ``None``-ness for every
(ḡ, ġ, ẋ) combination, non-contiguous tangents and cotangents, K-batched = a loop over K,
determinism, the vectorised and scalar paths agreeing, mixed-dtype cotangents, the declines, and
on a GPU an MLP's HVP with ``backend="cuda"``.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases.activation import CASES, KERNEL_SHAPES, declined, declined_call
from kernels.harness import check_impl, count_calls
from torch import nn

import hessfast
from hessfast.cuda.activation import IMPLEMENTATIONS
from hessfast.rules import activation as torch_rules
from hessfast.rules import registered_rule, rule_for
from hessfast.rules.base import Call

CSRC = Path(__file__).resolve().parents[2] / "csrc"

aten = torch.ops.aten
D = torch.float64
IMPLS = {impl.op: impl for impl in IMPLEMENTATIONS}
# the cases of the family's table that these kernels implement, and the kernels' names for them
OPS = [name for name, c in CASES.items() if c.op in IMPLS]
KINDS = {name: IMPLS[CASES[name].op].kind(CASES[name].args(None)) for name in OPS}


def values(name, *shape, seed=0):
    """float64 inputs of case ``name`` over every formula's regimes, away from the kinks."""
    return CASES[name].x(*shape, seed=seed)


def case(name, x):
    c = CASES[name]
    return c.op, c.args(x), c.active()


def test_every_implementation_has_cases():
    """A kernel added to ``IMPLEMENTATIONS`` runs the family's cases: its op is in the table."""
    assert {CASES[n].op for n in OPS} == set(IMPLS)


@pytest.mark.parametrize("shape,k", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPS)
def test_matches_oracle(name, dtype, shape, k, dev):
    op, args, active = case(name, values(name, *shape))
    check_impl(IMPLS[op], op, args, active, dtype=dtype, device=dev, k=k)


@pytest.mark.parametrize("name", OPS)
def test_matches_oracle_float16(name, dev):
    op, args, active = case(name, values(name, 4, 9, seed=1))
    check_impl(IMPLS[op], op, args, active, dtype=torch.float16, device=dev, k=3)


@pytest.mark.parametrize("name", OPS)
def test_header_math_float64(name, ext, float64_probe):
    """The CPU implementation in float64: the header formulas themselves, to 1e-10."""
    op, args, active = case(name, values(name, 6, 5, seed=2))
    check_impl(float64_probe(IMPLS[op]), op, args, active, dtype=D, device="cpu", k=2)


DRIVER = r"""
#include <cstdio>
#include "activation.cuh"
using namespace hessfast;
int main() {
  for (int i = 0; i <= 160; ++i) {
    const double x = -8.0 + 0.1 * i + 0.01;
    for (Act a : kActs) {
      dispatch_act(a, [&](auto tag) {
        constexpr Act A = decltype(tag)::value;
        double y, d1, e1, e2;
        act_value_d1<A>(x, y, d1);
        act_d1_d2<A>(ActInfo<A>::from_result ? y : x, e1, e2);
        std::printf("%d %.17g %.17g %.17g %.17g %.17g\n", static_cast<int>(a), x, y, d1, e1, e2);
      });
    }
  }
}
"""


def test_header_compiles_as_plain_cpp17_and_matches_the_torch_formulas(tmp_path):
    """``csrc/activation.cuh`` built by g++ alone (C++17, no torch, no CUDA): in float64 its
    values, f′ (from x, and from the residual) and f″ equal the torch rule's formulas."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ on this machine")
    (tmp_path / "driver.cpp").write_text(DRIVER)
    exe = tmp_path / "driver"
    subprocess.run(
        [gxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", "driver.cpp", "-o", str(exe)],
        cwd=tmp_path,
        check=True,
    )
    rows = torch.tensor(
        [[float(v) for v in line.split()] for line in subprocess.check_output([exe]).splitlines()],
        dtype=D,
    )
    formulas = {
        0: (torch.relu, torch_rules.relu_derivs, True),
        1: (
            lambda x: F.gelu(x),
            lambda s, second: torch_rules.gelu_derivs(s, "none", second),
            False,
        ),
        2: (
            lambda x: F.gelu(x, approximate="tanh"),
            lambda s, second: torch_rules.gelu_derivs(s, "tanh", second),
            False,
        ),
        3: (F.silu, torch_rules.silu_derivs, False),
        4: (torch.tanh, torch_rules.tanh_derivs, True),
        5: (torch.sigmoid, torch_rules.sigmoid_derivs, True),
        6: (F.hardswish, torch_rules.hardswish_derivs, False),
    }
    assert set(rows[:, 0].long().tolist()) == set(formulas)  # every activation has its formula
    for kind, (f, derivs, from_result) in formulas.items():
        a, x, y, d1, e1, e2 = rows[rows[:, 0] == kind].T
        want_y = f(x)
        want_d1, want_d2 = derivs(want_y if from_result else x, second=True)
        want_d2 = torch.zeros_like(x) if want_d2 is None else want_d2
        for got, want in ((y, want_y), (d1, want_d1), (e1, want_d1), (e2, want_d2)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_transposed_input_matches_oracle(name, dev):
    x = values(name, 9, 6, seed=3).t()
    assert not x.is_contiguous()
    op, args, active = case(name, x)
    check_impl(IMPLS[op], op, args, active, dtype=torch.float32, device=dev, k=2)


def run(rule, name, x, tx, g, gdot, active=True):
    """``fwd_jvp`` then ``bwd_jvp``: ``[y, ẏ, ḡ_x, ġ_x]`` (the other slots must be ``None``)."""
    c = CASES[name]
    args = c.args(x)
    k = 0 if tx is None else tx.shape[0]
    n = len(c.extra)
    call = Call(c.op, args, (active,) + (False,) * n, (tx,) + (None,) * n, k)
    assert not rule.not_supported_reasons(call)
    y, ydot, res = rule.fwd_jvp(call)
    gx, gdx = rule.bwd_jvp(res, g, gdot)
    assert len(gx) == len(gdx) == len(args) and all(t is None for t in (*gx[1:], *gdx[1:]))
    return [y, ydot, gx[0], gdx[0]]


def assert_same(got, want, **tol):
    for what, a, b in zip(("y", "ẏ", "ḡ_x", "ġ_x"), got, want, strict=True):
        assert (a is None) == (b is None), f"{what}: got {a is None=}, want {b is None=}"
        if b is not None:
            assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
            torch.testing.assert_close(a, b, msg=lambda m, w=what: f"{w}: {m}", **tol)


def randn(*shape, gen, dev, dtype):
    return torch.randn(*shape, dtype=D, generator=gen).to(dev, dtype)


@pytest.mark.parametrize("name", OPS)
def test_none_combinations_match_torch_rule(name, dev):
    """Every (ḡ, ġ, ẋ) combination and an inactive input: the torch rule's values and None-ness
    (float64 on the CPU implementation, float32 on the GPU)."""
    dtype = D if dev.type == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(4)
    x = values(name, 3, 5, seed=5).to(dev, dtype)
    tx, g, gdot = (randn(*s, gen=gen, dev=dev, dtype=dtype) for s in ((2, 3, 5), (3, 5), (2, 3, 5)))
    op = CASES[name].op
    for t, gg, gd, active in [
        (tx, g, gdot, True),
        (tx, g, None, True),
        (tx, None, gdot, True),
        (tx, None, None, True),
        (None, g, None, True),
        (None, None, gdot[:1], True),
        (tx, g, gdot, False),
    ]:
        got = run(IMPLS[op], name, x, t, gg, gd, active)
        want = run(registered_rule(op), name, x, t, gg, gd, active)
        tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == D else {"rtol": 1e-5, "atol": 1e-6}
        assert_same(got, want, **tol)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_tangents_and_cotangents(name, dev):
    gen = torch.Generator().manual_seed(6)
    x = values(name, 6, 4, seed=7).t().to(dev)
    tx = torch.randn(3, 6, 4, dtype=D, generator=gen).transpose(1, 2).to(dev)
    g = torch.randn(6, 4, dtype=D, generator=gen).t().to(dev)
    gdot = torch.randn(4, 3, 6, dtype=D, generator=gen).permute(1, 0, 2).to(dev)
    assert not any(t.is_contiguous() for t in (x, tx, g, gdot))
    op = CASES[name].op
    cast = [t.float() for t in (x, tx, g, gdot)]
    got = run(IMPLS[op], name, *cast)
    want = run(registered_rule(op), name, *cast)
    assert_same(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPS)
def test_k_batched_equals_loop_and_is_deterministic(name, dev):
    gen = torch.Generator().manual_seed(8)
    x = values(name, 5, 7, seed=9).float().to(dev)
    tx, g, gdot = (
        randn(*s, gen=gen, dev=dev, dtype=torch.float32) for s in ((7, 5, 7), (5, 7), (7, 5, 7))
    )
    impl = IMPLS[CASES[name].op]
    batched = run(impl, name, x, tx, g, gdot)
    again = run(impl, name, x, tx, g, gdot)
    assert all(torch.equal(a, b) for a, b in zip(batched, again))
    y, ydot, gx, gdx = batched
    for i in range(7):
        y1, ydot1, gx1, gdx1 = run(impl, name, x, tx[i : i + 1], g, gdot[i : i + 1])
        assert torch.equal(y1, y) and torch.equal(gx1, gx)
        assert torch.equal(ydot1[0], ydot[i]) and torch.equal(gdx1[0], gdx[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gelu-erf", "sigmoid"])
def test_unaligned_storage_takes_the_scalar_path_with_the_same_results(name, dtype, dev):
    """Tensors that start off a 16-byte boundary (views at offset 1) or whose length is not a
    whole number of packs run the scalar loads: the results are the same as aligned copies."""
    gen = torch.Generator().manual_seed(10)
    n = 8 * 37
    base = values(name, n + 1, seed=11).to(dev, dtype)
    tbase = randn(2, n + 1, gen=gen, dev=dev, dtype=dtype)
    gbase = randn(n + 1, gen=gen, dev=dev, dtype=dtype)
    x, tx, g, gdot = base[1:], tbase[:, 1:], gbase[1:], tbase[:, 1:]
    assert x.storage_offset() == 1
    impl = IMPLS[CASES[name].op]
    unaligned = run(impl, name, x, tx, g, gdot)
    aligned = run(impl, name, x.clone(), tx.clone(), g.clone(), gdot.clone())
    assert all(torch.equal(a, b) for a, b in zip(unaligned, aligned))
    odd = run(impl, name, x[:-3].clone(), tx[:, :-3].clone(), g[:-3].clone(), gdot[:, :-3].clone())
    for a, b in zip(odd, aligned):
        assert torch.equal(a, b[..., :-3])


def test_mixed_dtype_cotangents_follow_torch_promotion(dev):
    """bfloat16 inputs with float32 cotangents give float32 cotangents, as the torch rule does,
    equal to the same computation from float32 residuals."""
    gen = torch.Generator().manual_seed(12)
    x = values("tanh", 4, 6, seed=13).to(dev, torch.bfloat16)
    tx = randn(2, 4, 6, gen=gen, dev=dev, dtype=torch.bfloat16)
    g = randn(4, 6, gen=gen, dev=dev, dtype=torch.float32)
    gdot = randn(2, 4, 6, gen=gen, dev=dev, dtype=torch.float32)
    for name in ("gelu-erf", "tanh"):
        op = CASES[name].op
        got = run(IMPLS[op], name, x, tx, g, gdot)
        want = run(registered_rule(op), name, x, tx, g, gdot)
        assert [t.dtype for t in got] == [t.dtype for t in want]
        torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=2e-2)


def test_empty_tensor(dev):
    x = torch.empty(0, 3, device=dev)
    t = torch.empty(2, 0, 3, device=dev)
    y, ydot, gx, gdx = run(IMPLS[aten.silu.default], "silu", x, t, x, t)
    assert y.shape == gx.shape == (0, 3) and ydot.shape == gdx.shape == (2, 0, 3)


@pytest.mark.parametrize("name", declined("cuda"))
def test_declines_with_its_reason(name):
    op, call, reasons = declined_call(name)
    why = IMPLS[op].not_supported_reasons(call)
    assert why and any(reasons["cuda"] in w for w in why), why


def test_ops_reject_bad_arguments_naming_them(ext):
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="argument 'tx' must have shape"):
        torch.ops.hessfast.act_fwd_jvp(x, torch.randn(2, 4, 3), "gelu")
    with pytest.raises(RuntimeError, match="argument 'x' must be contiguous"):
        torch.ops.hessfast.act_fwd_jvp(x.t(), None, "gelu")
    with pytest.raises(RuntimeError, match="argument 'gdot' must have dtype"):
        torch.ops.hessfast.act_bwd_jvp(x, None, torch.randn(2, 3, 4, dtype=D), None, "tanh")
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        torch.ops.hessfast.act_fwd_jvp(x, None, "swish")
    with pytest.raises(RuntimeError, match="different numbers of tangents"):
        torch.ops.hessfast.act_bwd_jvp(x, x, torch.randn(2, 3, 4), torch.randn(3, 3, 4), "silu")


@pytest.mark.parametrize("act", sorted(set(KINDS.values())))
def test_opcheck(act, dev):
    """torch.library.opcheck: schema, fake tensors (the Meta implementation), dynamic shapes."""
    gen = torch.Generator().manual_seed(14)
    x, tx, g, gdot = (
        randn(*s, gen=gen, dev=dev, dtype=torch.float32)
        for s in ((3, 5), (2, 3, 5), (3, 5), (2, 3, 5))
    )
    torch.library.opcheck(torch.ops.hessfast.act_fwd_jvp.default, (x, tx, act))
    torch.library.opcheck(torch.ops.hessfast.act_fwd_jvp.default, (x, None, act))
    torch.library.opcheck(torch.ops.hessfast.act_bwd_jvp.default, (x, g, gdot, tx, act))
    torch.library.opcheck(torch.ops.hessfast.act_bwd_jvp.default, (x, None, gdot, None, act))


def test_mlp_hvp_runs_cuda_activations_and_matches_torch(gpu, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.SiLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(gpu)
    x, y = torch.randn(4, 5, device=gpu), torch.tensor([0, 2, 1, 2], device=gpu)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    call = Call(aten.gelu.default, (x, "none"), (True, False), (None, None), 0)
    # unmeasured on GPUs (hessfast.dispatch.MEASURED): automatic dispatch keeps the torch rule
    assert rule_for(aten.gelu.default, call, "auto").backend == "torch"
    ran = count_calls(monkeypatch, IMPLEMENTATIONS)
    hv = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="cuda")
    assert dict(ran) == {
        (name, phase): 1 for name in ("gelu", "silu", "tanh") for phase in ("fwd_jvp", "bwd_jvp")
    }
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    for n in v:
        torch.testing.assert_close(hv[n], want[n], rtol=1e-5, atol=1e-6)
