"""CUDA softmax cross-entropy rows (``csrc/cross_entropy.cu``, ``hessfast/cuda/cross_entropy.py``).

The interface ``rows(z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad) ->
(loss_rows, gz, gdz)`` against an independent float64 oracle: the loss rows are ``scale ×
F.cross_entropy(..., reduction="none")`` (torch's own weights, ignore_index and label smoothing),
the gradient is autograd's and the Hessian-vector rows are ``torch.func.jvp`` of that gradient.
On ``cpu`` the op runs its CPU implementation (the same online softmax and row algebra,
``csrc/cross_entropy.cuh``), on ``cuda`` the kernel (skipped without a GPU). float32 at the
declared tolerance, bfloat16 and float16 within 2× the error of the plain-torch reference
``cross_entropy_rows_ref`` on the same low-precision inputs, float64 (CPU only) to
1e-10; odd vocabularies (a tail that is not a whole 16-byte pack), one class, one row, K = 1, 7
and 40 (more than one kernel launch of 32 tangents), ignored rows, class weights, label smoothing,
logits that grow along the row (the online rescaling), masked ``-inf`` classes, large offsets,
``want_grad=False`` and ``zdot=None``, non-contiguous inputs, determinism and K-batched = loop.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from hessfast.cuda.cross_entropy import IMPLEMENTATIONS, OP
from hessfast.rules import rule_for
from hessfast.rules.base import Call
from hessfast.rules.cross_entropy import cross_entropy_rows_ref

D = torch.float64
IMPL = IMPLEMENTATIONS[0]
IGNORE = -100


def oracle(z, zdot, target, weight, eps, scale):
    """float64 ``(loss_rows, gz, gdz)`` by autograd through ``F.cross_entropy``."""

    def rows(zz):
        return scale * F.cross_entropy(
            zz, target, weight=weight, ignore_index=IGNORE, reduction="none", label_smoothing=eps
        )

    def total(zz):
        return rows(zz).sum()

    gz = grad(total)(z)
    gdz = None
    if zdot is not None:
        gdz = torch.stack([jvp(grad(total), (z,), (u,))[1] for u in zdot])
    return rows(z), gz, gdz


def make(m, v, k, seed, spread=3.0, weights=False, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(m, v, dtype=D, generator=gen)
    zdot = torch.randn(k, m, v, dtype=D, generator=gen) if k else None
    target = torch.randint(0, v, (m,), generator=gen)
    if ignore and m > 2:
        target[1] = IGNORE
    weight = torch.rand(v, dtype=D, generator=gen) + 0.5 if weights else None
    return z, zdot, target, weight


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(z, zdot, target, weight, eps, scale, dtype, dev, impl=IMPL):
    want = oracle(z, zdot, target, weight, eps, scale)
    args = (
        z.to(dev, dtype),
        None if zdot is None else zdot.to(dev, dtype),
        target.to(dev),
        None if weight is None else weight.to(dev),
        IGNORE,
        eps,
        scale,
        True,
    )
    call = Call(OP, args, (), (), 0 if zdot is None else zdot.shape[0])
    assert not impl.not_supported_reasons(call)
    got = impl.rows(*args)
    assert got[0].dtype == (D if dtype == D else torch.float32)
    assert got[1].dtype == dtype and (got[2] is None or got[2].dtype == dtype)
    if dtype in (torch.bfloat16, torch.float16):
        base = cross_entropy_rows_ref(*args[:7], True)
        for what, a, b, c in zip(("loss", "gz", "gdz"), got, want, base):
            if b is not None:
                limit = max(2 * rel(c.cpu(), b), impl.tolerances[dtype][1])
                assert rel(a.cpu(), b) <= limit, f"{what}: {rel(a.cpu(), b):.2e} > {limit:.2e}"
        return
    rtol, atol = impl.tolerances[dtype]
    for what, a, b in zip(("loss", "gz", "gdz"), got, want):
        if b is not None:
            torch.testing.assert_close(
                a.cpu().double(), b, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}"
            )


SHAPES = {"odd-vocab": (5, 37, 3), "one-class": (3, 1, 2), "one-row": (1, 200, 1), "k7": (4, 64, 7)}


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "weights,eps", [(False, 0.0), (True, 0.1)], ids=["plain", "weighted-smoothed"]
)
def test_matches_oracle(shape, weights, eps, dtype, dev):
    m, v, k = SHAPES[shape]
    z, zdot, target, weight = make(m, v, k, seed=1, weights=weights)
    check(z, zdot, target, weight, eps, 0.25, dtype, dev)


@pytest.mark.parametrize("weights,eps", [(False, 0.0), (False, 0.2), (True, 0.0), (True, 1.0)])
def test_header_math_float64(weights, eps, ext, float64_probe):
    z, zdot, target, weight = make(6, 29, 3, seed=2, weights=weights)
    check(z, zdot, target, weight, eps, 1 / 3, D, torch.device("cpu"), impl=float64_probe(IMPL))


def test_many_tangents_span_several_launches(dev):
    z, zdot, target, weight = make(3, 50, 40, seed=3, weights=True)
    check(z, zdot, target, weight, 0.05, 1.0, torch.float32, dev)


def test_online_rescaling_masked_classes_and_large_offsets(dev):
    """Logits that grow along every row (the running max changes at each step), classes masked
    with -inf, and rows offset by 1e4 (exp would overflow without the max)."""
    z, zdot, target, _ = make(4, 300, 2, seed=4, ignore=False)
    z = z + torch.linspace(0, 30, 300, dtype=D)
    z[0, ::3] = -torch.inf
    target[0] = 1
    z[2] += 1e4
    want = oracle(z, zdot, target, None, 0.0, 1.0)
    got = IMPL.rows(
        z.float().to(dev), zdot.float().to(dev), target.to(dev), None, IGNORE, 0.0, 1.0, True
    )
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4)


def test_ignored_rows_and_absent_outputs(dev):
    z, zdot, target, _ = make(4, 33, 2, seed=5)
    target[:] = IGNORE
    loss, gz, gdz = IMPL.rows(
        z.float().to(dev), zdot.float().to(dev), target.to(dev), None, IGNORE, 0.1, 1.0, True
    )
    assert not loss.any() and not gz.any() and not gdz.any()
    loss2, gz2, gdz2 = IMPL.rows(
        z.float().to(dev), None, target.to(dev), None, IGNORE, 0.1, 1.0, False
    )
    assert gz2 is None and gdz2 is None and torch.equal(loss2, loss)


def test_without_grad_or_tangents_the_rest_is_unchanged(dev):
    z, zdot, target, weight = make(5, 41, 3, seed=6, weights=True)
    args = (
        z.float().to(dev),
        zdot.float().to(dev),
        target.to(dev),
        weight.to(dev),
        IGNORE,
        0.1,
        0.5,
    )
    loss, gz, gdz = IMPL.rows(*args, True)
    loss1, gz1, gdz1 = IMPL.rows(*args, False)
    assert gz1 is None and torch.equal(loss1, loss) and torch.equal(gdz1, gdz)
    loss2, gz2, gdz2 = IMPL.rows(args[0], None, *args[2:], True)
    assert gdz2 is None and torch.equal(loss2, loss) and torch.equal(gz2, gz)


def test_out_of_range_target_gives_nan_rows(dev):
    z, _, target, _ = make(3, 10, 0, seed=7, ignore=False)
    target[1] = 10
    loss, gz, _ = IMPL.rows(z.float().to(dev), None, target.to(dev), None, IGNORE, 0.0, 1.0, True)
    assert torch.isnan(loss[1]) and torch.isnan(gz[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(gz[[0, 2]]).all()


def test_non_contiguous_inputs(dev):
    z, zdot, target, weight = make(6, 20, 2, seed=8, weights=True)
    zt = z.t().contiguous().t()
    ut = zdot.transpose(1, 2).contiguous().transpose(1, 2)
    assert not zt.is_contiguous() and not ut.is_contiguous()
    got = IMPL.rows(
        zt.float().to(dev),
        ut.float().to(dev),
        target.to(dev),
        weight.to(dev),
        IGNORE,
        0.1,
        1.0,
        True,
    )
    want = IMPL.rows(
        z.float().to(dev),
        zdot.float().to(dev),
        target.to(dev),
        weight.to(dev),
        IGNORE,
        0.1,
        1.0,
        True,
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_k_batched_equals_loop_and_is_deterministic(dev):
    z, zdot, target, weight = make(5, 70, 5, seed=9, weights=True)
    z, zdot, target, weight = (
        z.float().to(dev),
        zdot.float().to(dev),
        target.to(dev),
        weight.to(dev),
    )
    got = IMPL.rows(z, zdot, target, weight, IGNORE, 0.1, 1.0, True)
    again = IMPL.rows(z, zdot, target, weight, IGNORE, 0.1, 1.0, True)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    for k in range(5):
        one = IMPL.rows(z, zdot[k : k + 1], target, weight, IGNORE, 0.1, 1.0, True)
        assert torch.equal(one[0], got[0]) and torch.equal(one[1], got[1])
        torch.testing.assert_close(one[2][0], got[2][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(3), None, torch.zeros(3, dtype=torch.long), None, -100, 0.0, 1.0, True),
        (
            torch.randn(3, 4),
            torch.randn(2, 3, 5),
            torch.zeros(3, dtype=torch.long),
            None,
            -100,
            0.0,
            1.0,
            True,
        ),
        (torch.randn(3, 4), None, torch.zeros(4, dtype=torch.long), None, -100, 0.0, 1.0, True),
        (torch.randn(3, 4), None, torch.zeros(3), None, -100, 0.0, 1.0, True),
        (
            torch.randn(3, 4),
            None,
            torch.zeros(3, dtype=torch.long),
            torch.ones(5),
            -100,
            0.0,
            1.0,
            True,
        ),
        (torch.randn(3, 4), None, torch.zeros(3, dtype=torch.long), None, -100, 1.5, 1.0, True),
    ],
    ids=[
        "1-d-logits",
        "tangent-shape",
        "target-shape",
        "float-target",
        "weight-shape",
        "smoothing",
    ],
)
def test_declines_with_a_reason(args):
    why = IMPL.not_supported_reasons(Call(OP, args, (), (), 0))
    assert why and all(isinstance(w, str) and w for w in why)


def test_op_rejects_bad_arguments_naming_them(ext):
    z, t = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    op = torch.ops.hessfast.cross_entropy_rows
    with pytest.raises(RuntimeError, match="argument 'target' must have dtype Long"):
        op(z, None, t.int(), None, -100, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="argument 'weight' must have shape"):
        op(z, None, t, torch.ones(3), -100, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="label_smoothing must lie in"):
        op(z, None, t, None, -100, -0.1, 1.0, True)
    with pytest.raises(RuntimeError, match="argument 'zdot' must be contiguous"):
        op(z, torch.randn(3, 4, 2).permute(2, 0, 1), t, None, -100, 0.0, 1.0, True)


def test_opcheck(dev):
    z, zdot, target, weight = make(4, 9, 2, seed=10, weights=True)
    z, zdot, target, weight = (
        z.float().to(dev),
        zdot.float().to(dev),
        target.to(dev),
        weight.float().to(dev),
    )
    op = torch.ops.hessfast.cross_entropy_rows.default
    torch.library.opcheck(op, (z, zdot, target, weight, IGNORE, 0.1, 0.5, True))
    torch.library.opcheck(op, (z, None, target, None, IGNORE, 0.0, 1.0, False))


def test_dispatch_picks_cuda_rows_on_a_gpu_only_where_measured(gpu, monkeypatch):
    from hessfast import dispatch

    monkeypatch.delenv("HESSFAST_SELFCHECK", raising=False)
    z, zdot, target, _ = make(2, 5, 1, seed=11)
    args = (z.float().to(gpu), zdot.float().to(gpu), target.to(gpu), None, IGNORE, 0.0, 1.0, True)
    call = Call(OP, args, (), (), 1)
    assert rule_for(OP, call, "auto") is not IMPL  # no committed GPU benchmark
    monkeypatch.setitem(dispatch.MEASURED, ("cuda", IMPL.name), {torch.float32: "(test)"})
    assert rule_for(OP, call, "auto") is IMPL  # measured, and its self-check passed
