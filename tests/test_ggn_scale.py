"""GGN mode's power-of-two scale of ``ġ_z`` (``hessfast.subnormal``, issue 13).

A saturated softmax gives loss-Hessian products ``ġ_z`` with subnormal entries, which on the CPU the
GGN backward pass would compute on throughout. The engine scales ``ġ_z`` per product by a power of
two that brings its largest entry to ``[½, 1)`` and scales the products back at the end. Checked
here: the scale itself; saturated heads (a linear head and a two-layer one, half or wholly
saturated, unfused and through the fused head with chunks whose maxima grow) and a small tied
GPT-like model against the float64 ``torch.func`` oracle, interpreted and traced; no subnormal in
the backward outputs of a wholly saturated model with products of very different scales, some
without the scale; the scale's exactness (bit for bit the unscaled products on a model without
subnormals; a trace made on one batch forms the next batch's scale); float64 and HVP mode
untouched; an all-zero tangent next to a saturated one.
"""

import pytest
import torch
import torch.nn.functional as F
from models.saturated import ggn_oracle, product_errors, saturated_head, subnormals
from oracle import rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hessfast
from hessfast import engine, subnormal, traced
from hessfast.rules import cross_entropy as ce
from hessfast.rules.base import TORCH_TOLERANCES

F32 = torch.float32
TINY = torch.finfo(F32).tiny
RTOL = TORCH_TOLERANCES[F32][0]
LOW = (F32, torch.bfloat16)


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for a in x:
            yield from _leaves(a)


@pytest.fixture
def backward_subnormals(monkeypatch):
    """The number of subnormal float32 and bfloat16 entries in the outputs of every backward-pass
    rule the interpreter runs (``engine._timed``'s ``"backward"`` phase), as a one-element list."""
    count = [0]
    timed = engine._timed

    def counting(profiler, step, rule, phase, inputs, fn, *args):
        out = timed(profiler, step, rule, phase, inputs, fn, *args)
        if phase == "backward":
            count[0] += sum(subnormals(t) for t in _leaves(out) if t.dtype in LOW)
        return out

    monkeypatch.setattr(engine, "_timed", counting)
    return count


class Ops(TorchDispatchMode):
    """Records the aten overloads that run."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_scale(monkeypatch):
    """The scale patched out: the counterfactual of every test here."""
    monkeypatch.setattr(subnormal, "applies", lambda x: False)


@pytest.fixture(autouse=True)
def _fresh_cache():
    hessfast.clear_cache()
    yield
    hessfast.clear_cache()


def test_pow2_scale():
    """Largest entry to ``[½, 1)`` by an exact power of two, per product; 1 for an all-zero or
    non-finite product; the exponent clamped to ±126 (a normal float32 either way)."""
    x = torch.tensor(
        [
            [1e-40, -3e-41, 0.0],
            [0.0, 0.0, 0.0],
            [float("nan"), 1.0, 0.0],
            [float("inf"), 1.0, 0.0],
            [3.0, -5.0, 0.5],
            [2.0**-149, 0.0, 0.0],
            [3e38, 1.0, 0.0],
            [1e-29, 0.0, 2e-29],
        ],
        dtype=F32,
    )
    s = subnormal.pow2_scale(x)
    assert s.dtype == F32 and s.shape == (8,)
    mant, _ = torch.frexp(s)
    assert bool((mant == 0.5).all())  # powers of two
    assert bool((s >= 2.0**-126).all()) and bool((s <= 2.0**126).all())
    top = (x.abs().amax(1) * s)[[4, 7]]
    assert bool((top >= 0.5).all()) and bool((top < 1).all())
    assert s[1] == 1 and s[2] == 1 and s[3] == 1
    assert s[0] == 2.0**126 and s[5] == 2.0**126  # clamped: 1e-40 = 0.56 · 2⁻¹³²
    assert s[6] == 2.0**-126
    assert torch.equal(subnormal.pow2_scale(x.reshape(8, 3, 1)), s)
    with pytest.raises(ValueError, match="K, ..."):
        subnormal.pow2_scale(torch.tensor(1.0))


def test_applies():
    assert subnormal.applies(torch.zeros(1))
    assert subnormal.applies(torch.zeros(1, dtype=torch.bfloat16))
    assert not subnormal.applies(torch.zeros(1, dtype=torch.float64))
    assert not subnormal.applies(torch.zeros(1, dtype=torch.float16))
    assert not subnormal.applies(torch.empty(1, device="meta"))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-head"])
@pytest.mark.parametrize("compile", ["interpret", None], ids=["interpret", "traced"])
@pytest.mark.parametrize("pre", [False, True], ids=["head", "two-layer"])
def test_saturated_head_matches_oracle(monkeypatch, pre, compile, fused):
    """Float32 GGN-VPs of half-saturated heads against the float64 oracle at the declared
    tolerance. The fused head runs in chunks of two rows with the saturated rows first, so its
    running maximum grows from ~1e-42 to ~0.1: the accumulators and the earlier chunks' rows of
    ``ġ_h`` are rescaled by ~2⁻¹³⁰ (a missed rescale is off by that factor)."""
    monkeypatch.setattr(engine, "FUSE_HEAD", fused)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 2)
    model, x, y, vec = saturated_head(pre, saturated_first=True)
    out = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile=compile)
    ref = ggn_oracle(model, x, y, vec)
    for k in range(2):
        err = rel_err({n: out[n][k].double() for n in out}, {n: ref[n][k] for n in ref})
        assert err < RTOL, (k, err)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-head"])
@pytest.mark.parametrize("compile", ["interpret", None], ids=["interpret", "traced"])
@pytest.mark.parametrize("pre", [False, True], ids=["head", "two-layer"])
def test_all_saturated_matches_oracle(monkeypatch, pre, compile, fused):
    """Every row saturated: all of ``ġ_z`` is subnormal (~1e-42) and every product is below 1e-35.
    Scaled, each parameter of each product matches the oracle to the declared tolerance in the
    max-norm (the softmax's own subnormal ``p`` limits what any float32 computation can do here)."""
    monkeypatch.setattr(engine, "FUSE_HEAD", fused)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 3)
    model, x, y, vec = saturated_head(pre, all_saturated=True)
    out = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile=compile)
    ref = ggn_oracle(model, x, y, vec)
    assert max(float(t.abs().max()) for t in ref.values()) < 1e-35
    assert max(product_errors(out, ref)) < RTOL


def test_all_saturated_backward_has_no_subnormals(backward_subnormals):
    """K = 2 with product 0's tangent ``2¹⁰⁰`` times larger (its ``ġ_z`` ~1e-12, product 1's
    ~1e-42): a scale per product leaves no subnormal in the backward pass (one scale for both
    would leave product 1 subnormal), and both products match the oracle."""
    model, x, y, vec = saturated_head(pre=True, all_saturated=True)
    vec = {n: t * torch.tensor([2.0**100, 1.0]).reshape(2, 1, 1) for n, t in vec.items()}
    out = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile="interpret")
    assert backward_subnormals[0] == 0
    assert max(product_errors(out, ggn_oracle(model, x, y, vec))) < RTOL


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-head"])
def test_all_saturated_bfloat16(monkeypatch, backward_subnormals, fused):
    """bfloat16 (float32's exponent range, so the same subnormals; a gap of 88, as e⁻⁹⁵ underflows
    to zero in bfloat16): scaled, no subnormal in the backward outputs, some unscaled (unfused),
    and the two products agree to bfloat16's declared tolerance (bfloat16's own ``ġ_z`` of so
    saturated a softmax is too coarse for an oracle comparison to say more)."""
    monkeypatch.setattr(engine, "FUSE_HEAD", fused)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 3)
    bf = torch.bfloat16
    model, x, y, vec = saturated_head(pre=True, all_saturated=True, gap=88.0)
    args = (model.to(bf), F.cross_entropy, (x.to(bf),), y, {n: t.to(bf) for n, t in vec.items()})
    out = hessfast.ggn_vp(*args, compile="interpret")
    assert all(t.dtype == bf for t in out.values())
    assert backward_subnormals[0] == 0
    monkeypatch.setattr(subnormal, "applies", lambda x: False)
    off = hessfast.ggn_vp(*args, compile="interpret")
    if not fused:  # fused, the head's own GEMMs (not counted here) see them, ġ_h none
        assert backward_subnormals[0] > 0
    off64 = {n: t.double() for n, t in off.items()}
    assert max(product_errors(out, off64)) < TORCH_TOLERANCES[bf][0]


def test_all_saturated_backward_without_scale_has_subnormals(backward_subnormals, no_scale):
    model, x, y, vec = saturated_head(pre=True, all_saturated=True)
    hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile="interpret")
    assert backward_subnormals[0] > 0


class TiedLM(nn.Module):
    """A tied-embedding language model in miniature: embedding, one MLP block with a residual,
    layer norm without affine, logits ``h Eᵀ``. Embeddings of scale 4 over 32 dims make the softmax
    saturate (logit gaps of hundreds)."""

    def __init__(self, vocab: int = 40, dim: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.emb.weight.copy_(4 * torch.randn(vocab, dim, generator=g))

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        h = F.layer_norm(h, h.shape[-1:])
        return h @ self.emb.weight.t()


def _tied(seed=1, k=2):
    torch.manual_seed(0)
    model = TiedLM()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (2, 12), generator=g)
    y = torch.randint(0, 40, (2, 12), generator=g)
    vec = {n: torch.randn(k, *p.shape, generator=g) for n, p in model.named_parameters()}
    return model, ids, y, vec


def _lm_loss(z, y):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("compile", ["interpret", None], ids=["interpret", "traced"])
def test_tied_lm_matches_oracle(compile):
    model, ids, y, vec = _tied()
    out = hessfast.ggn_vp(model, _lm_loss, (ids,), y, vec, compile=compile)
    ref = ggn_oracle(model, ids, y, vec, _lm_loss)
    for k in range(2):
        err = rel_err({n: out[n][k].double() for n in out}, {n: ref[n][k] for n in ref})
        assert err < RTOL, (k, err)


def test_tied_lm_has_fewer_subnormals(monkeypatch, backward_subnormals):
    """Partly saturated rows: ``ġ_z``'s entries span more than float32's normal range within one
    product, and what lies more than 2¹²⁶ below the product's largest entry stays subnormal after
    the scale (negligible, see ``hessfast.subnormal``). The scale removes most: here at least 4×
    fewer subnormal entries in the backward outputs than unscaled (408 → 78 when written)."""
    model, ids, y, vec = _tied()
    hessfast.ggn_vp(model, _lm_loss, (ids,), y, vec, compile="interpret")
    scaled = backward_subnormals[0]
    backward_subnormals[0] = 0
    monkeypatch.setattr(subnormal, "applies", lambda x: False)
    hessfast.ggn_vp(model, _lm_loss, (ids,), y, vec, compile="interpret")
    assert 4 * scaled < backward_subnormals[0]


def test_float64_and_hvp_are_not_scaled(monkeypatch):
    """No scale is formed in float64 (GGN) nor in HVP mode (float32)."""

    def boom(x):
        raise AssertionError("scaled")

    monkeypatch.setattr(subnormal, "pow2_scale", boom)
    model, ids, y, vec = _tied()
    hessfast.hvp(model, _lm_loss, (ids,), y, vec, compile="interpret")
    m64 = TiedLM().double()
    v64 = {n: t.double() for n, t in vec.items()}
    hessfast.ggn_vp(m64, _lm_loss, (ids,), y, v64, compile="interpret")
    with pytest.raises(AssertionError, match="scaled"):
        hessfast.ggn_vp(model, _lm_loss, (ids,), y, vec, compile="interpret")


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 5, (32,), generator=g)
    vec = {n: torch.randn(3, *p.shape, generator=g) for n, p in model.named_parameters()}
    return model, x, y, vec


@pytest.mark.parametrize("compile", ["interpret", None], ids=["interpret", "traced"])
def test_exact_without_subnormals(monkeypatch, compile):
    """On a model whose backward has no subnormal, the scaled products equal the unscaled ones bit
    for bit (powers of two change no rounding)."""
    model, x, y, vec = _mlp()
    on = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile=compile)
    hessfast.clear_cache()
    monkeypatch.setattr(subnormal, "applies", lambda x: False)
    off = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile=compile)
    for n in on:
        assert torch.equal(on[n], off[n]), n


def test_trace_reused_for_another_scale():
    """A trace made for one batch computes the scale of the next: the second batch's tangents are
    ``2⁻⁶⁰`` times the first's, through the same trace (no new one), which forms the scale
    (``aten.frexp`` runs in it), and its products are exactly ``2⁻⁶⁰`` times the first's."""
    model, x, y, vec = _mlp()
    c = 2.0**-60
    first = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, vec, compile=None)
    before = traced.TRACE_COUNT
    small = {n: t * c for n, t in vec.items()}
    with Ops() as ops:
        second = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, small, compile=None)
    assert traced.TRACE_COUNT == before
    assert torch.ops.aten.frexp.Tensor in ops.seen
    for n in first:
        assert torch.equal(second[n], first[n] * c), n


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-head"])
def test_zero_tangent(monkeypatch, fused):
    """An all-zero tangent (``ġ_z = 0``: scale 1) next to a saturated one: zeros, and the other
    product as when it runs alone."""
    monkeypatch.setattr(engine, "FUSE_HEAD", fused)
    model, x, y, vec = saturated_head(pre=True)
    zero = {n: torch.stack([torch.zeros_like(t[0]), t[0]]) for n, t in vec.items()}
    out = hessfast.ggn_vp(model, F.cross_entropy, (x,), y, zero, compile="interpret")
    alone = hessfast.ggn_vp(
        model, F.cross_entropy, (x,), y, {n: t[:1] for n, t in vec.items()}, compile="interpret"
    )
    for n in out:
        assert torch.equal(out[n][0], torch.zeros_like(out[n][0])), n
        torch.testing.assert_close(out[n][1], alone[n][0], rtol=RTOL, atol=0)
