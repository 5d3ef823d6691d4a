"""The fused cross-entropy head (``engine`` + ``LinearCrossEntropy``) and the row op's reference.

The fused head must give the unfused engine's loss, gradient, HVP and GGN-VP, and the float64
``torch.func`` oracle's, with the rows split into several chunks (the last one ragged), and must
never hold logits-sized ``[N, V]`` tensors for the whole batch.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from cases.cross_entropy import CASES as ROWS_CASES
from kernels.harness import check_rows
from models import zoo
from oracle import ggn_vp, hvp, rel_err
from torch import nn
from torch.func import grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from hessfast import api, engine
from hessfast.profile import Profiler
from hessfast.rules import cross_entropy as ce
from hessfast.rules import registered_rule
from hessfast.vectors import parse, select_params

TOL = 1e-10
D = torch.float64


class RowSpy:
    """Records the row counts the torch row op is called with (wraps ``CrossEntropyRows.rows``)."""

    def __init__(self, monkeypatch):
        self.rows = []
        original = ce.CrossEntropyRows.rows

        def rows(impl, z, *args):
            self.rows.append(z.shape[0])
            return original(impl, z, *args)

        monkeypatch.setattr(ce.CrossEntropyRows, "rows", rows)


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setattr(engine, "FUSE_HEAD", True)
    return RowSpy(monkeypatch)


def compute(model, loss_fn, inputs, targets, v, mode, params=None, compile="interpret"):
    """``(loss, grads, products)`` of one engine run (interpreted by default, so that the spy
    counts one product's row calls; the traced product has its own test)."""
    sel = select_params(model, params)
    vec = parse({n: v[n] for n, _ in sel}, sel) if mode != "grad" else None
    return api.compute(model, loss_fn, inputs, targets, sel, vec, mode, True, compile=compile)


def unfused(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(engine, "FUSE_HEAD", False)
        return compute(*args, **kw)


def vectors(model, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


def variants(vocab, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(vocab, generator=g, dtype=D) + 0.5
    P = functools.partial
    return {
        "plain": (F.cross_entropy, None),
        "weights": (P(F.cross_entropy, weight=w), None),
        "ignore_index": (F.cross_entropy, -100),
        "smoothing": (P(F.cross_entropy, label_smoothing=0.1), None),
        "all": (P(F.cross_entropy, weight=w, ignore_index=1, label_smoothing=0.2), 1),
        "sum": (P(F.cross_entropy, weight=w, reduction="sum", label_smoothing=0.1), -100),
    }


# model, vocabulary, chunk rows, flattened positions set to ignore_index (a whole chunk included)
MODELS = {
    "mlp": (zoo.mlp, 4, 3, [1, 3, 4, 5]),  # 10 rows: chunks 3, 3, 3, 1
    "gpt": (zoo.gpt, 11, 5, [0, 5, 6, 7, 8, 9]),  # 12 rows of [2, 6, 11] logits: 5, 5, 2
}


def tokens(seed=0):
    """The GPT's head on a small body: an embedding, tanh and the tied bias-free linear head,
    ``[2, 6, 11]`` logits (the traced fused head's path at a fraction of the GPT's tracing)."""
    torch.manual_seed(seed)
    wte, head = nn.Embedding(11, 8), nn.Linear(8, 11, bias=False)
    head.weight = wte.weight
    model = nn.Sequential(wte, nn.Tanh(), head).to(D)
    idx, y = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    return model, F.cross_entropy, (idx,), y


TRACED_MODELS = {"mlp": MODELS["mlp"], "tokens": (tokens, *MODELS["gpt"][1:])}


def setup(name, variant, models=MODELS):
    build, vocab, chunk, ignored = models[name]
    model, _, inputs, targets = build()
    loss_fn, ignore = variants(vocab)[variant]
    targets = targets.clone()
    if ignore is not None:
        targets.view(-1)[ignored] = ignore
    return model, loss_fn, inputs, targets, chunk


@pytest.mark.parametrize("variant", list(variants(2)))
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_head_matches_unfused_and_oracle(name, variant, spy, monkeypatch):
    model, loss_fn, inputs, targets, chunk = setup(name, variant)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    v = vectors(model, 3)
    n = targets.numel()
    for mode in ("hvp", "ggn", "grad"):
        spy.rows.clear()
        loss, g, hv = compute(model, loss_fn, inputs, targets, v, mode)
        assert spy.rows == [min(chunk, n - r) for r in range(0, n, chunk)]
        loss0, g0, hv0 = unfused(monkeypatch, model, loss_fn, inputs, targets, v, mode)
        torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=1e-14)
        if g0 is not None:
            assert rel_err(g, g0) < TOL
        if hv0 is not None:
            assert rel_err(hv, hv0) < TOL
        if mode == "hvp":
            assert rel_err(hv, hvp(model, loss_fn, inputs, targets, v)) < TOL
        if mode == "ggn":
            assert rel_err(hv, ggn_vp(model, loss_fn, inputs, targets, v)) < TOL


SUBSETS = {
    "mlp": [["4.weight", "4.bias"], ["0.weight"], ["4.bias"], ["2.weight", "4.bias"]],
    # wte.weight is tied to the head: h and W active together; ln.*: h only
    "gpt": [["wte.weight"], ["ln.weight", "ln.bias"], ["wpe.weight", "wte.weight"]],
}


@pytest.mark.parametrize("name,params", [(m, p) for m, subsets in SUBSETS.items() for p in subsets])
def test_fused_head_with_parameter_subsets(name, params, spy, monkeypatch):
    """Which of h, W, b are active changes which cotangents the head forms."""
    model, loss_fn, inputs, targets, chunk = setup(name, "all")
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    v = {n: t for n, t in vectors(model, 2).items() if n in params}
    _, g, hv = compute(model, loss_fn, inputs, targets, v, "hvp", params)
    assert spy.rows
    _, g0, hv0 = unfused(monkeypatch, model, loss_fn, inputs, targets, v, "hvp", params)
    assert rel_err(g, g0) < TOL and rel_err(hv, hv0) < TOL
    assert rel_err(hv, hvp(model, loss_fn, inputs, targets, v)) < TOL
    _, _, gv = compute(model, loss_fn, inputs, targets, v, "ggn", params)
    assert rel_err(gv, ggn_vp(model, loss_fn, inputs, targets, v)) < TOL


def test_k_vectors_at_once_equal_one_at_a_time(spy, monkeypatch):
    model, loss_fn, inputs, targets, chunk = setup("gpt", "all")
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    v = vectors(model, 3)
    _, _, hv = compute(model, loss_fn, inputs, targets, v, "hvp")
    for i in range(3):
        _, _, one = compute(
            model, loss_fn, inputs, targets, {n: t[i : i + 1] for n, t in v.items()}, "hvp"
        )
        assert rel_err({n: t[i] for n, t in hv.items()}, {n: t[0] for n, t in one.items()}) < 1e-13


class Shapes(TorchDispatchMode):
    """Records the shape of every new tensor an aten op returns (views of others excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_head_never_holds_logits_of_the_whole_batch(name, spy, monkeypatch):
    """Every tensor with classes on its last axis has at most K × chunk rows (the unfused path,
    run as a control, holds ``[N, V]`` logits and ``[K, N, V]`` tangents)."""
    model, loss_fn, inputs, targets, chunk = setup(name, "all")
    vocab = MODELS[name][1]
    k = 2
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    n = targets.numel()
    assert n > k * chunk
    v = vectors(model, k)

    def rows_with_classes_last(run):
        run()  # capture (torch.export traces the model) outside the recording
        with Shapes() as mode:
            run()
        return max(torch.Size(s).numel() // vocab for s in mode.shapes if len(s) and s[-1] == vocab)

    for m in ("hvp", "ggn", "grad"):
        fused = rows_with_classes_last(lambda: compute(model, loss_fn, inputs, targets, v, m))
        assert fused <= max(k, 1) * chunk
        assert max(spy.rows) <= chunk
        control = rows_with_classes_last(
            lambda: unfused(monkeypatch, model, loss_fn, inputs, targets, v, m)
        )
        assert control >= n


def test_automatic_fusion_follows_the_chunk_budget(monkeypatch):
    """``FUSE_HEAD = None`` fuses only when ``[K+1, N, V]`` exceeds the chunk budget."""
    model, loss_fn, inputs, targets, _ = setup("gpt", "weights")
    spy = RowSpy(monkeypatch)
    v = vectors(model, 2)
    monkeypatch.setattr(engine, "FUSE_HEAD", None)
    _, _, want = compute(model, loss_fn, inputs, targets, v, "hvp")
    assert spy.rows == []
    logits_bytes = 3 * targets.numel() * 11 * 8
    monkeypatch.setattr(ce, "HEAD_CHUNK_BYTES", logits_bytes - 1)
    _, _, got = compute(model, loss_fn, inputs, targets, v, "hvp")
    assert spy.rows and max(spy.rows) < targets.numel()
    assert rel_err(got, want) < TOL


class ViewHead(nn.Module):
    """A linear head on ``[B, T, D]`` whose logits are reshaped (``classes_last``) or transposed
    to torch's ``[B, V, T]`` layout (not fused: the classes leave the last axis)."""

    def __init__(self, classes_last=True):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 7)
        self.classes_last = classes_last

    def forward(self, x):
        z = self.head(torch.tanh(self.body(x)))
        return z.reshape(-1, 7) if self.classes_last else z.transpose(1, 2)


@pytest.mark.parametrize("classes_last", [True, False])
def test_views_between_the_head_and_the_output(classes_last, spy, monkeypatch):
    torch.manual_seed(0)
    model = ViewHead(classes_last).to(D)
    x = torch.randn(2, 4, 5, dtype=D)
    y = torch.randint(0, 7, (8,) if classes_last else (2, 4))
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=0.1)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 3)
    v = vectors(model, 2)
    _, _, hv = compute(model, loss_fn, (x,), y, v, "hvp")
    assert bool(spy.rows) == classes_last
    assert rel_err(hv, hvp(model, loss_fn, (x,), y, v)) < TOL


def test_other_heads_are_not_fused(spy):
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=D)
    lin = nn.Linear(3, 4).to(D)
    v = vectors(lin, 1)
    soft = torch.softmax(torch.randn(6, 4, dtype=D), -1)
    compute(lin, F.cross_entropy, (x,), soft, v, "hvp")  # soft targets
    compute(lin, F.mse_loss, (x,), torch.randn(6, 4, dtype=D), v, "hvp")  # another loss
    after = nn.Sequential(lin, nn.Tanh())  # the output is not the linear layer's
    compute(after, F.cross_entropy, (x,), torch.randint(0, 4, (6,)), vectors(after, 1), "hvp")
    assert spy.rows == []


def test_profiler_records_the_fused_head(spy, monkeypatch):
    model, loss_fn, inputs, targets, chunk = setup("mlp", "plain")
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    sel = select_params(model, None)
    vec = parse(vectors(model, 2), sel)
    prof = Profiler(torch.device("cpu"))
    api.compute(model, loss_fn, inputs, targets, sel, vec, "hvp", True, profiler=prof)
    loss = [(r.name, nb) for s, r, p, _, nb in prof.records if p == "loss"]
    assert len(loss) == 1 and loss[0][0] == "linear_cross_entropy" and loss[0][1] > 0
    linears = [s for s, _, p, _, _ in prof.records if s is not None and p == "forward"]
    assert sum(str(s.op) == "aten.linear.default" for s in linears) == 2  # of 3: one is fused


def test_out_of_range_target_is_refused(spy):
    model, loss_fn, inputs, targets, _ = setup("mlp", "plain")
    targets = targets.clone()
    targets[2] = 4
    with pytest.raises(IndexError, match="out of bounds"):
        compute(model, loss_fn, inputs, targets, vectors(model, 1), "hvp")


def test_low_precision_fused_head_is_as_accurate_as_unfused(spy, monkeypatch):
    """bfloat16 / float32 models: the fused head's error against the float64 oracle is at most
    twice the unfused path's (cotangents of W accumulate over chunks in float32)."""
    model, loss_fn, inputs, targets, chunk = setup("gpt", "all")
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", 2)
    v = vectors(model, 2)
    want = hvp(model, loss_fn, inputs, targets, v)
    for dtype in (torch.float32, torch.bfloat16):
        low = zoo.gpt()[0].to(dtype)
        lv = {n: t.to(dtype) for n, t in v.items()}
        fn = functools.partial(
            loss_fn.func, **{**loss_fn.keywords, "weight": loss_fn.keywords["weight"].to(dtype)}
        )
        _, _, got = compute(low, fn, inputs, targets, lv, "hvp")
        _, _, ref = unfused(monkeypatch, low, fn, inputs, targets, lv, "hvp")
        err = rel_err({n: t.double() for n, t in got.items()}, want)
        ref_err = rel_err({n: t.double() for n, t in ref.items()}, want)
        assert err <= 2 * ref_err + (1e-6 if dtype == torch.float32 else 0), (dtype, err, ref_err)


# ---- the row op's reference ------------------------------------------------------------------

ROW_CASES = {
    "plain": dict(),
    "weights": dict(weight=True),
    "ignore": dict(ignore_index=2),
    "smoothing": dict(label_smoothing=0.15),
    "all": dict(weight=True, ignore_index=-100, label_smoothing=0.3),
    "sum": dict(weight=True, label_smoothing=0.3, reduction="sum"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_reference_matches_torch_func_oracle(case):
    """``cross_entropy_rows_ref`` against ``F.cross_entropy``'s value, ``grad`` and ``jvp(grad)``
    in float64, and against the unfused loss rule."""
    kw = dict(ROW_CASES[case])
    M, V, K = 7, 5, 3
    z = torch.randn(M, V, dtype=D) * 2
    u = torch.randn(K, M, V, dtype=D)
    y = torch.randint(0, V, (M,))
    ignore = kw.get("ignore_index", -100)
    y[[1, 4]] = ignore
    weight = torch.rand(V, dtype=D) + 0.5 if kw.pop("weight", False) else None
    kw["weight"] = weight

    def L(x):
        return F.cross_entropy(x, y, **kw)

    rule = ce.CrossEntropyLoss(
        y, weight, ignore, kw.get("reduction", "mean"), kw.get("label_smoothing", 0.0)
    )
    fused = ce.LinearCrossEntropy(rule)
    scale = float(fused.scale(y))
    loss_rows, gz, gdz = registered_rule(ce.ROWS_OP).rows(
        z, u, y, weight, ignore, kw.get("label_smoothing", 0.0), scale, True
    )
    assert loss_rows.dtype == D and gz.dtype == D and gdz.dtype == D
    torch.testing.assert_close(loss_rows.sum(), L(z), rtol=1e-12, atol=1e-14)
    assert (
        (loss_rows[[1, 4]] == 0).all() and (gz[[1, 4]] == 0).all() and (gdz[:, [1, 4]] == 0).all()
    )
    torch.testing.assert_close(gz, grad(L)(z), rtol=1e-12, atol=1e-14)
    want = vmap(lambda t: jvp(grad(L), (z,), (t,))[1])(u)
    torch.testing.assert_close(gdz, want, rtol=1e-12, atol=1e-14)
    loss0, g0, gd0 = rule.evaluate(z, u, "hvp")
    torch.testing.assert_close(loss_rows.sum(), loss0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gz, g0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gdz, gd0, rtol=1e-12, atol=1e-14)
    # GGN (no gradient) and gradient-only calls
    none_g = registered_rule(ce.ROWS_OP).rows(z, u, y, weight, ignore, 0.0, scale, False)
    assert none_g[1] is None and none_g[2] is not None
    none_t = registered_rule(ce.ROWS_OP).rows(z, None, y, weight, ignore, 0.0, scale, True)
    assert none_t[2] is None and none_t[1] is not None


def test_row_reference_low_precision_dtypes():
    z = torch.randn(4, 9, dtype=torch.bfloat16)
    u = torch.randn(2, 4, 9, dtype=torch.bfloat16)
    y = torch.randint(0, 9, (4,))
    loss_rows, gz, gdz = ce.cross_entropy_rows_ref(z, u, y, None, -100, 0.1, 0.25, True)
    assert loss_rows.dtype == torch.float32 and gz.dtype == gdz.dtype == torch.bfloat16
    want = ce.cross_entropy_rows_ref(z.double(), u.double(), y, None, -100, 0.1, 0.25, True)
    for a, b in zip((loss_rows, gz, gdz), want):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", list(TRACED_MODELS))
def test_traced_fused_head_reads_each_batch_count(name, spy, monkeypatch):
    """The fused head's mean denominator is a tensor of the graph: one trace serves batches with
    different numbers of ignored targets, and equals the interpreter and the unfused path."""
    from hessfast import capture, traced

    model, loss_fn, inputs, targets, chunk = setup(name, "all", TRACED_MODELS)
    monkeypatch.setattr(ce, "HEAD_CHUNK_ROWS", chunk)
    monkeypatch.setattr(engine, "FUSE_HEAD", True)
    v = vectors(model, 2)
    other = targets.clone()
    other.view(-1)[: other.numel() // 2] = 1  # ignore_index of the "all" variant
    for mode in ("hvp", "ggn", "grad"):
        for y in (targets, other):
            got = compute(model, loss_fn, inputs, y, v, mode, compile=None)
            want = compute(model, loss_fn, inputs, y, v, mode)
            for a, b in zip(got, want):
                if isinstance(a, dict):
                    for n in a:
                        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12)
                elif a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    info = traced.explain(capture.capture(model, tuple(inputs)))
    assert len(info) == 3 and all(t["traced"] and t["calls"] == 2 for t in info)
    assert spy.rows  # the fused head ran


@pytest.mark.parametrize("case", list(ROWS_CASES))
def test_row_reference_runs_the_family_case_table(case):
    """The torch reference on every case of ``tests/cases/cross_entropy.py`` (which the Triton and
    CUDA kernel tests run too), float64 against the autograd oracle."""
    args = ROWS_CASES[case].args()
    impl = registered_rule(ce.ROWS_OP)
    check_rows(impl.rows, impl, args, dtype=D, device="cpu", tolerance=(1e-12, 1e-13))
