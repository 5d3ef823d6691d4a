"""Repeated products (hessfast/replay.py): a call like the last replayed one skips the full path,
gives what the full path gives, and every change a guard watches sends it back to the full path."""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from oracle import double_backward_hvp, rel_err

import hessfast
from hessfast import api, replay

D = torch.float64


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, v


@pytest.fixture
def full_path(monkeypatch):
    """Counts the calls that take the full path (api.compute)."""
    calls = []
    compute = api.compute

    def counted(*a, **k):
        calls.append(1)
        return compute(*a, **k)

    monkeypatch.setattr(api, "compute", counted)
    return calls


PRODUCTS = {
    "hvp": lambda m, lf, x, y, v: hessfast.hvp(m, lf, x, y, v),
    "hvp-grad": lambda m, lf, x, y, v: hessfast.hvp(m, lf, x, y, v, return_grad=True),
    "ggn": lambda m, lf, x, y, v: hessfast.ggn_vp(m, lf, x, y, v),
    "residual": lambda m, lf, x, y, v: hessfast.residual_vp(m, lf, x, y, v),
    "grad": lambda m, lf, x, y, v: hessfast.grad(m, lf, x, y),
    "grad-flat": lambda m, lf, x, y, v: hessfast.grad(m, lf, x, y, flat=True),
}


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(p, q) for p, q in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("product", sorted(PRODUCTS))
@pytest.mark.parametrize("batched", [False, True])
def test_a_replay_equals_the_full_path_bitwise(product, batched, full_path):
    model, x, y, v = _problem()
    if batched:
        v = {n: torch.stack([t, 2 * t]) for n, t in v.items()}
    f = PRODUCTS[product]
    for _ in range(3):  # interpreted, traced (first replay checked), replayed and recorded
        f(model, F.cross_entropy, x, y, v)
    n = len(full_path)
    x2, v2 = x + 1, {n: t.flip(-1) for n, t in v.items()}
    got = f(model, F.cross_entropy, x2, y, v2)
    assert len(full_path) == n  # replayed
    replay.ENABLED = False
    try:
        want = f(model, F.cross_entropy, x2, y, v2)
    finally:
        replay.ENABLED = True
    assert len(full_path) == n + 1
    assert _same(got, want)


def _oracle(model, lf, x, y, v):
    out = double_backward_hvp(model, lf, (x,), y, {n: t[None] for n, t in v.items()})
    return {n: t[0] for n, t in out.items()}


def _warm(model, lf, x, y, v, full_path):
    """Products until one is replayed; returns the full-path count then."""
    for _ in range(4):
        n = len(full_path)
        hessfast.hvp(model, lf, x, y, v)
        if len(full_path) == n:
            return n
    raise AssertionError("no product was replayed")


def test_parameter_values_are_read_as_they_are(full_path):
    model, x, y, v = _problem()
    n = _warm(model, F.cross_entropy, x, y, v, full_path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimizer step: the same objects, new values
    got = hessfast.hvp(model, F.cross_entropy, x, y, v)
    assert len(full_path) == n
    want = _oracle(model, F.cross_entropy, x, y, v)
    assert rel_err(got, want) < 1e-12


def _eval(m, lf, x, y, v):
    m.eval()
    return lf, x, y, v


def _rebind(m, lf, x, y, v):
    with torch.no_grad():  # the same Parameter object, other strides: no version bump
        m[2].weight.data = torch.randn(6, 3, dtype=D).T
    return lf, x, y, v


def _requires_grad(m, lf, x, y, v):
    m[0].bias.requires_grad_(False)
    return lf, x, y, {n: t for n, t in v.items() if n != "0.bias"}


CHANGES = {
    "eval mode": _eval,
    "a rebound parameter": _rebind,
    "requires_grad": _requires_grad,
    "another loss": lambda m, lf, x, y, v: (functools.partial(F.cross_entropy), x, y, v),
    "batch shape": lambda m, lf, x, y, v: (lf, x[:5], y[:5], v),
    "v order": lambda m, lf, x, y, v: (lf, x, y, dict(reversed(v.items()))),
    "input strides": lambda m, lf, x, y, v: (lf, x.T.contiguous().T, y, v),
    "v strides": lambda m, lf, x, y, v: (
        lf,
        x,
        y,
        {n: t.T.contiguous().T if t.dim() == 2 else t for n, t in v.items()},
    ),
}


@pytest.fixture(params=["c++", "python"])
def metas_by(request, monkeypatch):
    """Both ways a replay compares its inputs' metas: torch's C++ tensor guard, and
    :func:`hessfast.traced._metas` where that guard is missing."""
    if request.param == "python":
        monkeypatch.setattr(replay, "_TensorGuards", None)
    return request.param


def test_a_tensor_guard_that_raises_falls_back_to_python(monkeypatch, full_path):
    def broken(*a, **k):
        raise TypeError("a changed signature")

    monkeypatch.setattr(replay, "_TensorGuards", broken)
    model, x, y, v = _problem()
    n = _warm(model, F.cross_entropy, x, y, v, full_path)
    (r,) = replay._RECORDS[model].values()
    assert r.guard is None
    got = hessfast.hvp(model, F.cross_entropy, x, y, v)
    assert len(full_path) == n  # replayed, the metas compared in Python
    assert rel_err(got, _oracle(model, F.cross_entropy, x, y, v)) < 1e-12


def test_the_cxx_tensor_guard_is_used_where_torch_has_it():
    model, x, y, v = _problem()
    for _ in range(3):
        hessfast.hvp(model, F.cross_entropy, x, y, v)
    (r,) = replay._RECORDS[model].values()
    assert (r.guard is not None) == (replay._TensorGuards is not None)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_guard_sends_a_change_to_the_full_path(change, full_path, metas_by):
    model, x, y, v = _problem()
    n = _warm(model, F.cross_entropy, x, y, v, full_path)
    lf, x2, y2, v2 = CHANGES[change](model, F.cross_entropy, x, y, v)
    got = hessfast.hvp(model, lf, x2, y2, v2)
    assert len(full_path) == n + 1
    assert list(got) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert rel_err(got, _oracle(model, lf, x2, y2, v2)) < 1e-12


def test_requires_grad_of_a_parameter_the_graph_does_not_read(full_path, metas_by):
    """A parameter no product reads is no graph input, so no tensor guard sees it: its
    ``requires_grad`` (which decides the returned keys) is compared apart."""
    model, x, y, _ = _problem()
    model.register_parameter("unused", torch.nn.Parameter(torch.randn(3, dtype=D)))
    for _ in range(3):
        hessfast.grad(model, F.cross_entropy, x, y)
    n = len(full_path)
    assert "unused" in hessfast.grad(model, F.cross_entropy, x, y)
    assert len(full_path) == n  # replayed
    model.unused.requires_grad_(False)
    got = hessfast.grad(model, F.cross_entropy, x, y)
    assert len(full_path) == n + 1
    assert "unused" not in got


def test_a_changed_loss_keyword_is_a_change(full_path):
    model, x, y, v = _problem()
    lf = functools.partial(F.cross_entropy, label_smoothing=0.0)
    n = _warm(model, lf, x, y, v, full_path)
    lf.keywords["label_smoothing"] = 0.2  # a partial's keywords can be changed in place
    got = hessfast.hvp(model, lf, x, y, v)
    assert len(full_path) == n + 1
    assert rel_err(got, _oracle(model, lf, x, y, v)) < 1e-12


@pytest.mark.parametrize("how", ["environment", "use_backend"])
def test_another_backend_request_is_a_change(how, full_path, monkeypatch):
    """The replay compares the raw request (:func:`hessfast.dispatch.request_state`): the
    ``HESSFAST_BACKEND`` variable set or changed after the record, or a ``use_backend`` block,
    takes the full path, and a record then serves the new request."""
    model, x, y, v = _problem()
    n = _warm(model, F.cross_entropy, x, y, v, full_path)
    with contextlib.ExitStack() as stack:
        if how == "environment":
            monkeypatch.setenv("HESSFAST_BACKEND", "torch")
        else:
            stack.enter_context(hessfast.use_backend("torch"))
        hessfast.hvp(model, F.cross_entropy, x, y, v)
        assert len(full_path) == n + 1
        n = _warm(model, F.cross_entropy, x, y, v, full_path)
        got = hessfast.hvp(model, F.cross_entropy, x, y, v)
        assert len(full_path) == n
        assert rel_err(got, _oracle(model, F.cross_entropy, x, y, v)) < 1e-12
    if how == "environment":
        monkeypatch.setenv("HESSFAST_BACKEND", "auto")
    hessfast.hvp(model, F.cross_entropy, x, y, v)
    assert len(full_path) == n + 1


def test_bad_inputs_of_a_replay_are_errors_as_on_the_full_path(full_path, metas_by):
    model, x, y, v = _problem()
    _warm(model, F.cross_entropy, x, y, v, full_path)
    with pytest.raises(IndexError, match="out of bounds"):
        hessfast.hvp(model, F.cross_entropy, x, torch.full_like(y, 3), v)
    bad = dict(v)
    bad["2.weight"] = v["2.weight"].clone()
    bad["2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"v\['2\.weight'\] contains NaN or Inf"):
        hessfast.hvp(model, F.cross_entropy, x, y, bad)
    with pytest.raises(ValueError, match=r"v\['0\.weight'\] has dtype torch.float32"):
        hessfast.hvp(model, F.cross_entropy, x, y, {n: t.float() for n, t in v.items()})
    x_inf = x.clone()
    x_inf[0, 0] = float("inf")
    with pytest.raises(hessfast.NonFiniteError):
        hessfast.hvp(model, F.cross_entropy, x_inf, y, v)
    out = hessfast.hvp(model, F.cross_entropy, x_inf, y, v, check_finite=False)
    assert not all(torch.isfinite(t).all() for t in out.values())
    got = hessfast.hvp(model, F.cross_entropy, x, y, v)  # and the record still serves
    assert rel_err(got, _oracle(model, F.cross_entropy, x, y, v)) < 1e-12


def test_clear_cache_forgets_the_records(full_path):
    model, x, y, v = _problem()
    n = _warm(model, F.cross_entropy, x, y, v, full_path)
    hessfast.capture.clear_cache()
    hessfast.hvp(model, F.cross_entropy, x, y, v)
    assert len(full_path) == n + 1


# --- custom losses: lowered again on every call, as the full path does ------------------------


def _sequence_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).to(D)
    x, y = torch.randn(2, 3, 4, dtype=D), torch.randint(0, 5, (2, 3))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, v


SMOOTHING = [0.0]


def _flat_ce(z, y):
    """The language-model idiom: cross-entropy on flattened logits, reading a global option."""
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), label_smoothing=SMOOTHING[0])


@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_a_custom_loss_is_replayed_bitwise(product, full_path):
    model, x, y, v = _sequence_problem()
    for _ in range(3):
        PRODUCTS[product](model, _flat_ce, x, y, v)
    n = len(full_path)
    got = PRODUCTS[product](model, _flat_ce, x, y, v)
    assert len(full_path) == n  # replayed
    replay.ENABLED = False
    try:
        want = PRODUCTS[product](model, _flat_ce, x, y, v)
    finally:
        replay.ENABLED = True
    assert _same(got, want)


def test_a_custom_loss_that_reads_other_options_takes_the_full_path(full_path, metas_by):
    model, x, y, v = _sequence_problem()
    n = _warm(model, _flat_ce, x, y, v, full_path)
    SMOOTHING[0] = 0.3  # what the callable passes changed: its lowered rule did
    try:
        got = hessfast.hvp(model, _flat_ce, x, y, v)
        assert len(full_path) == n + 1
        assert rel_err(got, _oracle(model, _flat_ce, x, y, v)) < 1e-12
        y2 = torch.randint(0, 5, (3, 2))  # other targets' shape: other lowered shapes
        got = hessfast.hvp(model, _flat_ce, x.reshape(3, 2, 4), y2, v)
        assert len(full_path) == n + 2
        assert rel_err(got, _oracle(model, _flat_ce, x.reshape(3, 2, 4), y2, v)) < 1e-12
    finally:
        SMOOTHING[0] = 0.0


def test_a_custom_loss_replay_names_a_target_out_of_range(full_path):
    model, x, y, v = _sequence_problem()
    _warm(model, _flat_ce, x, y, v, full_path)
    with pytest.raises(IndexError, match="out of bounds"):
        hessfast.hvp(model, _flat_ce, x, torch.full_like(y, 7), v)


def _seq_problem():
    """A token model: logits [B, T, C] with targets [B, T] (hessfast's sequence layout)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).to(D)
    x, y = torch.randn(2, 3, 4, dtype=D), torch.randint(0, 5, (2, 3))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, v


def _log_softmax_problem():
    model, x, y, v = _problem()
    return torch.nn.Sequential(*model, torch.nn.LogSoftmax(-1)), x, y, v


OUT_OF_RANGE = {  # loss, problem, the classes, ignore_index
    "cross_entropy": (F.cross_entropy, _problem, 3, -100),
    "label_smoothing": (functools.partial(F.cross_entropy, label_smoothing=0.1), _problem, 3, -100),
    "ignore_index=1": (functools.partial(F.cross_entropy, ignore_index=1), _problem, 3, 1),
    "nll_loss": (F.nll_loss, _log_softmax_problem, 3, -100),
    "sequence": (F.cross_entropy, _seq_problem, 5, -100),
    "sequence-fused-head": (F.cross_entropy, _seq_problem, 5, -100),
}


@pytest.mark.parametrize("bad", ["C", "-1", "C+1000", "beside ignored"])
@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_a_replay_refuses_targets_out_of_range(case, bad, full_path, monkeypatch):
    """On the CPU a replay of an aten-only graph skips the separate range check
    (:func:`hessfast.replay.checks_bounds`): the graph's own indexing kernels refuse the bad
    target, and the full path then raises torch's ``IndexError``, for every hard-target loss
    variant, the sequence layout and the fused head; a good batch replays again after."""
    from hessfast import engine

    monkeypatch.setattr(engine, "FUSE_HEAD", case.endswith("fused-head"))
    lf, problem, C, ignore = OUT_OF_RANGE[case]
    model, x, y, v = problem()
    _warm(model, lf, x, y, v, full_path)
    (r,) = replay._RECORDS[model].values()
    assert r.classes is None  # the graph checks: no separate range check
    y_bad = y.clone()
    flat = y_bad.view(-1)
    if bad == "beside ignored":
        flat[0], flat[1] = ignore, C
    else:
        flat[-1] = {"C": C, "-1": -1 if ignore != -1 else -2, "C+1000": C + 1000}[bad]
    with pytest.raises(IndexError, match="out of bounds"):
        hessfast.hvp(model, lf, x, y_bad, v)
    n = len(full_path)
    got = hessfast.hvp(model, lf, x, y, v)
    assert len(full_path) == n  # replayed
    assert rel_err(got, _oracle(model, lf, x, y, v)) < 1e-12


def test_the_range_check_stays_before_graphs_that_may_not_check(monkeypatch, full_path):
    """Where the graph is not plain aten (a hessfast kernel, a compiled graph) the replay keeps
    the range check before it."""
    model, x, y, v = _problem()
    _warm(model, F.cross_entropy, x, y, v, full_path)
    (r,) = replay._RECORDS[model].values()
    r.trace.aten_only = False
    replay.clear()
    _warm(model, F.cross_entropy, x, y, v, full_path)
    (r,) = replay._RECORDS[model].values()
    assert r.classes is not None
    with pytest.raises(IndexError, match="out of bounds"):
        hessfast.hvp(model, F.cross_entropy, x, torch.full_like(y, 3), v)


def test_graphs_with_unchecked_indexing_keep_the_range_check():
    """``checks_bounds`` vouches only for graphs of bounds-checking aten ops: not one holding an
    ``_unsafe_index`` (no bounds check), a hessfast kernel, or targets off the CPU."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hessfast import traced

    def safe(x, i):
        return torch.gather(x, 1, i[:, None])

    def unsafe(x, i):
        return torch.ops.aten._unsafe_index(x, [i])

    x, i = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    y = torch.zeros(4, dtype=torch.long)
    got = {}
    for name, f in {"safe": safe, "unsafe": unsafe}.items():
        trace = traced.Trace(fn=traced.Direct(make_fx(f)(x, i)))
        got[name] = replay.checks_bounds(trace, y)
    assert got == {"safe": True, "unsafe": False}
    assert not replay.checks_bounds(traced.Trace(), y)  # nothing eager to vouch for
    assert not replay.checks_bounds(traced.Trace(fn=None), y.to("meta"))
