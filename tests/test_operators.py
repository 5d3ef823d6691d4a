"""Curvature operators over datasets: exact batch weighting, micro-batching, blocks, SciPy."""

import functools

import pytest
import torch
import torch.nn.functional as F
from models import zoo
from torch import nn

import hessfast

D = torch.float64


def _data(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=D), torch.randint(0, 4, (n,), generator=g)


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.mark.parametrize("cls", [hessfast.HessianOperator, hessfast.GGNOperator])
def test_ragged_batches_equal_the_concatenated_batch(cls):
    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    full = cls(model, lf, (x, y))
    split = cls(model, lf, _batches(x, y, 4))  # 4 + 4 + 3
    V = torch.randn(full.shape[0], 3, dtype=D)
    torch.testing.assert_close(split @ V, full @ V, rtol=1e-12, atol=1e-14)


def test_micro_batching_changes_nothing():
    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=D)
    ref = hessfast.HessianOperator(model, lf, (x, y)) @ V
    micro = hessfast.HessianOperator(model, lf, (x, y), max_batch_size=3) @ V
    torch.testing.assert_close(micro, ref, rtol=1e-12, atol=1e-14)


def test_token_weighting_is_exact_with_ignore_index():
    """Batches with different numbers of counted tokens: weighted by tokens, not by samples.
    A token model of ``[B, T, V]`` logits (embedding, tanh, linear head): the weighting is the
    operator's and the loss's, whatever the body (the zoo's GPT took tens of seconds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 5), nn.Tanh(), nn.Linear(5, 11)).to(D)
    lf = F.cross_entropy
    g = torch.Generator().manual_seed(0)
    idx, y = torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)
    y[0, :4] = -100  # batch 0 counts 2 tokens, batch 1 counts 6
    full = hessfast.HessianOperator(model, lf, ((idx,), y))
    split = hessfast.HessianOperator(model, lf, [((idx[:1],), y[:1]), ((idx[1:],), y[1:])])
    V = torch.randn(full.shape[0], 2, dtype=D)
    torch.testing.assert_close(split @ V, full @ V, rtol=1e-10, atol=1e-13)


def test_sum_reduction_sums_batches():
    model, _, _, _ = zoo.mlp()
    lf = functools.partial(F.cross_entropy, reduction="sum")
    x, y = _data()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=D)
    full = hessfast.HessianOperator(model, lf, (x, y)) @ V
    split = hessfast.HessianOperator(model, lf, _batches(x, y, 5)) @ V
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-13)


def test_vector_layouts_and_matches_hvp():
    model, lf, (x,), y = zoo.mlp()
    H = hessfast.HessianOperator(model, lf, (x, y))
    P = H.shape[0]
    v = torch.randn(P, dtype=D)
    ref = hessfast.hvp(model, lf, x, y, v)
    torch.testing.assert_close(H @ v, ref)
    torch.testing.assert_close((H @ v[:, None])[:, 0], ref)
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    hd = H @ d
    ref_d = hessfast.hvp(model, lf, x, y, d)
    for n in d:
        torch.testing.assert_close(hd[n], ref_d[n])
    dk = {n: torch.randn(3, *p.shape, dtype=D) for n, p in model.named_parameters()}
    assert all((H @ dk)[n].shape == dk[n].shape for n in dk)


def test_block_is_the_diagonal_block():
    model, lf, (x,), y = zoo.mlp()
    H = hessfast.HessianOperator(model, lf, (x, y))
    B = H.block("2.*")
    assert B.names == ["2.weight", "2.bias"]
    v = torch.randn(B.shape[0], dtype=D)
    ref = hessfast.hvp(model, lf, x, y, v, params="2.*")
    torch.testing.assert_close(B @ v, ref)
    with pytest.raises(ValueError, match="outside"):
        H.block("2.*").block("0.*")


def test_to_scipy_matches():
    model, lf, (x,), y = zoo.mlp()
    H = hessfast.HessianOperator(model, lf, (x, y))
    S = H.to_scipy()
    v = torch.randn(H.shape[0], dtype=D)
    torch.testing.assert_close(torch.as_tensor(S.matvec(v.numpy())), H @ v)
    assert S.shape == H.shape


def test_every_column_layout_replays_one_graph_and_agrees():
    """A [P, 1] column (contiguous: strides (1, 1) once transposed, as SciPy's vectors come, and
    viewed rather than copied), a column sliced out of a wider matrix and a row-major [P, 2]
    block all reach the traced product in one layout: one trace per width, the same products."""
    from hessfast import capture, traced

    model, lf, (x,), y = zoo.mlp()
    H = hessfast.HessianOperator(model, lf, (x, y))
    P = H.shape[0]
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(P, 3, generator=g, dtype=D)
    col = wide[:, 1:2].contiguous()
    assert col.T.stride() == (1, 1)
    want = H @ col
    for _ in range(3):
        torch.testing.assert_close(H @ col, want, rtol=0, atol=0)
        torch.testing.assert_close(H @ wide[:, 1:2], want, rtol=0, atol=0)
        torch.testing.assert_close((H @ wide)[:, 1:2], want, rtol=1e-12, atol=1e-14)
    ks = [t["k"] for t in traced.explain(capture.capture(model, (x,)))]
    assert sorted(ks) == [1, 3]


@pytest.mark.slow  # about ten seconds on two cores
def test_symmetry_check_passes_for_hessian():
    model, lf, (x,), y = zoo.gpt()
    hessfast.HessianOperator(model, lf, ((x,), y)).check_symmetric()
    with pytest.raises(ValueError, match="not symmetric"):
        hessfast.DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=D)).check_symmetric()


def test_empty_data_and_bad_options():
    model, lf, _, _ = zoo.mlp()
    H = hessfast.HessianOperator(model, lf, [])
    with pytest.raises(ValueError, match="empty"):
        H @ torch.zeros(H.shape[0], dtype=D)
    with pytest.raises(ValueError, match="max_batch_size"):
        hessfast.HessianOperator(model, lf, [], max_batch_size=0)
    bn, lf2, _, _ = zoo.cnn_bn(train=True)
    with pytest.raises(ValueError, match="BatchNorm"):
        hessfast.HessianOperator(bn, lf2, [], max_batch_size=2)
    with pytest.raises(ValueError, match="\\[P, K\\]"):
        hessfast.HessianOperator(model, lf, _data()).matmat(torch.zeros(3, 1, dtype=D))


def test_nan_product_is_an_error():
    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    x[0, 0] = float("nan")
    H = hessfast.HessianOperator(model, lf, _batches(x, y, 4))
    with pytest.raises(hessfast.NonFiniteError):
        H @ torch.randn(H.shape[0], dtype=D)


def test_dataloader_input():
    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=D)
    ref = hessfast.GGNOperator(model, lf, (x, y)) @ V
    torch.testing.assert_close(hessfast.GGNOperator(model, lf, loader) @ V, ref)


def test_groups_partition_the_vector():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    H = hessfast.HessianOperator(
        model, F.cross_entropy, (torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,)))
    )
    groups = H.groups()
    assert list(groups) == ["0", "2"]
    covered = sorted(r for rs in groups.values() for r in rs)
    assert covered[0][0] == 0 and covered[-1][1] == H.shape[0]
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    with pytest.raises(ValueError, match="matches no parameter"):
        H.groups(["nope*"])


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).to(D)


def _loader(shuffle, drop_last=False, n=22, batch=5):
    x, y = _data(n)
    ds = torch.utils.data.TensorDataset(x, y)
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=shuffle, drop_last=drop_last, generator=g
    )


def test_determinism_check_names_the_cause():
    model = _bn_model()  # training mode: batch statistics depend on the batch composition
    H = hessfast.HessianOperator(model, F.cross_entropy, _loader(shuffle=True))
    V = torch.randn(H.shape[0], 2, dtype=D)
    with pytest.raises(ValueError, match="not deterministic.*BatchNorm in training mode"):
        H @ V
    model.eval()
    H = hessfast.HessianOperator(model, F.cross_entropy, _loader(shuffle=True, drop_last=True))
    with pytest.raises(ValueError, match="drop_last=True"):
        H @ V
    # the opt-out multiplies without checking (and H is then a different matrix each pass)
    H = hessfast.HessianOperator(
        model, F.cross_entropy, _loader(shuffle=True, drop_last=True), check_deterministic=False
    )
    assert H.deterministic == "skipped" and torch.isfinite(H @ V).all()


def test_determinism_check_passes_when_only_the_order_changes():
    model = _bn_model().eval()
    x, y = _data(22)
    ref = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    H = hessfast.HessianOperator(model, F.cross_entropy, _loader(shuffle=True))
    V = torch.randn(H.shape[0], 3, dtype=D)
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-10, atol=1e-12)
    assert H.deterministic == "passed" and ref.deterministic == "not needed"
    # checked once: the second product is one pass
    calls = []
    orig = H._partial
    H._partial = lambda vec: calls.append(1) or orig(vec)
    H @ V
    assert len(calls) == 1


def test_one_mean_batch_is_its_own_hvp_bitwise():
    """A single mean batch is returned as the batch's product itself (no multiply by its weight
    and divide again): bitwise the HVP of hessfast.hvp on the flat vector."""
    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    H = hessfast.HessianOperator(model, lf, (x, y))
    V = torch.randn(H.shape[0], 2, dtype=D)
    ref = hessfast.hvp(model, lf, x, y, V.T.contiguous())
    assert torch.equal(H @ V, ref.T)


@pytest.mark.parametrize("cls", [hessfast.HessianOperator, hessfast.GGNOperator])
def test_matmat_norms_are_the_products_column_norms(cls):
    """``matmat_norms`` returns ``matmat``'s product and its column norms, and raises on a NaN
    product like ``matmat``; Products reads those norms instead of taking its own, unless
    ``matmat`` was replaced (then the replacement is what it calls)."""
    from hessfast.algorithms.krylov import Products

    model, lf, _, _ = zoo.mlp()
    x, y = _data()
    H = cls(model, lf, _batches(x, y, 4))
    V = torch.randn(H.shape[0], 3, dtype=D)
    HV, norms = H.matmat_norms(V)
    assert torch.equal(HV, H.matmat(V))
    torch.testing.assert_close(norms, HV.norm(dim=0), rtol=1e-14, atol=0)
    pr = Products(H)
    out = pr.apply(V)
    assert pr._with_norms and torch.equal(out, HV) and torch.equal(pr.col_norms, norms)
    calls = []
    H.matmat = lambda X: calls.append(X) or HV  # an instance replacement is honoured
    pr = Products(H)
    pr.apply(V)
    assert not pr._with_norms and len(calls) == 1
    x[0, 0] = float("nan")
    with pytest.raises(hessfast.NonFiniteError):
        cls(model, lf, (x, y)).matmat_norms(V)
