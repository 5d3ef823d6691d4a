"""The cross-entropy rule's subnormal flush (``rules.cross_entropy.flush_subnormals``, issue 13).

A saturated softmax gives loss-Hessian products ``ġ_z`` with subnormal entries; on the CPU they are
set to zero when each product's largest entry is at least ``tiny / u`` (the flush is then below
float32's rounding of what follows), and left alone otherwise. Checked here: the boundary of that
rule, per product; float64 and non-CPU tensors untouched; a saturated linear head whose float32
GGN-VP and HVP match the float64 ``torch.func`` oracle with the flush visible in the result (a class
that only subnormal entries reach gets an exact zero), interpreted, traced and through the fused
head; and a case where every entry is tiny, where nothing may be flushed.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle import ggn_vp, hvp, rel_err
from torch import nn

import hessfast
from hessfast import engine
from hessfast.rules import cross_entropy as ce
from hessfast.rules.base import TORCH_TOLERANCES

F32 = torch.float32
TINY = torch.finfo(F32).tiny
#: The smallest largest-entry at which float32 flushes: tiny / u, u = 2⁻²⁴.
EDGE = TINY * 2.0**24
#: A logit gap whose softmax probability is subnormal in float32: e⁻⁹⁵ ≈ 5.5e-42.
GAP = 95.0


def subnormals(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())


def test_flush_boundary_per_product():
    """Product 0's largest entry is exactly ``tiny · 2²⁴``: its subnormals become zeros. Product 1's
    is the float32 number just below: nothing of it changes. Normal entries never change."""
    sub = torch.tensor([TINY / 2, -TINY / 8, 2.0**-149, -(2.0**-140)], dtype=F32)
    normal = torch.tensor([TINY, -3 * TINY, 1e-33], dtype=F32)  # all below EDGE
    below = torch.nextafter(torch.tensor(EDGE, dtype=F32), torch.tensor(0.0, dtype=F32))
    x = torch.stack(
        [
            torch.cat([sub, normal, torch.tensor([-EDGE], dtype=F32)]),
            torch.cat([sub, normal, below[None]]),
        ]
    ).reshape(2, 2, 4)
    before = x.clone()
    out = ce.flush_subnormals(x)
    assert subnormals(before[0]) == 4 and subnormals(before[1]) == 4
    expect0 = before[0].clone()
    expect0[expect0.abs() < TINY] = 0
    assert torch.equal(out[0], expect0) and subnormals(out[0]) == 0
    assert torch.equal(out[1], before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flush_boundary_half_precision(dtype):
    """The same rule with the 16-bit types' own ``tiny`` and ``u``."""
    info = torch.finfo(dtype)
    edge = info.tiny * 2 / info.eps
    sub = info.tiny / 4
    x = torch.tensor([[sub, edge], [sub, edge / 2]], dtype=dtype)
    assert subnormals(x) == 2
    out = ce.flush_subnormals(x.clone())
    assert out[0, 0] == 0 and out[0, 1] == edge
    assert torch.equal(out[1], x[1])


def test_flush_leaves_float64_and_other_devices_alone():
    tiny64 = torch.finfo(torch.float64).tiny
    x = torch.tensor([[tiny64 / 4, 1.0]], dtype=torch.float64)
    assert torch.equal(ce.flush_subnormals(x.clone()), x)
    meta = torch.empty(2, 3, device="meta")
    assert ce.flush_subnormals(meta) is meta


def _saturated_head(all_saturated: bool = False):
    """A bias-free linear head ``z = x Wᵀ`` (W ≈ I) on 8 rows and 6 classes. Rows 4–7 (all rows
    with ``all_saturated``) are saturated: one class leads every other by :data:`GAP`. Class 5
    trails the leader of every row by :data:`GAP`, so only subnormal entries of ``ġ_z`` reach
    ``ġ_W[5]``."""
    g = torch.Generator().manual_seed(0)
    n, v = 8, 6
    x = 2 * torch.randn(n, v, generator=g)
    for r in range(n):
        if all_saturated or r >= 4:
            x[r] = -GAP
            x[r, r % 5] = 0.0
    x[:, 5] = x[:, :5].amax(1) - GAP
    head = nn.Linear(v, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v) + 1e-3 * torch.randn(v, v, generator=g))
    y = torch.randint(0, 5, (n,), generator=g)
    vec = {"weight": torch.randn(2, v, v, generator=g)}
    return head, x, y, vec


def _ggn_dz(head, x, y, vec):
    """The rule's ``ġ_z`` for the head's tangents, and the same without the flush."""
    z = head(x).detach()
    zdot = torch.einsum("nd,kvd->knv", x, vec["weight"])
    rule = ce.CrossEntropyLoss(y)
    _, _, gd = rule.evaluate(z, zdot, "ggn")
    logp = torch.log_softmax(z, -1)
    neg_a = torch.ops.aten.nll_loss_backward(
        torch.ones(()), logp, y, None, 1, -100, torch.tensor(float(len(y)))
    )
    raw = -neg_a.sum(-1, keepdim=True) * torch.ops.aten._softmax_backward_data(
        zdot, logp.exp().expand_as(zdot), -1, F32
    )
    return gd, raw


def test_rule_flushes_a_saturated_softmax():
    """Normal rows keep ``max|ġ_z|`` far above the edge: the rule's ``ġ_z`` is the formula's with
    its subnormals zeroed, bit for bit elsewhere."""
    head, x, y, vec = _saturated_head()
    gd, raw = _ggn_dz(head, x, y, vec)
    assert subnormals(raw) > 0 and float(raw.abs().amax()) > EDGE
    assert subnormals(gd) == 0
    expect = raw.masked_fill(raw.abs() < TINY, 0.0)
    assert torch.equal(gd, expect)


def test_rule_keeps_subnormals_when_everything_is_tiny():
    """Every row saturated: every entry of ``ġ_z`` is below the edge, the subnormals carry the
    whole product and are kept (the rule's ``ġ_z`` is the formula's, bit for bit)."""
    head, x, y, vec = _saturated_head(all_saturated=True)
    gd, raw = _ggn_dz(head, x, y, vec)
    assert subnormals(raw) > 0 and float(raw.abs().amax()) < EDGE
    assert torch.equal(gd, raw)
    assert subnormals(gd) == subnormals(raw)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-head"])
@pytest.mark.parametrize("compile", ["interpret", None], ids=["interpret", "traced"])
@pytest.mark.parametrize("mode", ["ggn", "hvp"])
def test_saturated_head_matches_oracle(monkeypatch, mode, compile, fused):
    """The float32 product of the saturated head against the float64 ``torch.func`` oracle at the
    declared float32 tolerance; ``ġ_W[5]`` (reached only by subnormal entries of ``ġ_z``) is an
    exact zero in GGN mode where float64 has values below 1e-35: the flush ran."""
    monkeypatch.setattr(engine, "FUSE_HEAD", fused)
    head, x, y, vec = _saturated_head()
    hessfast.clear_cache()
    fn = hessfast.ggn_vp if mode == "ggn" else hessfast.hvp
    out = fn(head, F.cross_entropy, (x,), y, vec, compile=compile)
    hessfast.clear_cache()
    ref_fn = ggn_vp if mode == "ggn" else hvp
    head64 = nn.Linear(6, 6, bias=False).double()
    with torch.no_grad():
        head64.weight.copy_(head.weight)
    ref = ref_fn(head64, F.cross_entropy, (x.double(),), y, {"weight": vec["weight"].double()})
    rtol = TORCH_TOLERANCES[F32][0]
    for k in range(2):
        err = rel_err({"w": out["weight"][k].double()}, {"w": ref["weight"][k]})
        assert err < rtol, (k, err)
        row5 = ref["weight"][k, 5]
        assert 0 < float(row5.abs().max()) < 1e-35
        if mode == "ggn":  # in hvp mode ḡ_z's own (subnormal) entries reach ġ_W[5] too
            assert torch.equal(out["weight"][k, 5], torch.zeros(6))


def test_saturated_head_without_flush_has_subnormals(monkeypatch):
    """The counterfactual of the test above: with the flush patched out, ``ġ_W[5]`` is not zero
    (its ~1e-37 values: the subnormal entries of ``ġ_z`` times ``x ≈ 95``), so the exact zero there
    is the flush's doing."""
    monkeypatch.setattr(engine, "FUSE_HEAD", False)
    monkeypatch.setattr(ce, "flush_subnormals", lambda t: t)
    head, x, y, vec = _saturated_head()
    hessfast.clear_cache()
    out = hessfast.ggn_vp(head, F.cross_entropy, (x,), y, vec, compile="interpret")
    hessfast.clear_cache()
    row5 = out["weight"][:, 5]
    assert bool((row5 != 0).all()) and float(row5.abs().max()) < 1e-35
