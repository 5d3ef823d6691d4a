"""``EmpiricalFisherOperator`` and ``MCFisherOperator``: a float64 dense oracle for the empirical
Fisher (``Σ g_i g_iᵀ / D`` built sample by sample with autograd), fixed-seed statistical tests that
the MC Fisher is an unbiased estimate of the GGN converging as ``1/√M``, symmetry, K-batched =
one column at a time, reproducible seeds and the refusals."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import hessfast

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, out)
    ).double()


def ce_data(sizes=(5, 3, 1), seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def mse_data(sizes=(4, 3), seed=2, out=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, out, generator=g, dtype=torch.float64),
        )
        for n in sizes
    ]


def dense(op):
    return op @ torch.eye(op.shape[0], dtype=torch.float64)


def ef_oracle(model, sample_loss, data, D):
    """``(1/D) Σ_i g_i g_iᵀ``: ``g_i`` the autograd gradient of ``sample_loss(z_i, y_i)`` (sample
    ``i``'s summed loss), one sample at a time."""
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    out = torch.zeros(P, P, dtype=torch.float64)
    for x, y in data:
        for i in range(len(y)):
            loss = sample_loss(model(x[i : i + 1]), y[i : i + 1])
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
            out += torch.outer(g, g)
    return out / D


def test_empirical_fisher_cross_entropy_ragged_batches():
    model, data = mlp(), ce_data()
    E = hessfast.EmpiricalFisherOperator(model, F.cross_entropy, data)
    N = sum(len(b[1]) for b in data)
    ref = ef_oracle(model, functools.partial(F.cross_entropy, reduction="sum"), data, N)
    torch.testing.assert_close(dense(E), ref, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_class_weights_and_ignore_index():
    model, data = mlp(), ce_data(sizes=(6, 4))
    data[0][1][:2] = -1
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss(weight=w, ignore_index=-1)
    E = hessfast.EmpiricalFisherOperator(model, loss_fn, data, max_batch_size=3)
    D = float(sum(w[y[y != -1]].sum() for _, y in data))
    per_sample = torch.nn.CrossEntropyLoss(weight=w, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(
        dense(E), ef_oracle(model, per_sample, data, D), rtol=1e-10, atol=1e-13
    )


def test_empirical_fisher_sum_loss_and_num_data():
    model, data = mlp(), ce_data()
    loss_sum = functools.partial(F.cross_entropy, reduction="sum")
    ref = ef_oracle(model, loss_sum, data, 1.0)
    torch.testing.assert_close(
        dense(hessfast.EmpiricalFisherOperator(model, loss_sum, data)), ref, rtol=1e-10, atol=1e-13
    )
    E = hessfast.EmpiricalFisherOperator(model, loss_sum, data, num_data=7)
    torch.testing.assert_close(dense(E), ref / 7, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_mse_and_a_custom_mean_loss():
    model, data = mlp(out=2), mse_data()
    elems = sum(y.numel() for _, y in data)
    ref = ef_oracle(model, functools.partial(F.mse_loss, reduction="sum"), data, elems)
    E = hessfast.EmpiricalFisherOperator(model, F.mse_loss, data)
    torch.testing.assert_close(dense(E), ref, rtol=1e-10, atol=1e-13)
    custom = hessfast.EmpiricalFisherOperator(model, lambda z, t: ((z - t) ** 2).mean(), data)
    torch.testing.assert_close(dense(custom), ref, rtol=1e-10, atol=1e-13)


def test_empirical_fisher_of_a_sequence_model_takes_a_sequence_as_a_sample():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5))
    model = model.double()
    g = torch.Generator().manual_seed(4)
    data = [
        (
            torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (3, 6), generator=g),
        )
    ]
    E = hessfast.EmpiricalFisherOperator(model, F.cross_entropy, data)

    def seq_sum(z, t):
        return F.cross_entropy(z.flatten(0, -2), t.flatten(), reduction="sum")

    torch.testing.assert_close(
        dense(E), ef_oracle(model, seq_sum, data, 18), rtol=1e-10, atol=1e-13
    )


def test_gradient_is_the_mean_of_the_per_sample_gradients():
    model, data = mlp(), ce_data()
    E = hessfast.EmpiricalFisherOperator(model, F.cross_entropy, data)
    H = hessfast.HessianOperator(model, F.cross_entropy, data)
    torch.testing.assert_close(E.gradient(), H.gradient(), rtol=1e-12, atol=1e-14)


def mc_dense(model, loss_fn, data, M, seed):
    return dense(hessfast.MCFisherOperator(model, loss_fn, data, mc_samples=M, seed=seed))


@pytest.mark.parametrize(
    "loss_fn,make",
    [(F.cross_entropy, ce_data), (torch.nn.MSELoss(), lambda: mse_data(out=3))],
    ids=["cross_entropy", "mse"],
)
def test_mc_fisher_is_an_unbiased_estimate_of_the_ggn_converging_as_one_over_sqrt_m(loss_fn, make):
    """Unbiased: the mean of ``F_1`` over 64 seeds is within 5 standard errors (the spread over
    the seeds / 8) of the GGN in every entry (CLT: a false failure has probability < 1e-5 per
    entry). Convergence: ``F_M`` averages ``M`` independent draws, so
    ``E‖F_M − G‖_F² = σ² / M`` with ``σ² = E‖F_1 − G‖_F²`` (estimated from the 64 seeds); with
    ``M = 4096``, ``‖F_M − G‖_F ≤ 5 σ/√M`` (Markov: a false failure has probability < 1/25 for a
    random seed; the seed is fixed)."""
    model, data = mlp(), make()
    G = dense(hessfast.GGNOperator(model, loss_fn, data))
    ones = torch.stack([mc_dense(model, loss_fn, data, 1, s) for s in range(64)])
    se = ones.std(0) / 8
    assert bool(((ones.mean(0) - G).abs() <= 5 * se + 1e-12).all())
    sigma = float(((ones - G) ** 2).sum((1, 2)).mean().sqrt())
    M = 4096
    err = float(torch.linalg.norm(mc_dense(model, loss_fn, data, M, 123) - G))
    assert err <= 5 * sigma / math.sqrt(M), (err, sigma / math.sqrt(M))


def test_mc_fisher_of_cross_entropy_with_ignore_index_and_label_smoothing():
    """Ignored targets count nowhere; label smoothing leaves the output Hessian, so the GGN the MC
    Fisher estimates, unchanged."""
    model, data = mlp(), ce_data(sizes=(6, 4))
    data[0][1][:3] = -100
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2)
    G = dense(hessfast.GGNOperator(model, loss_fn, data))
    err = float(torch.linalg.norm(mc_dense(model, loss_fn, data, 8192, 0) - G))
    assert err < 0.05 * float(torch.linalg.norm(G))


@pytest.mark.parametrize("cls", [hessfast.EmpiricalFisherOperator, hessfast.MCFisherOperator])
def test_symmetric_psd_and_k_batched_equals_one_column_at_a_time(cls):
    model, data = mlp(), ce_data()
    op = cls(model, F.cross_entropy, data)
    op.check_symmetric()
    V = torch.randn(op.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = op @ V
    loop = torch.stack([op @ V[:, k] for k in range(4)], 1)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-14)
    assert float(torch.linalg.eigvalsh(dense(op)).min()) > -1e-12


def test_mc_fisher_seed_gives_the_same_operator_at_every_product():
    model, data = mlp(), ce_data()
    a = hessfast.MCFisherOperator(model, F.cross_entropy, data, mc_samples=2, seed=5)
    b = hessfast.MCFisherOperator(model, F.cross_entropy, data, mc_samples=2, seed=5)
    c = hessfast.MCFisherOperator(model, F.cross_entropy, data, mc_samples=2, seed=6)
    v = torch.randn(a.shape[0], dtype=torch.float64)
    first = a @ v
    assert torch.equal(first, a @ v) and torch.equal(first, b @ v)
    assert not torch.allclose(first, c @ v)
    assert a.deterministic == "passed"  # several batches: the two first passes agreed
    block = a.block("2.*")
    assert (block.mc_samples, block.seed) == (2, 5)
    vals = hessfast.eigsh(a, k=2, which="LA")[0]
    top = torch.linalg.eigvalsh(dense(a))[-2:]
    torch.testing.assert_close(torch.sort(vals).values, top, rtol=1e-8, atol=1e-10)


def test_unsupported_losses_and_models_are_refused():
    model, data = mlp(), ce_data()
    with pytest.raises(ValueError, match="predictive distribution.*EmpiricalFisherOperator"):
        hessfast.MCFisherOperator(model, F.nll_loss, data)
    with pytest.raises(ValueError, match="predictive distribution"):
        hessfast.MCFisherOperator(model, lambda z, t: F.cross_entropy(z, t), data)
    with pytest.raises(ValueError, match="weights"):
        hessfast.MCFisherOperator(model, torch.nn.CrossEntropyLoss(weight=torch.ones(3)), data)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        hessfast.MCFisherOperator(model, F.cross_entropy, data, mc_samples=0)
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    with pytest.raises(ValueError, match="model.eval()"):
        hessfast.EmpiricalFisherOperator(bn, F.cross_entropy, data)
    with pytest.raises(ValueError, match="compile= do not apply"):
        hessfast.EmpiricalFisherOperator(model, F.cross_entropy, data, compile="interpret")
