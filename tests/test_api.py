"""The public API's contract: structures of v, parameter subsets, caching, and bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import zoo
from oracle import ggn_vp as oracle_ggn_vp
from oracle import hvp as oracle_hvp
from oracle import rel_err
from torch import nn

import hessfast
from hessfast import capture

D = torch.float64


def _mlp():
    return zoo.mlp()


def test_flat_and_dict_vectors_agree():
    m, lf, x, y = _mlp()
    names = [n for n, _ in m.named_parameters()]
    flat = torch.randn(sum(p.numel() for p in m.parameters()), dtype=D)
    d, off = {}, 0
    for n, p in m.named_parameters():
        d[n] = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
    hd = hessfast.hvp(m, lf, x, y, d)
    hf = hessfast.hvp(m, lf, x, y, flat)
    assert list(hd) == names
    assert hf.shape == flat.shape
    torch.testing.assert_close(hf, torch.cat([hd[n].flatten() for n in names]))


def test_k_axis_is_kept_in_every_layout():
    m, lf, x, y = _mlp()
    P = sum(p.numel() for p in m.parameters())
    assert hessfast.hvp(m, lf, x, y, torch.randn(4, P, dtype=D)).shape == (4, P)
    d = {n: torch.randn(2, *p.shape, dtype=D) for n, p in m.named_parameters()}
    out = hessfast.ggn_vp(m, lf, x, y, d)
    assert all(out[n].shape == d[n].shape for n in d)


def test_return_grad_gives_gradient_in_v_structure():
    m, lf, x, y = _mlp()
    v = {n: torch.randn(3, *p.shape, dtype=D) for n, p in m.named_parameters()}
    hv, g = hessfast.hvp(m, lf, x, y, v, return_grad=True)
    ref = hessfast.grad(m, lf, x, y)
    assert all(g[n].shape == p.shape for n, p in m.named_parameters())
    for n in ref:
        torch.testing.assert_close(g[n], ref[n])
    flat_g = hessfast.grad(m, lf, x, y, flat=True)
    assert flat_g.shape == (sum(p.numel() for p in m.parameters()),)


def test_params_subset_with_glob_is_the_diagonal_block():
    """A glob over a nested block in the middle of the model (names of several levels)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Linear(8, 8))
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), block, nn.Tanh(), nn.Linear(8, 4)).to(D)
    _, lf, x, y = _mlp()
    sub = [n for n, _ in m.named_parameters() if n.startswith("2.")]
    assert sub == ["2.0.0.weight", "2.0.0.bias", "2.1.weight", "2.1.bias"]
    v = {n: torch.randn(2, *m.get_parameter(n).shape, dtype=D) for n in sub}
    got = hessfast.hvp(m, lf, x, y, v, params="2.*")
    assert list(got) == sub
    assert rel_err(got, oracle_hvp(m, lf, x, y, v)) < 1e-10


def test_params_list_of_names_and_requires_grad_default():
    m, lf, x, y = _mlp()
    m[0].weight.requires_grad_(False)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters() if p.requires_grad}
    out = hessfast.hvp(m, lf, x, y, v)
    assert "0.weight" not in out
    out2 = hessfast.hvp(m, lf, x, y, {"4.bias": v["4.bias"]}, params=["4.bias"])
    assert list(out2) == ["4.bias"]


def test_unmatched_pattern_is_an_error():
    m, lf, x, y = _mlp()
    with pytest.raises(ValueError, match="matches no parameter"):
        hessfast.hvp(m, lf, x, y, {}, params="nope.*")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda v: v.pop("0.weight"), "missing .*0.weight"),
        (lambda v: v.update(extra=torch.zeros(1, dtype=D)), "unexpected .*extra"),
        (lambda v: v.update({"0.bias": torch.zeros(5, dtype=D)}), "0.bias.*shape"),
        (lambda v: v.update({"0.bias": torch.zeros(8, dtype=torch.float32)}), "0.bias.*dtype"),
        (lambda v: v.update({"0.bias": torch.full((8,), float("nan"), dtype=D)}), "0.bias.*NaN"),
        (lambda v: v.update({"0.bias": torch.zeros(2, 8, dtype=D)}), "0.bias.*leading K"),
    ],
)
def test_bad_vectors_raise_value_error_naming_the_parameter(mutate, match):
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    mutate(v)
    with pytest.raises(ValueError, match=match):
        hessfast.hvp(m, lf, x, y, v)


def test_bad_flat_vector_length():
    m, lf, x, y = _mlp()
    with pytest.raises(ValueError, match="P="):
        hessfast.hvp(m, lf, x, y, torch.zeros(3, dtype=D))


def test_second_call_does_not_reexport():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    before = capture.EXPORT_COUNT
    x2, y2 = torch.randn_like(x[0]), torch.randint(0, 4, y.shape)
    hessfast.hvp(m, lf, (x2,), y2, v)
    hessfast.grad(m, lf, (x2,), y2)
    assert capture.EXPORT_COUNT == before
    hessfast.hvp(m, lf, (torch.randn(3, 6, dtype=D),), y2[:3], v)  # new shape: one export
    assert capture.EXPORT_COUNT == before + 1


def test_replacing_a_submodule_recaptures():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    m[3] = nn.Sequential(nn.Tanh())  # was GELU: a stale graph would differentiate GELU
    v = {n: torch.randn(1, *p.shape, dtype=D) for n, p in m.named_parameters()}
    got = hessfast.hvp(m, lf, x, y, v)
    assert rel_err(got, oracle_hvp(m, lf, x, y, v)) < 1e-10


def test_new_data_gives_new_answer_with_cached_program():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    x2 = (torch.randn_like(x[0]),)
    got = hessfast.hvp(m, lf, x2, y, {n: t[None] for n, t in v.items()})
    assert rel_err(got, oracle_hvp(m, lf, x2, y, {n: t[None] for n, t in v.items()})) < 1e-10


def test_dropout_in_training_mode_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2)).to(D).train()
    x, y = torch.randn(3, 4, dtype=D), torch.tensor([0, 1, 0])
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.DropoutError, match=r"model\.eval\(\)"):
        hessfast.hvp(m, F.cross_entropy, x, y, v)
    m.eval()
    hessfast.hvp(m, F.cross_entropy, x, y, v)  # fine in eval mode


def test_non_finite_result_is_an_error_unless_opted_out():
    m, lf, x, y = _mlp()
    x = (x[0].clone(),)
    x[0][0, 0] = float("inf")
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.NonFiniteError, match="check_finite=False"):
        hessfast.hvp(m, lf, x, y, v)
    out = hessfast.hvp(m, lf, x, y, v, check_finite=False)
    assert not all(torch.isfinite(t).all() for t in out.values())


@torch.library.custom_op("hessfast_test::opaque_sin", mutates_args=())
def opaque_sin(x: torch.Tensor) -> torch.Tensor:
    """A custom kernel with no autograd formula: export keeps it whole, nothing differentiates it."""
    return x.sin()


@opaque_sin.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return opaque_sin(self.lin(x))


def test_capture_failure_falls_back_to_autograd_with_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export cannot capture it
                return self.lin(x)
            return -self.lin(x)

    m = Dynamic().to(D)
    x, y = torch.rand(4, 3, dtype=D), torch.tensor([0, 1, 1, 0])
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in m.named_parameters()}
    with pytest.warns(UserWarning, match="could not capture"):
        got = hessfast.hvp(m, F.cross_entropy, x, y, v)
    assert rel_err(got, oracle_hvp(m, F.cross_entropy, (x,), y, v)) < 1e-10
    with pytest.raises(hessfast.CaptureError):
        hessfast.hvp(m, F.cross_entropy, x, y, v, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hessfast.ggn_vp(m, F.cross_entropy, x, y, v)
    from oracle import ggn_vp

    assert rel_err(g, ggn_vp(m, F.cross_entropy, (x,), y, v)) < 1e-10


def test_op_that_cannot_be_differentiated_twice_names_op_and_module():
    m = Opaque().to(D)
    x = torch.randn(2, 3, dtype=D)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.UnsupportedOpError, match="opaque_sin.*<model> \\(Opaque\\)"):
        hessfast.hvp(m, F.mse_loss, x, torch.zeros(2, 3, dtype=D), v)


def test_buffers_and_parameters_unchanged():
    m, lf, x, y = zoo.cnn_bn(train=True)
    before = {k: t.clone() for k, t in m.state_dict().items()}
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    hessfast.ggn_vp(m, lf, x, y, v)
    hessfast.grad(m, lf, x, y)
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_model_with_several_outputs_is_a_clear_error():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    m = Two().to(D)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="pass output="):
        hessfast.hvp(m, F.mse_loss, torch.randn(2, 3, dtype=D), torch.zeros(2, 2, dtype=D), v)


# --- finiteness on replays: v's check runs with the result's, after the replay -----------------


class _Masked(nn.Module):
    """A ReLU unit that is never active and a parameter the loss never reads: NaN or Inf in
    ``v`` there vanishes from every product (``where`` masks, no reader), so only a check of
    ``v`` itself can catch it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(2, 2)
        with torch.no_grad():
            self.a.bias[0] = -100.0  # unit 0 is dead on every input below

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _layouts(v: dict) -> dict:
    """``v`` (``{name: [K, *shape]}``) in every layout ``hvp`` takes (those without a K axis
    read the first vector)."""
    one = {n: t[0] for n, t in v.items()}
    k = next(iter(v.values())).shape[0]
    return {
        "dict": one,
        "dict-K": v,
        "flat": torch.cat([t.reshape(-1) for t in one.values()]),
        "flat-K": torch.cat([t.reshape(k, -1) for t in v.values()], 1),
    }


def _poison(v: dict, where: str, value: float) -> dict:
    bad = {n: t.clone() for n, t in v.items()}
    if where == "unused":
        bad["unused.weight"][..., 1, 0] = value
    elif where == "dead-unit":  # the weights into the dead ReLU unit
        bad["a.weight"][..., 0, :] = value
    else:  # a live weight: the products are not finite either (a first replay must not retire)
        bad["b.weight"][..., 0, 1] = value
    return bad


def _as_dict(out, layout: str, like: dict) -> dict:
    """A product in ``layout`` back as ``{name: [K, *shape]}``."""
    if layout.startswith("dict"):
        return out if layout == "dict-K" else {n: t[None] for n, t in out.items()}
    flat = out if layout == "flat-K" else out[None]
    pieces = torch.split(flat, [t[0].numel() for t in like.values()], dim=1)
    return {n: p.reshape(-1, *t.shape[1:]) for (n, t), p in zip(like.items(), pieces)}


PRODUCTS = {
    "hvp": (hessfast.hvp, oracle_hvp),
    "hvp-grad": (lambda *a, **kw: hessfast.hvp(*a, return_grad=True, **kw)[0], oracle_hvp),
    "ggn": (hessfast.ggn_vp, oracle_ggn_vp),
    "residual": (
        hessfast.residual_vp,
        lambda *a: {
            n: h - g for (n, h), g in zip(oracle_hvp(*a).items(), oracle_ggn_vp(*a).values())
        },
    ),
}


@pytest.mark.parametrize("product", list(PRODUCTS))
@pytest.mark.parametrize(
    "layout, value",
    [("dict", "nan"), ("dict-K", "inf"), ("flat", "inf"), ("flat-K", "nan")],
    ids=lambda a: a,
)
def test_non_finite_v_is_an_error_on_every_replay_and_keeps_the_trace(
    layout, value, product, monkeypatch
):
    """NaN/Inf in v: a ValueError naming the parameter at every stage of a signature
    (interpreted, traced with its first replay checked, replayed), also with
    check_finite=False; the bad v never retires the trace, which then agrees with the oracle.
    Where no product reads the entry (an unused parameter, a dead ReLU unit) the products are
    finite without the check: nothing else can catch it. Every product sees NaN and Inf, each
    in two of the four layouts (with and without a K axis, dict and flat): one check serves
    both values."""
    value = float(value)
    monkeypatch.setattr(hessfast.traced, "TRACE_AFTER", 1)  # the default: one interpreted first
    torch.manual_seed(0)
    m = _Masked().to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    g = torch.Generator().manual_seed(3)
    v = {n: torch.randn(2, *p.shape, generator=g, dtype=D) for n, p in m.named_parameters()}
    if not layout.endswith("-K"):
        v = {n: t[:1] for n, t in v.items()}
    f, oracle = PRODUCTS[product]
    for call in range(4):
        for where, name in (("unused", "unused"), ("live", "b"), ("dead-unit", "a")):
            bad = _layouts(_poison(v, where, value))[layout]
            with pytest.raises(ValueError, match=rf"v\['{name}\.weight'\] contains NaN or Inf"):
                f(m, F.cross_entropy, x, y, bad, check_finite=call % 2 == 0)
        got = f(m, F.cross_entropy, x, y, _layouts(v)[layout])
    (t,) = hessfast.traced.explain(capture.capture(m, (x,)))
    assert t["traced"] and t["reason"] is None and t["calls"] >= 4
    want = oracle(m, F.cross_entropy, (x,), y, v)
    assert rel_err(_as_dict(got, layout, v), want) < 1e-10


@pytest.mark.parametrize("product", ["grad", "hvp", "hvp-grad", "ggn", "residual"])
def test_non_finite_result_of_a_replay_is_an_error_unless_opted_out(product, monkeypatch):
    monkeypatch.setattr(hessfast.traced, "TRACE_AFTER", 1)  # the default: one interpreted first
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    calls = {
        "grad": lambda x, **kw: [hessfast.grad(m, lf, x, y, **kw)],
        "hvp": lambda x, **kw: [hessfast.hvp(m, lf, x, y, v, **kw)],
        "hvp-grad": lambda x, **kw: list(hessfast.hvp(m, lf, x, y, v, return_grad=True, **kw)),
        "ggn": lambda x, **kw: [hessfast.ggn_vp(m, lf, x, y, v, **kw)],
        "residual": lambda x, **kw: [hessfast.residual_vp(m, lf, x, y, v, **kw)],
    }[product]
    bad = (x[0].clone(),)
    bad[0][0, 0] = float("inf")
    calls(x)  # interpreted
    with pytest.raises(hessfast.NonFiniteError, match="check_finite=False"):
        calls(bad)  # traced; a non-finite first replay does not judge (nor retire) the trace
    calls(x)  # the first replay, checked
    calls(x)
    with pytest.raises(hessfast.NonFiniteError, match="check_finite=False"):
        calls(bad)  # a replay
    outs = calls(bad, check_finite=False)
    assert all(not all(torch.isfinite(t).all() for t in o.values()) for o in outs)
    (t,) = hessfast.traced.explain(capture.capture(m, x))
    assert t["traced"] and t["calls"] >= 3  # the replays are what raised


@pytest.mark.parametrize("product", ["grad", "hvp", "ggn"])
def test_a_replay_reads_its_finiteness_probe_and_nothing_else(product, monkeypatch):
    """A finite replay is vouched for by the graph's probe (the sums of v and the results,
    summed where they are produced): the separate pass over v and the results does not run;
    the products are those of the interpreter."""
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    f = {
        "grad": lambda **kw: hessfast.grad(m, lf, x, y, **kw),
        "hvp": lambda **kw: hessfast.hvp(m, lf, x, y, v, **kw),
        "ggn": lambda **kw: hessfast.ggn_vp(m, lf, x, y, v, **kw),
    }[product]
    for _ in range(3):  # interpreted, traced (first replay checked), replayed
        f()
    (t,) = [t for t in hessfast.traced.traces(capture.capture(m, x)) if t.calls]
    assert t.probe

    def no_pass(groups):
        raise AssertionError("a finite replay passed over v and the results again")

    monkeypatch.setattr(hessfast.api, "first_non_finite_in", no_pass)
    got = f()
    monkeypatch.undo()
    want = f(compile="interpret")
    assert rel_err(got, want) < 1e-12


def test_a_probe_that_overflows_is_checked_exactly():
    """The probe sums sums: finite entries whose sum overflows make it infinite without any
    entry being so, and the exact check then passes (and names a real culprit)."""
    big = {"w": torch.full((4,), 3e38, dtype=torch.float32)}
    probe = torch.tensor(float("inf"))
    hessfast.api._check_finite(None, [("gradient", big)], True, probe)
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(hessfast.NonFiniteError, match="'w'"):
        hessfast.api._check_finite(None, [("gradient", bad)], True, probe)


def test_replay_reports_the_choices_of_a_trace_made_without_return_info():
    """A ProductInfo is built only when asked for, but the implementations chosen while tracing
    are kept on the trace whatever the tracing product asked: a later replay reports them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    hessfast.hvp(model, F.cross_entropy, x, y, v)  # traced (conftest), no info asked
    _, info = hessfast.hvp(model, F.cross_entropy, x, y, v, return_info=True)
    assert info.path == "traced"
    assert info.implementations == {"linear": {"torch": 2}, "tanh": {"torch": 1}}
