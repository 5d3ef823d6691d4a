"""hessfast.landscape: the loss over the data on 1-D/2-D slices, the quadratic model beside it, the
directions, the parameters left bitwise as they were, and the PNG/JSON files."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hessfast
from hessfast.landscape import ModelGuard, _same_bits, filter_normalized_directions


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    data = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]  # ragged
    return model, x, y, data


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_at(model, x, y, flat):
    params, off = {}, 0
    for n, p in model.named_parameters():
        params[n] = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def _snapshot(model):
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()] + [
        (n, b, b.clone()) for n, b in model.named_buffers()
    ]


def _assert_untouched(model, snap):
    now = dict(model.named_parameters()) | dict(model.named_buffers())
    for n, obj, copy in snap:
        assert now[n] is obj, n
        assert _same_bits(obj.detach(), copy), n


def test_loss_is_the_weighted_dataset_loss_on_the_grid(problem):
    model, x, y, data = problem
    P = _flat(model).numel()
    d = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ls = hessfast.landscape(model, F.cross_entropy, data, d, span=(-0.5, 1.0), steps=(4, 3))
    assert ls.loss.shape == (4, 3) and ls.kind == "user" and ls.evaluation == "vmap"
    theta = _flat(model)
    for i, a in enumerate(ls.coords[0]):
        for j, b in enumerate(ls.coords[1]):
            want = _loss_at(model, x, y, theta + a * d[0] + b * d[1])  # all 23 samples at once
            assert ls.loss[i, j] == pytest.approx(float(want), rel=1e-12)
    assert ls.loss0 == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)
    # the quadratic model's terms: slope Dᵀ∇L and curvature DᵀHD, exact in float64
    H = torch.func.hessian(lambda t: _loss_at(model, x, y, t))(theta)
    gr = torch.func.grad(lambda t: _loss_at(model, x, y, t))(theta)
    np.testing.assert_allclose(ls.curvature, (d @ H @ d.T).numpy(), rtol=1e-10)
    np.testing.assert_allclose(ls.slope, (d @ gr).numpy(), rtol=1e-10)
    # one point at a time gives the same numbers
    seq = hessfast.landscape(
        model, F.cross_entropy, data, d, span=(-0.5, 1.0), steps=(4, 3), points_per_pass=1
    )
    assert seq.evaluation == "sequential"
    np.testing.assert_allclose(seq.loss, ls.loss, rtol=1e-13)


def test_top_direction_matches_the_eigenvalue_and_writes_files(problem, tmp_path):
    model, x, y, data = problem
    snap = _snapshot(model)
    theta = _flat(model)
    H = torch.func.hessian(lambda t: _loss_at(model, x, y, t))(theta)
    evals = torch.linalg.eigvalsh(H)
    h = 1e-3
    ls = hessfast.landscape(model, F.cross_entropy, data, "top", span=h, steps=3, out=tmp_path)
    assert ls.eigenvalues[0] == pytest.approx(float(evals[-1]), rel=1e-8)
    # the loss curve's second difference at θ is λ_max
    second = (ls.loss[0] - 2 * ls.loss[1] + ls.loss[2]) / h**2
    assert second == pytest.approx(float(evals[-1]), rel=1e-4)
    # the quadratic model agrees to third order: the error shrinks 8-16x when the step halves
    pairs = (torch.tensor(ls.eigenvalues), ls.directions.T)  # computed before: no eigsh
    far = hessfast.landscape(
        model, F.cross_entropy, data, "top", span=0.2, steps=5, eigenpairs=pairs
    )
    err = np.abs(far.loss - far.quadratic)
    assert err[2] < 1e-12 and err[3] > 0
    assert 6 < err[4] / err[3] < 18  # t³ (+ t⁴) terms; a wrong λ or slope would give 4 or 2
    png, js = tmp_path / "landscape_1d.png", tmp_path / "landscape_1d.json"
    assert ls.png == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads(js.read_text())
    assert rec["kind"] == "top" and len(rec["loss"]) == 3 and rec["eigenvalues"] == ls.eigenvalues
    ev, vecs = torch.linalg.eigh(H)  # eigenpairs given (ascending, as eigsh returns them)
    two = hessfast.landscape(
        model,
        F.cross_entropy,
        data,
        "top",
        ndim=2,
        span=0.5,
        steps=5,
        out=tmp_path,
        eigenpairs=(ev, vecs),
    )
    assert two.eigenvalues == [float(ev[-1]), float(ev[-2])]
    np.testing.assert_allclose(two.curvature, np.diag(two.eigenvalues))
    assert torch.equal(two.directions, vecs[:, [-1, -2]].T)
    assert (tmp_path / "landscape_2d.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "landscape_2d.json").read_text())["ndim"] == 2
    _assert_untouched(model, snap)


def test_random_directions_are_filter_normalised_and_seeded(problem, tmp_path):
    model, x, y, data = problem
    a = filter_normalized_directions(model, 2, seed=3)
    b = filter_normalized_directions(model, 2, seed=3)
    c = filter_normalized_directions(model, 2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    w = model[0].weight.detach()
    rows = a[0, : w.numel()].view_as(w)
    torch.testing.assert_close(rows.norm(dim=1), w.norm(dim=1), rtol=1e-8, atol=0)
    assert torch.all(a[0, w.numel() : w.numel() + 6] == 0)  # the bias gets no component
    r1 = hessfast.landscape(model, F.cross_entropy, data, "random", ndim=2, steps=3, seed=3)
    r2 = hessfast.landscape(model, F.cross_entropy, data, "random", ndim=2, steps=3, seed=3)
    assert np.array_equal(r1.loss, r2.loss) and torch.equal(r1.directions, a)
    r1.plot(tmp_path / "random.png")
    assert (tmp_path / "random.png").stat().st_size > 1000


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("per_pass", [16, 1])
def test_parameters_restored_on_interrupt(problem, exc, per_pass):
    model, x, y, data = problem
    snap = _snapshot(model)
    calls = [0]

    def loss_fn(z, t):
        calls[0] += 1
        if calls[0] >= 4:  # from the 4th call on (a vmap failure is retried point by point)
            raise exc("stop")
        return F.cross_entropy(z, t)

    P = _flat(model).numel()
    with pytest.raises(exc):
        hessfast.landscape(
            model,
            loss_fn,
            data,
            torch.ones(P, dtype=torch.float64),
            steps=5,
            points_per_pass=per_pass,
            reduction="mean",
        )
    _assert_untouched(model, snap)


def test_guard_puts_back_what_was_changed(problem):
    # the guard itself: a parameter overwritten in place and another replaced are restored
    model, *_ = problem
    snap = _snapshot(model)
    with pytest.raises(KeyboardInterrupt), ModelGuard(model):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[2].bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        raise KeyboardInterrupt
    _assert_untouched(model, snap)


def test_batchnorm_in_training_mode_falls_back_and_leaves_statistics(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    snap = _snapshot(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ls = hessfast.landscape(model, F.cross_entropy, (x, y), "random", steps=3)
    assert ls.evaluation == "sequential" and any("one point at a time" in str(m.message) for m in w)
    assert math.isfinite(ls.loss[1]) and ls.loss[1] == pytest.approx(ls.loss0, rel=1e-6)
    _assert_untouched(model, snap)


def test_sum_reduction_adds_batches(problem):
    model, x, y, data = problem
    P = _flat(model).numel()
    ls = hessfast.landscape(
        model,
        lambda z, t: F.cross_entropy(z, t, reduction="sum"),
        data,
        torch.ones(P, dtype=torch.float64),
        span=0.1,
        steps=3,
    )
    assert ls.loss0 == pytest.approx(
        float(F.cross_entropy(model(x), y, reduction="sum").detach()), rel=1e-12
    )


def test_bad_arguments(problem):
    model, x, y, data = problem
    with pytest.raises(ValueError, match="directions"):
        hessfast.landscape(model, F.cross_entropy, data, "sideways")
    with pytest.raises(ValueError, match="steps"):
        hessfast.landscape(model, F.cross_entropy, data, "random", steps=1)
    with pytest.raises(ValueError, match="span"):
        hessfast.landscape(model, F.cross_entropy, data, "random", span=-1.0)
    with pytest.raises(ValueError, match="entries"):
        hessfast.landscape(model, F.cross_entropy, data, torch.ones(5, dtype=torch.float64))


def test_sequence_logits_read_as_hessfast_reads_them():
    # logits [B, T, C] with targets [B, T]: the mean over all tokens (torch's own call would
    # take dim 1 for the classes); checked on the loss and gradient pass, without products
    from hessfast.landscape import DataLoss
    from hessfast.operators import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 7)).double()
    idx, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    val, grad = DataLoss(HessianOperator(model, F.cross_entropy, (idx, y))).value_and_grad()
    want = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    assert val == pytest.approx(float(want.detach()), rel=1e-13)
    g = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(grad, torch.cat([t.reshape(-1) for t in g]), rtol=1e-12, atol=0)
