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


def _dense_ggn(model, x, y):
    """The float64 GGN ``JᵀH_LJ`` of the mean cross-entropy over ``(x, y)``, column by column
    (the oracle's ``jvp``-Hessian-``vjp`` on the identity)."""
    from oracle import ggn_vp

    named = list(model.named_parameters())
    P = sum(p.numel() for _, p in named)
    eye, v, off = torch.eye(P, dtype=torch.float64), {}, 0
    for n, p in named:
        v[n] = eye[:, off : off + p.numel()].reshape(P, *p.shape)
        off += p.numel()
    cols = ggn_vp(model, F.cross_entropy, (x,), y, v)
    return torch.cat([cols[n].reshape(P, -1) for n, _ in named], dim=1)


def test_ggn_curvature_gives_the_gauss_newton_model(problem, tmp_path):
    model, x, y, data = problem
    snap = _snapshot(model)
    G = _dense_ggn(model, x, y)
    P = G.shape[0]
    d = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gn = hessfast.landscape(model, F.cross_entropy, data, d, span=0.3, steps=3, curvature="ggn")
    hs = hessfast.landscape(model, F.cross_entropy, data, d, span=0.3, steps=3)
    assert gn.operator == "GGN" and hs.operator == "Hessian"
    np.testing.assert_allclose(gn.curvature, [[float(d @ G @ d)]], rtol=1e-10)
    assert np.array_equal(gn.loss, hs.loss)  # the loss on the grid does not depend on it
    assert not np.allclose(gn.curvature, hs.curvature, rtol=1e-3)  # H ≠ G off the minimum
    # "top" with the GGN: its largest eigenvalue, and the auto span where ½λt² = L₀
    top = hessfast.landscape(
        model, F.cross_entropy, data, "top", span="auto", steps=5, curvature="ggn", out=tmp_path
    )
    lam = float(torch.linalg.eigvalsh(G)[-1])
    assert top.eigenvalues[0] == pytest.approx(lam, rel=1e-8)
    assert top.coords[0][-1] == pytest.approx(math.sqrt(2 * top.loss0 / lam), rel=1e-8)
    rec = json.loads((tmp_path / "landscape_1d.json").read_text())
    assert rec["operator"] == "GGN" and "GGN" in rec["axes"][0]
    assert rec["files"] == {"png": "landscape_1d.png", "json": "landscape_1d.json"}
    with pytest.raises(ValueError, match="curvature"):
        hessfast.landscape(model, F.cross_entropy, data, d, curvature="fisher")
    _assert_untouched(model, snap)


def test_auto_span_reaches_the_loss_along_the_top_hessian_eigenvector(problem):
    model, x, y, data = problem
    theta = _flat(model)
    lam = float(
        torch.linalg.eigvalsh(torch.func.hessian(lambda t: _loss_at(model, x, y, t))(theta))[-1]
    )
    ls = hessfast.landscape(model, F.cross_entropy, data, "top", span="auto", steps=(7,))
    s = math.sqrt(2 * ls.loss0 / lam)
    np.testing.assert_allclose(ls.coords[0], np.linspace(-s, s, 7), rtol=1e-8)
    # at the ends the curvature term of the quadratic model is the loss at θ
    ends = ls.quadratic[[0, -1]] - ls.loss0 - ls.slope[0] * ls.coords[0][[0, -1]]
    np.testing.assert_allclose(ends, [ls.loss0, ls.loss0], rtol=1e-8)
    # directions other than "top" have no eigenvalue: ±1
    P = theta.numel()
    user = hessfast.landscape(model, F.cross_entropy, data, torch.ones(P, dtype=torch.float64),
                              span="auto", steps=3)  # fmt: skip
    assert user.coords[0].tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match='"auto"'):
        hessfast.landscape(model, F.cross_entropy, data, "top", span="wide")


def test_to_dict_is_strict_json_and_reads_back(problem, tmp_path):
    model, x, y, data = problem
    P = _flat(model).numel()
    d = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ls = hessfast.landscape(model, F.cross_entropy, data, d, span=0.2, steps=3)
    ls.loss[0, 0] = math.inf  # a point where the loss overflowed
    rec = ls.to_dict()
    text = json.dumps(rec, allow_nan=False)  # no NaN or Infinity in the JSON
    back = json.loads(text)
    assert back["loss"][0][0] is None and back["loss"][1][1] == ls.loss[1, 1]
    assert back["axes"] == ["α along d₁", "α along d₂"] and back["files"] == {}
    assert back["curvature"] == ls.curvature.tolist() and back["slope"] == ls.slope.tolist()
    again = hessfast.Landscape.from_dict(back)
    assert again.directions is None and again.operator == "Hessian" and again.kind == "user"
    assert np.isnan(again.loss[0, 0])
    np.testing.assert_array_equal(again.loss[1:], ls.loss[1:])
    np.testing.assert_array_equal(again.quadratic, ls.quadratic)
    assert again.extra["parameters"] == P
    assert again.plot(tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    again.save_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["loss"] == back["loss"]


def test_loss_operator_is_local_and_checks_its_curvature(problem):
    from hessfast.landscape import loss_operator

    model, x, y, data = problem
    op = loss_operator(model, F.cross_entropy, data, curvature="ggn", params="2.*")
    assert op.kind == "GGN" and op.process_group is None and op.shape == (21, 21)
    with pytest.raises(ValueError, match='"hessian" or "ggn"'):
        loss_operator(model, F.cross_entropy, data, curvature="Hessian")
