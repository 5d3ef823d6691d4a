"""The Triton kernel of ``hessfast::cross_entropy_rows`` on the family's case table
(``tests/cases/cross_entropy.py``, which the CUDA tests run too) against the float64 autograd
oracle, and the fused head run end to end on the Triton backend (on the CPU through
``TRITON_INTERPRET=1``)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from cases.cross_entropy import CASES, LOW_PRECISION, RowsCase, cast, declined_call
from kernels.harness import check_rows
from oracle import ggn_vp, hvp, rel_err
from torch import nn

import hessfast
from hessfast import engine
from hessfast.dispatch import reasons
from hessfast.rules import cross_entropy as ce
from hessfast.rules import registered_rule, rule_for

tce = pytest.importorskip("hessfast.triton.cross_entropy")

pytestmark = pytest.mark.triton

D = torch.float64
IMPL = tce.IMPLEMENTATIONS[0]


#: Cases of this kernel's own beyond the family's table: rows offset by 1e4 and −3e4 with label
#: smoothing and class weights, whose loss holds the declared tolerance because the kernel sums the
#: smoothing term as ``Σ w_c (max − z_c) + log Σ · Σ w_c``, never ``lse Σ w_c − Σ w_c z_c`` (two
#: sums at the logits' size: 1.1e-4 relative). The CUDA op still forms ``Σ w_c z_c − W max``.
EXTRA = {
    "offset-smoothing-weighted": RowsCase(
        3, 200, 2, weight=True, smoothing=0.1, offset={0: 1e4, 2: -3e4}, scale=1.0,
        tiles={"block_v": 64},
    ),
}  # fmt: skip


def make(case, seed=0):
    """The float64 arguments of a case of the family's table (or :data:`EXTRA`), and its Triton
    block sizes."""
    c = {**CASES, **EXTRA}[case]
    return c.args(seed), dict(c.tiles)


def run_kernel(args, blocks):
    return tce.cross_entropy_rows_triton(*args, **blocks)


def back(outs):
    return [None if t is None else t.detach().to("cpu", D) for t in outs]


def test_every_case_is_a_valid_call():
    """Every case of the table is a call the kernel takes (none is skipped as declined)."""
    for name, case in CASES.items():
        args = cast(case.args(), torch.float32, "cpu")
        assert not IMPL.not_supported_reasons(ce.rows_call(*args)), name


@pytest.mark.parametrize("case", [*CASES, *EXTRA])
def test_float32_matches_the_oracle_at_the_declared_tolerance(case, kernel_device):
    args, blocks = make(case)
    check_rows(
        lambda *a: run_kernel(a, blocks),
        IMPL,
        args,
        dtype=torch.float32,
        device=kernel_device,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_PRECISION if torch.cuda.is_available() else LOW_PRECISION[:3])
def test_half_precision_within_twice_plain_torch(case, dtype, kernel_device):
    args, blocks = make(case)
    check_rows(lambda *a: run_kernel(a, blocks), IMPL, args, dtype=dtype, device=kernel_device)


def test_non_contiguous_inputs_give_the_contiguous_result(kernel_device):
    args, blocks = make("tiles-k7-weights-smoothing")
    z, u = args[0], args[1]
    dev = cast(args, torch.float32, kernel_device)
    want = run_kernel(dev, blocks)
    zn = torch.cat([z, z], 1).to(kernel_device, torch.float32)[:, ::2]
    zn.copy_(dev[0])
    un = u.transpose(0, 1).contiguous().transpose(0, 1).to(kernel_device, torch.float32)
    assert not zn.is_contiguous() and not un.is_contiguous()
    got = run_kernel((zn, un, *dev[2:]), blocks)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_deterministic_and_k_batched_equals_one_at_a_time(kernel_device):
    args, blocks = make("tiles-k7-weights-smoothing")
    dev = cast(args, torch.float32, kernel_device)
    first = run_kernel(dev, blocks)
    again = run_kernel(dev, blocks)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for k in (0, 6):
        one = run_kernel((dev[0], dev[1][k : k + 1], *dev[2:]), blocks)
        torch.testing.assert_close(one[2][0], first[2][k], rtol=1e-6, atol=1e-9)
        assert torch.equal(one[0], first[0]) and torch.equal(one[1], first[1])


def test_dispatch_runs_the_kernel_or_says_why_not(kernel_device):
    args, _ = make("one-row-k1")
    call = ce.rows_call(*cast(args, torch.float32, kernel_device))
    assert rule_for(ce.ROWS_OP, call, "triton") is IMPL
    assert rule_for(ce.ROWS_OP, call, "torch") is registered_rule(ce.ROWS_OP)
    call64 = ce.rows_call(*cast(args, D, kernel_device))
    assert any("float64" in r for r in reasons(IMPL, call64, explicit=True))
    bad = ce.rows_call(args[0].float(), args[1][:, :, :5].float(), *args[2:])
    assert any("tangents" in r for r in IMPL.not_supported_reasons(bad))
    assert any(
        "class weights" in r
        for r in IMPL.not_supported_reasons(ce.rows_call(*args[:3], torch.ones(3), *args[4:]))
    )


class TritonSpy:
    """Counts the Triton row op's calls (on the class). The self-check calls the class's method
    too (``hessfast.selftest``, tested in ``tests/test_selfcheck.py``), so it is off here."""

    def __init__(self, monkeypatch):
        monkeypatch.setenv("HESSFAST_SELFCHECK", "0")
        self.calls = 0
        original = tce.CrossEntropyRowsTriton.rows

        def rows(impl, *a):
            self.calls += 1
            return original(impl, *a)

        monkeypatch.setattr(tce.CrossEntropyRowsTriton, "rows", rows)


def test_fused_head_on_the_triton_backend_matches_the_oracle(kernel_device, monkeypatch):
    """A linear head on ``[B, T, D]`` features, float32, rows in 3 chunks (ragged), weights,
    ignore_index and smoothing: HVP, GGN-VP and gradient against the float64 oracle."""
    monkeypatch.setattr(engine, "FUSE_HEAD", True)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 3)
    spy = TritonSpy(monkeypatch)
    torch.manual_seed(0)
    model = nn.Linear(6, 37).to(D)
    x = torch.randn(2, 4, 6, dtype=D)
    y = torch.randint(0, 37, (2, 4))
    y[0, 1] = -100
    w = torch.rand(37, dtype=D) + 0.5
    loss64 = functools.partial(F.cross_entropy, weight=w, label_smoothing=0.1)
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}
    m32 = nn.Linear(6, 37).to(kernel_device)
    m32.load_state_dict(model.state_dict())
    loss32 = functools.partial(
        F.cross_entropy, weight=w.to(kernel_device, torch.float32), label_smoothing=0.1
    )
    x32, y32 = x.to(kernel_device, torch.float32), y.to(kernel_device)
    v32 = {n: t.to(kernel_device, torch.float32) for n, t in v.items()}

    def back32(d):
        return {n: t.to("cpu", D) for n, t in d.items()}

    # the interpreter: the row op once per chunk and product (tests/triton/test_traced_ops.py
    # traces)
    got, g = hessfast.hvp(
        m32, loss32, x32, y32, v32, backend="triton", return_grad=True, compile="interpret"
    )
    assert spy.calls == 3
    assert rel_err(back32(got), hvp(model, loss64, (x,), y, v)) < 1e-5
    gv = hessfast.ggn_vp(m32, loss32, x32, y32, v32, backend="triton", compile="interpret")
    assert rel_err(back32(gv), ggn_vp(model, loss64, (x,), y, v)) < 1e-5
    with torch.enable_grad():
        loss = loss64(model(x).flatten(0, 1), y.flatten())
        want = dict(zip(v, torch.autograd.grad(loss, list(model.parameters()))))
    assert rel_err(back32(g), want) < 1e-5
    assert spy.calls == 6


def test_targets_out_of_range_poison_their_row_and_nothing_else(kernel_device):
    """A target outside ``[0, V)`` (not the ignore index) is never read out of bounds: its row is
    NaN, as in the CUDA kernel; the other rows are exact."""
    args, blocks = make("tiles-k7-weights-smoothing")
    z, u, y, w, ignore, eps, scale, want_grad = args
    y = y.clone()
    y[0], y[2] = 300, -7  # V = 300: one past the end, and negative
    ok = [1, 3, 4]
    got = back(run_kernel(cast((z, u, y, w, ignore, eps, scale, want_grad), torch.float32,
                               kernel_device), blocks))  # fmt: skip
    loss, gz, gdz = got
    assert torch.isnan(loss[[0, 2]]).all() and torch.isnan(gz[[0, 2]]).all()
    assert torch.isnan(gdz[:, [0, 2]]).all()
    y_ok = y.clone()
    y_ok[[0, 2]] = ignore  # the reference cannot take them: compare the other rows
    want = ce.cross_entropy_rows_ref(z, u, y_ok, w, ignore, eps, scale, want_grad)
    torch.testing.assert_close(got[0][ok], want[0][ok], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1][ok], want[1][ok], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][:, ok], want[2][:, ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["1-d-logits", "tangent-shape", "target-shape", "float-target",
                                  "weight-shape", "smoothing"])  # fmt: skip
def test_declines_with_its_reason(name):
    call, reason = declined_call(name)
    why = IMPL.not_supported_reasons(call)
    assert any(reason in w for w in why), why
