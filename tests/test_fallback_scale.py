"""GGN mode's power-of-two scale of ``ġ_z`` in the whole-loss autograd fallback (issue 13).

Models that ``torch.export`` cannot capture (a data-dependent Python branch on the input) run on
:mod:`hessfast.autograd_fallback`, which computes a GGN-VP as ``J v``, the loss Hessian's product
``ġ_z``, then one VJP per product. On the CPU in float32 and bfloat16 that VJP gets ``ġ_z`` scaled
by a power of two per product and the products are scaled back (:mod:`hessfast.subnormal`), as in
the engine. Checked here: saturated softmax heads against the float64 ``torch.func`` oracle; the
subnormal entries the fallback's backward passes produce, scaled and unscaled (float32, and
bfloat16); the scale's exactness on a model without subnormals; float64, HVP and residual mode
untouched.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from models.saturated import GAP, ggn_oracle, product_errors, saturated_head, subnormals
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hessfast
from hessfast import subnormal
from hessfast.rules.base import TORCH_TOLERANCES

F32 = torch.float32
BF16 = torch.bfloat16
RTOL = TORCH_TOLERANCES[F32][0]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:hessfast could not capture"),
]


class Branchy(nn.Module):
    """``net(x)`` behind a Python branch on the input's values: ``torch.export`` refuses it, so
    hessfast computes it with the autograd fallback (both branches compute the same)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.sum() > 0:
            return self.net(x)
        return self.net(x.clone())


def _saturated(pre: bool, all_saturated: bool = False, gap: float = GAP):
    """:func:`~models.saturated.saturated_head` (rows 4–7, or all, saturated) behind
    :class:`Branchy`."""
    model, x, y, vec = saturated_head(pre, all_saturated=all_saturated, gap=gap)
    return Branchy(model), x, y, {f"net.{n}": t for n, t in vec.items()}


def _mlp():
    """A tanh MLP behind :class:`Branchy`, 32 rows, 5 classes, far from saturation."""
    torch.manual_seed(0)
    model = Branchy(nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 5, (32,), generator=g)
    vec = {n: torch.randn(3, *p.shape, generator=g) for n, p in model.named_parameters()}
    return model, x, y, vec


def _fallback_ggn_vp(model, x, y, vec):
    """``hessfast.ggn_vp`` through the autograd fallback (the capture warning is asserted)."""
    with pytest.warns(UserWarning, match="could not capture Branchy"):
        return hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec)


class _Subnormals(TorchDispatchMode):
    """Counts the subnormal float32 and bfloat16 entries in the outputs of every aten op."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype in (F32, BF16):
                self.count += subnormals(t)
        return out


@pytest.fixture
def backward_subnormals(monkeypatch):
    """The number of subnormal float32 and bfloat16 entries in the outputs of the ops that run
    inside ``torch.autograd.grad`` (the fallback's backward passes), as a one-element list."""
    count = [0]
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        with _Subnormals() as mode:
            out = grad(*args, **kwargs)
        count[0] += mode.count
        return out

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return count


@pytest.fixture(autouse=True)
def _fresh_cache():
    hessfast.clear_cache()
    yield
    hessfast.clear_cache()


@pytest.mark.parametrize("all_saturated", [False, True], ids=["half", "all"])
@pytest.mark.parametrize("pre", [False, True], ids=["head", "two-layer"])
def test_fallback_saturated_head_matches_oracle(pre, all_saturated):
    """Float32 GGN-VPs of half- or wholly saturated heads through the fallback against the float64
    oracle at the declared float32 tolerance, every parameter of every product in the max-norm
    (wholly saturated: every product is below 1e-35)."""
    model, x, y, vec = _saturated(pre, all_saturated=all_saturated)
    out = _fallback_ggn_vp(model, x, y, vec)
    ref = ggn_oracle(model, x, y, vec)
    if all_saturated:
        assert max(float(t.abs().max()) for t in ref.values()) < 1e-35
    assert max(product_errors(out, ref)) < RTOL


def test_fallback_backward_has_no_subnormals(monkeypatch, backward_subnormals):
    """Wholly saturated, K = 2 with product 0's tangent ``2¹⁰⁰`` times larger (its ``ġ_z`` ~1e-12,
    product 1's ~1e-42): scaled per product, the fallback's backward passes produce no subnormal
    and both products match the oracle; unscaled, they produce many."""
    model, x, y, vec = _saturated(pre=True, all_saturated=True)
    vec = {n: t * torch.tensor([2.0**100, 1.0]).reshape(2, 1, 1) for n, t in vec.items()}
    out = _fallback_ggn_vp(model, x, y, vec)
    assert backward_subnormals[0] == 0
    assert max(product_errors(out, ggn_oracle(model, x, y, vec))) < RTOL
    monkeypatch.setattr(subnormal, "applies", lambda t: False)
    _fallback_ggn_vp(model, x, y, vec)
    assert backward_subnormals[0] > 50


def test_fallback_bfloat16(monkeypatch, backward_subnormals):
    """bfloat16 (float32's exponent range; a gap of 88, as e⁻⁹⁵ underflows to zero in bfloat16):
    scaled, no subnormal in the backward passes, some unscaled, and the two agree to bfloat16's
    declared tolerance."""
    model, x, y, vec = _saturated(pre=True, all_saturated=True, gap=88.0)
    model = model.to(BF16)
    args = (model, x.to(BF16), y, {n: t.to(BF16) for n, t in vec.items()})
    out = _fallback_ggn_vp(*args)
    assert all(t.dtype == BF16 for t in out.values())
    assert backward_subnormals[0] == 0
    monkeypatch.setattr(subnormal, "applies", lambda t: False)
    off = _fallback_ggn_vp(*args)
    assert backward_subnormals[0] > 0
    assert (
        max(product_errors(out, {n: t.double() for n, t in off.items()}))
        < TORCH_TOLERANCES[BF16][0]
    )


def test_fallback_exact_without_subnormals(monkeypatch, backward_subnormals):
    """On a model whose backward passes produce no subnormal, the scaled products equal the
    unscaled ones bit for bit (powers of two change no rounding)."""
    model, x, y, vec = _mlp()
    on = _fallback_ggn_vp(model, x, y, vec)
    monkeypatch.setattr(subnormal, "applies", lambda t: False)
    off = _fallback_ggn_vp(model, x, y, vec)
    assert backward_subnormals[0] == 0
    for n in on:
        assert torch.equal(on[n], off[n]), n
    assert max(product_errors(on, ggn_oracle(model, x, y, vec))) < RTOL


def test_fallback_float64_hvp_and_residual_are_not_scaled(monkeypatch):
    """No scale is formed in float64 (GGN) nor in HVP or residual mode (float32); float32 GGN
    mode forms one per product."""
    calls = []
    pow2_scale = subnormal.pow2_scale

    def counting(t):
        calls.append(t.shape[0])
        return pow2_scale(t)

    monkeypatch.setattr(subnormal, "pow2_scale", counting)
    model, x, y, vec = _mlp()
    with pytest.warns(UserWarning, match="could not capture"):
        hessfast.hvp(model, F.cross_entropy, (x,), y, vec)
    with pytest.warns(UserWarning, match="could not capture"):
        hessfast.residual_vp(model, F.cross_entropy, (x,), y, vec)
    m64 = copy.deepcopy(model).double()
    _fallback_ggn_vp(m64, x.double(), y, {n: t.double() for n, t in vec.items()})
    assert calls == []
    _fallback_ggn_vp(model, x, y, vec)
    assert calls == [1, 1, 1]
