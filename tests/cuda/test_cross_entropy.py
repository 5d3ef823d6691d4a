"""CUDA softmax cross-entropy rows (``csrc/cross_entropy.cu``, ``hessfast/cuda/cross_entropy.py``).

The interface ``rows(z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad) ->
(loss_rows, gz, gdz)`` on the family's case table (``tests/cases/cross_entropy.py``, which the
Triton tests run too) against an independent float64 oracle: the loss rows are ``scale ×
F.cross_entropy(..., reduction="none")`` (torch's own weights, ignore_index and label smoothing),
the gradient is autograd's and the Hessian-vector rows are ``torch.func.jvp`` of that gradient.
On ``cpu`` the op runs its CPU implementation (the same online softmax and row algebra,
``csrc/cross_entropy.cuh``), on ``cuda`` the kernel (skipped without a GPU). float32 at the
declared tolerance, bfloat16 and float16 within 2× the error of the plain-torch reference
``cross_entropy_rows_ref`` on the same low-precision inputs, float64 (CPU only) to 1e-10; the
table's odd vocabularies, one class, one row, K up to 40 (more than one launch of 32 tangents),
ignored rows, class weights, label smoothing, a ramp along the rows (the online rescaling),
masked ``-inf`` classes and a masked first tile, large offsets. Then ``want_grad=False`` and
``zdot=None``, out-of-range targets, non-contiguous inputs, determinism and K-batched = loop.
"""

import pytest
import torch
from cases.cross_entropy import CASES, DECLINED, LOW_PRECISION, cast, declined_call
from kernels.harness import check_rows

from hessfast.cuda.cross_entropy import IMPLEMENTATIONS, OP
from hessfast.rules import rule_for
from hessfast.rules.base import Call

D = torch.float64
IMPL = IMPLEMENTATIONS[0]
IGNORE = -100


def make(m, v, k, seed, spread=3.0, weights=False, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(m, v, dtype=D, generator=gen)
    zdot = torch.randn(k, m, v, dtype=D, generator=gen) if k else None
    target = torch.randint(0, v, (m,), generator=gen)
    if ignore and m > 2:
        target[1] = IGNORE
    weight = torch.rand(v, dtype=D, generator=gen) + 0.5 if weights else None
    return z, zdot, target, weight


def test_every_case_is_a_valid_call():
    """Every case of the table is a call the kernel takes (none is skipped as declined)."""
    for name, case in CASES.items():
        args = cast(case.args(), torch.float32, "cpu")
        assert not IMPL.not_supported_reasons(Call(OP, args, (), (), 0)), name


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_the_oracle(case, dev):
    c = CASES[case]
    check_rows(IMPL.rows, IMPL, c.args(), dtype=torch.float32, device=dev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_PRECISION)
def test_low_precision_within_twice_plain_torch(case, dtype, dev):
    check_rows(IMPL.rows, IMPL, CASES[case].args(), dtype=dtype, device=dev)


@pytest.mark.parametrize("case", list(CASES))
def test_header_math_float64(case, ext, float64_probe):
    """The CPU implementation in float64: the header's row algebra itself, to 1e-10."""
    impl = float64_probe(IMPL)
    check_rows(impl.rows, impl, CASES[case].args(seed=2), dtype=D, device=torch.device("cpu"))


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


@pytest.mark.parametrize("name", list(DECLINED))
def test_declines_with_its_reason(name):
    call, reason = declined_call(name)
    why = IMPL.not_supported_reasons(call)
    assert any(reason in w for w in why), why


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
