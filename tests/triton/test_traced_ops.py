"""The Triton launches as ``torch.library`` custom ops (``torch.ops.hessfast.triton_*``), so that a
traced product (:mod:`hessfast.traced`) records each launch as one graph node.

- ``torch.library.opcheck`` on every op with small CPU inputs (every ``None`` pattern the rules
  pass): the schema, the autograd registration (none: the ops are never differentiated), the fake
  implementations against the real outputs' shapes, strides and dtypes, and AOT dispatch with
  dynamic shapes. All four of opcheck's default checks run; none is skipped.
- End to end: ``hessfast.hvp`` / ``ggn_vp`` with ``backend="triton"`` on an MLP with GELU and
  LayerNorm, on the zoo's tiny GPT (SDPA) and on a fused cross-entropy head trace into one graph
  (:func:`hessfast.traced.explain` shows ``traced: True``) whose nodes include the ``hessfast::``
  ops, later products replay it without calling any rule, and the result equals ``backend="torch"``
  within the kernels' float32 tolerance.

On a machine without a GPU these run in Triton's interpreter (``tests/conftest.py``).
"""

import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from models.zoo import gpt
from torch import nn

import hessfast
from hessfast import capture, engine, traced
from hessfast.rules import cross_entropy as ce
from hessfast.triton import activation, attention, cross_entropy, layer_norm, linear

pytestmark = pytest.mark.triton

OPS = {
    "triton_act_fwd_jvp": activation._fwd_op,
    "triton_act_bwd_jvp": activation._bwd_op,
    "triton_norm_fwd_jvp": layer_norm._fwd_op,
    "triton_norm_bwd_jvp": layer_norm._bwd_op,
    "triton_dual_gemm": linear._dual_gemm_op,
    "triton_ce_rows": cross_entropy._rows_op,
    "triton_sdpa_fwd_jvp": attention._fwd_op,
    "triton_sdpa_bwd_jvp": attention._bwd_op,
}


def test_ops_are_registered_in_the_hessfast_namespace():
    for name, op in OPS.items():
        assert getattr(torch.ops.hessfast, name).default is op._opoverload
        assert not op._opoverload._schema.is_mutable, name


def _randn(*shape, dev):
    return torch.randn(*shape, device=dev)


def _activation_cases(dev):
    x, g = _randn(3, 5, dev=dev), _randn(3, 5, dev=dev)
    tx, gd = _randn(2, 3, 5, dev=dev), _randn(2, 3, 5, dev=dev)
    fwd, bwd = activation._fwd_op, activation._bwd_op
    return [
        (fwd, (x, tx, activation.GELU_ERF, False)),
        (fwd, (x, None, activation.RELU, True)),
        (fwd, (x, tx[:0], activation.SILU, False)),  # K = 0
        (fwd, (x.double(), tx.double(), activation.GELU_TANH, False)),
        (bwd, (x, g, gd, tx, activation.GELU_TANH)),  # hvp
        (bwd, (x, None, gd, None, activation.TANH)),  # ggn
        (bwd, (x, g, None, tx, activation.SIGMOID)),  # hvp without ġ
        (bwd, (x, g, None, None, activation.RELU)),  # gradient
    ]


def _norm_cases(dev):
    n, d, k = 6, 10, 2
    x, w, b = _randn(n, d, dev=dev), _randn(d, dev=dev), _randn(d, dev=dev)
    tx, tw, tb = _randn(k, n, d, dev=dev), _randn(k, d, dev=dev), _randn(k, d, dev=dev)
    g, gd = _randn(n, d, dev=dev), _randn(k, n, d, dev=dev)
    fwd, bwd = layer_norm._fwd_op, layer_norm._bwd_op
    _, _, mean, rstd, a, tmean = fwd(x, w, b, tx, tw, tb, 1e-5, True)
    _, _, _, rrms, arms, _ = fwd(x, w, None, tx, None, None, 1e-6, False)
    f32 = torch.float32
    return [
        (fwd, (x, w, b, tx, tw, tb, 1e-5, True)),
        (fwd, (x, None, None, tx, None, None, 1e-5, False)),
        (fwd, (x, w, b, None, None, None, 1e-5, True)),
        (fwd, (x, w, b, tx[:0], None, None, 1e-5, True)),  # K = 0
        (bwd, (x, w, tw, tx, g, gd, mean, rstd, a, tmean, k, True, True, True, f32, f32)),
        (bwd, (x, w, None, None, None, gd, mean, rstd, None, None, k, True, True, False, f32, f32)),
        (bwd, (x, w, None, None, g, None, mean, rstd, None, None, 0, True, False, True, f32, f32)),
        (bwd, (x, w, None, tx, g, gd, None, rrms, arms, None, k, False, True, False, f32, f32)),
    ]


def _linear_cases(dev):
    w, x = _randn(7, 9, dev=dev), _randn(6, 9, dev=dev)
    tx, tw, tb = _randn(2, 6, 9, dev=dev), _randn(2, 7, 9, dev=dev), _randn(2, 7, dev=dev)
    g, gd = _randn(6, 7, dev=dev), _randn(2, 6, 7, dev=dev)
    op, f32 = linear._dual_gemm_op, torch.float32
    return [
        (op, (tx, w.t(), x, tw.transpose(1, 2), tb, 2, 6, 7, f32)),  # ẏ
        (op, (None, None, x, tw.transpose(1, 2), None, 2, 6, 7, f32)),
        (op, (gd, w, g, tw, None, 2, 6, 9, f32)),  # ġ_x
        (op, (gd.transpose(1, 2), x, None, None, None, 2, 7, 9, f32)),  # ġ_W, GGN
    ]


def _ce_cases(dev):
    m, v, k = 5, 37, 3
    z, zd = _randn(m, v, dev=dev), _randn(k, m, v, dev=dev)
    y = torch.randint(0, v, (m,), device=dev)
    y[1] = -100
    w = torch.rand(v, device=dev) + 0.5
    op = cross_entropy._rows_op
    return [
        (op, (z, zd, y, w, -100, 0.1, 0.5, True, 0, 0)),
        (op, (z, None, y, None, -100, 0.0, 1.0, True, 16, 0)),  # several tiles
        (op, (z, zd, y, None, -100, 0.0, 1.0, False, 16, 2)),  # several tangent blocks
        (op, (z[:0], zd[:, :0], y[:0], None, -100, 0.0, 1.0, True, 0, 0)),  # no rows
    ]


def _attention_cases(dev):
    z, h, hkv, t, d, n = 1, 2, 1, 20, 8, 2
    q, k, v = (
        _randn(z, h, t, d, dev=dev),
        _randn(z, hkv, t, d, dev=dev),
        _randn(z, hkv, t, d, dev=dev),
    )
    tq, tk = _randn(n, z, h, t, d, dev=dev), _randn(n, z, hkv, t, d, dev=dev)
    tv = _randn(n, z, hkv, t, d, dev=dev)
    mask = torch.rand(z, h, t, t, device=dev) > 0.3
    mask[..., 0] = True
    fwd, bwd = attention._fwd_op, attention._bwd_op
    o, stats, od, mu = fwd(q, k, v, tq, tk, tv, None, 0.3, True, n)
    g, gd = _randn(z, h, t, d, dev=dev), _randn(n, z, h, t, d, dev=dev)
    d0 = attention._rowdot(g, o)
    dt = attention._rowdot(gd, o) + attention._rowdot(g, od)
    return [
        (fwd, (q, k, v, tq, tk, tv, None, 0.3, True, n)),
        (fwd, (q, k, v, None, None, tv, mask, 0.3, False, n)),  # no Ṡ, boolean mask
        (fwd, (q, k, v, None, None, None, mask.float(), 0.3, False, 0)),  # primal only
        # the primal backward (gradient), then the HVP's tangent launch (no dK wanted)
        (bwd, (q, k, v, None, None, None, None, None, g[None], stats, None, d0[None], None, 0.3,
               True, 1, True, True, True)),
        (bwd, (q, k, v, tq, tk, tv, None, g, gd, stats, mu, dt, d0, 0.3, True, n, True, False,
               True)),
        # GGN: first-order terms of the ġ_k alone
        (bwd, (q, k, v, None, None, None, None, None, gd, stats, None,
               attention._rowdot(gd, o), None, 0.3, True, n, True, True, True)),
    ]  # fmt: skip


CASES = {
    "activation": _activation_cases,
    "layer_norm": _norm_cases,
    "linear": _linear_cases,
    "cross_entropy": _ce_cases,
    "attention": _attention_cases,
}


@pytest.mark.parametrize(
    "family",
    # attention: the interpreter runs its kernels for each of opcheck's checks (tens of seconds)
    [pytest.param(f, marks=pytest.mark.slow if f == "attention" else ()) for f in CASES],
)
def test_opcheck(family, kernel_device):
    """opcheck's four default checks (schema, autograd registration, fake tensors, AOT dispatch
    with dynamic shapes) on every case of the family."""
    for op, args in CASES[family](kernel_device):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


# ---- end to end ---------------------------------------------------------------------------------


def _graph_ops(program) -> set[str]:
    """The ``hessfast::`` ops called by the traced graphs cached for ``program``."""
    names = set()
    for trace in traced._traces(program).values():
        assert trace.fn is not None, trace.reason
        for node in trace.fn.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("hessfast."):
                names.add(str(node.target).split(".")[1])
    return names


def _assert_close(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for n in want:
        scale = want[n].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol * scale)


def _impls():
    mods = (activation, layer_norm, linear, cross_entropy, attention)
    return [impl for mod in mods for impl in mod.IMPLEMENTATIONS]


def _no_rules():
    """Every Triton rule raises: a replayed graph calls none of them."""
    stack = []
    for impl in _impls():
        for phase in ("fwd_jvp", "bwd_jvp", "rows"):
            if hasattr(impl, phase):
                stack.append(mock.patch.object(impl, phase, side_effect=AssertionError(phase)))
    return stack


def _replay_without_rules(product):
    patches = _no_rules()
    for p in patches:
        p.start()
    try:
        return product()
    finally:
        for p in patches:
            p.stop()


def _check_traced(model, inputs, want_ops):
    prog = capture.capture(model, inputs)
    info = traced.explain(prog)
    assert info and all(t["traced"] for t in info), info
    ops = _graph_ops(prog)
    assert want_ops <= ops, ops
    return info


def test_mlp_gelu_layer_norm_traces_the_triton_ops(kernel_device):
    dev = kernel_device
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(approximate="tanh"),
        nn.Linear(16, 3),
    ).to(dev)  # fmt: skip
    x, y = torch.randn(5, 8, device=dev), torch.tensor([0, 1, 2, 1, 0], device=dev)
    v = {n: torch.randn(2, *p.shape, device=dev) for n, p in model.named_parameters()}
    hvp = functools.partial(hessfast.hvp, model, F.cross_entropy, x, y, v)
    ggn = functools.partial(hessfast.ggn_vp, model, F.cross_entropy, x, y, v)
    got = hvp(backend="triton")  # traced, first replay checked against the interpreter
    got_ggn = ggn(backend="triton")
    info = _check_traced(
        model,
        (x,),
        {
            "triton_act_fwd_jvp",
            "triton_act_bwd_jvp",
            "triton_norm_fwd_jvp",
            "triton_norm_bwd_jvp",
            "triton_dual_gemm",
        },
    )
    assert {t["mode"] for t in info} == {"hvp", "ggn"}
    _assert_close(got, hvp(backend="torch"))
    _assert_close(got_ggn, ggn(backend="torch"))
    # later products replay the graph: no rule runs, and a new batch gives its own answer
    x2 = torch.randn(5, 8, device=dev)
    hvp2 = functools.partial(hessfast.hvp, model, F.cross_entropy, x2, y, v)
    again = _replay_without_rules(lambda: hvp2(backend="triton"))
    _assert_close(again, hvp2(backend="torch"))
    assert all(t["calls"] >= 1 for t in traced.explain(capture.capture(model, (x,))))


@pytest.mark.slow  # a whole GPT through the interpreter, traced
def test_tiny_gpt_traces_the_triton_attention(kernel_device):
    """The zoo's GPT (SDPA with is_causal, LayerNorm, GELU, tied head) in float32; one layer in
    the interpreter (a second repeats the same launches)."""
    model, loss_fn, inputs, targets = gpt()
    if kernel_device.type == "cpu":
        del model.blocks[1:]
    model = model.float().to(kernel_device)
    inputs = tuple(x.to(kernel_device) for x in inputs)
    targets = targets.to(kernel_device)
    gen = torch.Generator().manual_seed(6)
    v = {
        n: torch.randn(2, *p.shape, generator=gen).to(kernel_device)
        for n, p in model.named_parameters()
    }
    hvp = functools.partial(hessfast.hvp, model, loss_fn, inputs, targets, v)
    got = hvp(backend="triton")
    _check_traced(
        model,
        inputs,
        {"triton_sdpa_fwd_jvp", "triton_sdpa_bwd_jvp", "triton_norm_fwd_jvp", "triton_dual_gemm"},
    )
    _assert_close(got, hvp(backend="torch"))
    again = _replay_without_rules(lambda: hvp(backend="triton"))
    _assert_close(again, got, rtol=1e-6, atol=1e-7)


def test_fused_cross_entropy_head_traces_the_triton_rows(kernel_device, monkeypatch):
    """A linear head on ``[B, T, D]`` features with ``ignore_index`` and smoothing, rows in
    ragged chunks: the row op is a graph node, and the graph replayed on targets with another
    number of ignored rows gives that batch's answer (the mean's denominator is not baked in)."""
    monkeypatch.setattr(engine, "FUSE_HEAD", True)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 3)
    dev = kernel_device
    torch.manual_seed(0)
    model = nn.Linear(6, 37).to(dev)
    x = torch.randn(2, 4, 6, device=dev)
    y = torch.randint(0, 37, (2, 4), device=dev)
    y[0, 1] = -100
    loss = functools.partial(F.cross_entropy, label_smoothing=0.1)
    v = {n: torch.randn(2, *p.shape, device=dev) for n, p in model.named_parameters()}
    got = hessfast.hvp(model, loss, x, y, v, backend="triton")
    _check_traced(model, (x,), {"triton_ce_rows"})
    _assert_close(got, hessfast.hvp(model, loss, x, y, v, backend="torch"))
    y2 = y.clone()
    y2[1, :3] = -100
    again = _replay_without_rules(lambda: hessfast.hvp(model, loss, x, y2, v, backend="triton"))
    _assert_close(again, hessfast.hvp(model, loss, x, y2, v, backend="torch"))
