"""Bad and awkward input, kept as data: one case per row.

Each row of :data:`CASES` is ``(id, run, expected, fragment)``: ``run()`` makes the call; ``expected``
is ``"ok"`` — then ``run`` returns ``(got, want)``, ``want`` from a float64 double-backward oracle
(:mod:`oracle`), and they must agree — or the exception type the call must raise, with
``fragment`` (a regular expression) in its message. A row whose ``fragment`` starts with
``"warns:"`` must also emit that warning. :data:`CLI_CASES` does the same for the command line:
``(argv, exit code, stderr fragment)``.
"""

from __future__ import annotations

import functools
import re
import warnings

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfast
from hessfast import cli
from hessfast.algorithms import condition_number
from hessfast.monitor import HessianMonitor

D = torch.float64


def mlp(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(D)


def P(model) -> int:
    return sum(p.numel() for p in model.parameters())


def x(n: int) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(n), dtype=D)


def y(n: int, classes: int = 3) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(100 + n))


def ragged() -> list:
    """Batches of 8 and 3 samples: a mean over the data is not the mean of the batch means."""
    return [(x(8), y(8)), (x(3), y(3))]


def cat(data: list) -> tuple:
    return torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])


def V(model, k: int = 2) -> torch.Tensor:
    return torch.randn(P(model), k, generator=torch.Generator().manual_seed(7), dtype=D)


def vdict(model, k: int = 2) -> dict:
    g = torch.Generator().manual_seed(8)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=D) for n, p in model.named_parameters()}


def flat(d: dict) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in d.values()], 1)


CE_SUM = functools.partial(F.cross_entropy, reduction="sum")


# ------------------------------------------------------------------------------- "ok" builders


def op_vs_dense(loss_fn, data, reference, cls=hessfast.HessianOperator, **kw):
    """The operator over ``data`` against the dense double-backward Hessian of ``reference`` over
    the non-empty batches concatenated (the GGN: ``oracle.ggn_vp``)."""

    def run():
        m = mlp()
        op = cls(m, loss_fn, data, **kw)
        vv = V(m)
        got = op @ vv
        kept = [b for b in data if b[1].numel()]
        X, Y = cat(kept)
        if cls is hessfast.GGNOperator:
            d, off = {}, 0
            for n, p in m.named_parameters():
                d[n] = vv[off : off + p.numel()].T.reshape(-1, *p.shape)
                off += p.numel()
            want = flat(oracle.ggn_vp(m, reference, (X,), Y, d)).T
        else:
            want = oracle.dense_hessian(m, reference, (X,), Y) @ vv
        return got, want

    return run


def hvp_vs_double_backward(loss_fn, targets, out: int = 3, reference=None, n: int = 8):
    def run():
        m = mlp(out)
        v = vdict(m)
        got = hessfast.hvp(m, loss_fn, x(n), targets, v)
        want = oracle.double_backward_hvp(m, reference or loss_fn, (x(n),), targets, v)
        return flat(got), flat(want)

    return run


def hvp_call(loss_fn, inputs, targets, out: int = 3, v=None):
    def run():
        m = mlp(out)
        return hessfast.hvp(m, loss_fn, inputs, targets, vdict(m) if v is None else v(m))

    return run


class _Reads(nn.Module):
    """``model`` returning the one entry ``key`` of its output: the reference for a loss that
    reads that entry (same parameters, same order)."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, inp):
        return self.model(inp)[self.key]


def container_vs_dense(model_fn, loss_fn, key, data=None, operator=False, output=None):
    """A model returning a container, its loss reading entry ``key``: ``hvp`` (or an operator
    over ``data``) against the dense double-backward Hessian of the model reduced to that entry."""

    def run():
        m = model_fn()
        batches = data or [(x(8), y(8))]
        vv = V(m)
        if operator:
            got = hessfast.HessianOperator(m, loss_fn, batches, output=output) @ vv
        else:
            (inp, t) = batches[0]
            got = hessfast.hvp(m, loss_fn, inp, t, vv.T, output=output).T
        X, Y = cat(batches)
        return got, oracle.dense_hessian(_Reads(m, key), F.cross_entropy, (X,), Y) @ vv

    return run


def op_call(loss_fn, data, **kw):
    def run():
        m = mlp()
        op = hessfast.HessianOperator(m, loss_fn, data, **kw)
        return op @ V(m)

    return run


class DictOut(nn.Module):
    def __init__(self, keys=("logits",)):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(D)
        self.keys = keys

    def forward(self, inp):
        z = self.lin(inp)
        return {k: z * (i + 1) for i, k in enumerate(self.keys)}


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(D)

    def forward(self, inp):
        return (self.lin(inp),)


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).to(D)

    def forward(self, inp):
        return self.lin(inp), inp


def with_model(model_fn, call):
    def run():
        m = model_fn()
        return call(m)

    return run


def monitor(probe):
    def run():
        m = mlp()
        mon = HessianMonitor(m, F.cross_entropy, probe(), every=1, path=None)
        return mon.step(0)

    return run


# ----------------------------------------------------------------------------------- the table

CASES = [
    # --- custom-callable losses over ragged batches (wrong numbers before) -----------------------
    (
        "lambda-sum-ragged",
        op_vs_dense(lambda z, t: F.cross_entropy(z, t, reduction="sum"), ragged(), CE_SUM),
        "ok",
        "",
    ),
    (
        "lambda-mean-ragged",
        op_vs_dense(lambda z, t: F.cross_entropy(z, t), ragged(), F.cross_entropy),
        "ok",
        "",
    ),
    (
        "lambda-sum-ragged-ggn",
        op_vs_dense(
            lambda z, t: F.cross_entropy(z, t, reduction="sum"),
            ragged(),
            CE_SUM,
            cls=hessfast.GGNOperator,
        ),
        "ok",
        "",
    ),
    (
        "lambda-sum-equal-batches",
        op_vs_dense(
            lambda z, t: F.cross_entropy(z, t, reduction="sum"),
            [(x(4), y(4)), (x(5), y(5))],
            CE_SUM,
        ),
        "ok",
        "",
    ),
    (
        "lambda-sum-micro-batches",
        op_vs_dense(
            lambda z, t: F.cross_entropy(z, t, reduction="sum"),
            [(x(8), y(8))],
            CE_SUM,
            max_batch_size=3,
        ),
        "ok",
        "",
    ),
    (
        "lambda-mse-sum-ragged",
        op_vs_dense(
            lambda z, t: ((z - t.double()[:, None]) ** 2).sum(),
            ragged(),
            lambda z, t: ((z - t.double()[:, None]) ** 2).sum(),
        ),
        "ok",
        "",
    ),
    (
        "operator-reduction-stated",
        op_vs_dense(
            lambda z, t: F.cross_entropy(z, t, reduction="sum"), ragged(), CE_SUM, reduction="sum"
        ),
        "ok",
        "",
    ),
    (
        "lambda-ignore-index-mean-ragged",
        op_call(lambda z, t: F.cross_entropy(z, t, ignore_index=1), ragged()),
        ValueError,
        "averages over something other than the samples",
    ),
    (
        "lambda-zero-loss-undecidable",
        op_call(lambda z, t: (z * 0).sum(), ragged()),
        ValueError,
        "cannot find how loss_fn reduces.*reduction='sum'",
    ),
    (
        "operator-bad-reduction",
        op_call(F.cross_entropy, ragged(), reduction="avg"),
        ValueError,
        "reduction='avg'",
    ),
    # --- empty batches ---------------------------------------------------------------------------
    (
        "empty-batch-in-data",
        op_vs_dense(F.cross_entropy, [*ragged(), (x(0), y(0))], F.cross_entropy),
        "ok",
        "",
    ),
    (
        "all-ignored-batch-in-data",
        op_vs_dense(F.cross_entropy, [*ragged(), (x(2), torch.full((2,), -100))], F.cross_entropy),
        "ok",
        "",
    ),
    (
        "empty-batch-in-data-lambda-sum",
        op_vs_dense(
            lambda z, t: F.cross_entropy(z, t, reduction="sum"), [(x(0), y(0)), *ragged()], CE_SUM
        ),
        "ok",
        "",
    ),
    ("empty-batch-alone-ce", hvp_call(F.cross_entropy, x(0), y(0)), ValueError, "batch is empty"),
    (
        "empty-batch-alone-mse",
        hvp_call(F.mse_loss, x(0), torch.zeros(0, 3, dtype=D)),
        ValueError,
        "batch is empty",
    ),
    (
        "empty-data-only",
        op_call(F.cross_entropy, [(x(0), y(0))]),
        ValueError,
        "every batch is empty",
    ),
    (
        "all-ignored-data-only",
        op_call(F.cross_entropy, [(x(2), torch.full((2,), -100))]),
        ValueError,
        "no batch has a target that counts",
    ),
    ("empty-list", op_call(F.cross_entropy, []), ValueError, "data is empty"),
    ("monitor-empty-probe", monitor(lambda: (x(0), y(0))), ValueError, "every batch is empty"),
    # --- losses ----------------------------------------------------------------------------------
    ("huber", hvp_vs_double_backward(nn.HuberLoss(), torch.randn(8, 3, dtype=D)), "ok", ""),
    (
        "huber-delta-sum",
        hvp_vs_double_backward(
            nn.HuberLoss(delta=0.3, reduction="sum"), torch.randn(8, 3, dtype=D)
        ),
        "ok",
        "",
    ),
    (
        "huber-partial",
        hvp_vs_double_backward(
            functools.partial(F.huber_loss, delta=0.5), torch.randn(8, 3, dtype=D)
        ),
        "ok",
        "",
    ),
    (
        "huber-lambda-double-backward",
        hvp_vs_double_backward(
            lambda z, t: F.huber_loss(z, t, delta=0.5), torch.randn(8, 3, dtype=D)
        ),
        "ok",
        "",
    ),
    (
        "smooth-l1-beta",
        hvp_vs_double_backward(nn.SmoothL1Loss(beta=0.4), torch.randn(8, 3, dtype=D)),
        "ok",
        "",
    ),
    (
        "smooth-l1-beta0",
        hvp_vs_double_backward(nn.SmoothL1Loss(beta=0.0), torch.randn(8, 3, dtype=D)),
        "ok",
        "",
    ),
    (
        "huber-ragged-operator",
        op_vs_dense(
            nn.HuberLoss(delta=0.5),
            [(x(8), torch.randn(8, 3, dtype=D)), (x(3), torch.randn(3, 3, dtype=D))],
            nn.HuberLoss(delta=0.5),
        ),
        "ok",
        "",
    ),
    (
        "mse-broadcast-N-vs-N1",
        hvp_vs_double_backward(F.mse_loss, torch.randn(8, dtype=D), out=1),
        "ok",
        "warns:different to the input size",
    ),
    (
        "huber-broadcast",
        hvp_vs_double_backward(nn.HuberLoss(delta=0.2), torch.randn(3, dtype=D)),
        "ok",
        "warns:different to the input size",
    ),
    (
        "mse-weight",
        hvp_vs_double_backward(
            functools.partial(F.mse_loss, weight=torch.rand(8, 3, dtype=D)),
            torch.randn(8, 3, dtype=D),
        ),
        "ok",
        "",
    ),
    ("loss-class", hvp_call(nn.CrossEntropyLoss, x(8), y(8)), ValueError, r"instantiate it.*\(\)"),
    (
        "loss-class-operator",
        op_call(nn.MSELoss, ragged()),
        ValueError,
        r"nn.MSELoss\(\)",
    ),
    ("loss-not-callable", hvp_call("cross_entropy", x(8), y(8)), ValueError, "callable"),
    (
        "loss-non-scalar",
        hvp_call(lambda z, t: F.cross_entropy(z, t, reduction="none"), x(8), y(8)),
        ValueError,
        "scalar",
    ),
    (
        "reduction-none",
        hvp_call(nn.CrossEntropyLoss(reduction="none"), x(8), y(8)),
        ValueError,
        "reduction='none'",
    ),
    (
        "size-average",
        hvp_call(functools.partial(F.cross_entropy, size_average=False), x(8), y(8)),
        ValueError,
        "deprecated",
    ),
    # --- cross-entropy targets -------------------------------------------------------------------
    (
        "ce-target-too-large",
        hvp_call(F.cross_entropy, x(8), torch.full((8,), 5)),
        IndexError,
        r"Target 5 is out of bounds.*3 classes",
    ),
    (
        "ce-target-negative",
        hvp_call(F.cross_entropy, x(8), torch.tensor([0, 1, -3, 0, 1, 2, 0, 1])),
        IndexError,
        "Target -3 is out of bounds",
    ),
    (
        "ce-target-float",
        hvp_call(F.cross_entropy, x(8), y(8).to(D)),
        ValueError,
        r"integer tensor \(targets.long\(\)\)",
    ),
    ("ce-target-bool", hvp_call(F.cross_entropy, x(8), y(8) > 0), ValueError, "integer tensor"),
    (
        "ce-target-length",
        hvp_call(F.cross_entropy, x(8), y(5)),
        ValueError,
        r"batch_size \(8\) to match target batch_size \(5\)",
    ),
    ("nll-target-float", hvp_call(F.nll_loss, x(8), y(8).to(D)), ValueError, "integer tensor"),
    (
        "ce-target-int32",
        hvp_vs_double_backward(
            F.cross_entropy, y(8).int(), reference=lambda z, t: F.cross_entropy(z, t.long())
        ),
        "ok",
        "",
    ),
    (
        "ce-ignored-targets-out-of-range-ok",
        hvp_vs_double_backward(F.cross_entropy, torch.tensor([0, 1, -100, 2, -100, 1, 0, 2])),
        "ok",
        "",
    ),
    (
        "ce-sequence-target-too-large",
        with_model(
            lambda: nn.Linear(4, 3).to(D),
            lambda m: hessfast.hvp(
                m, F.cross_entropy, torch.randn(2, 5, 4, dtype=D), torch.full((2, 5), 3), vdict(m)
            ),
        ),
        IndexError,
        "Target 3 is out of bounds",
    ),
    # --- model outputs ---------------------------------------------------------------------------
    (
        "dict-output-loss-indexes-it",
        container_vs_dense(DictOut, lambda o, t: F.cross_entropy(o["logits"], t), "logits"),
        "ok",
        "",
    ),
    (
        "tuple-output-operator",
        container_vs_dense(
            TupleOut, lambda o, t: F.cross_entropy(o[0], t), 0, data=ragged(), operator=True
        ),
        "ok",
        "",
    ),
    (
        "two-outputs",
        with_model(TwoOut, lambda m: hessfast.hvp(m, F.mse_loss, x(2), x(2)[:, :3], vdict(m))),
        ValueError,
        "returns a tuple of 2 tensors: pass output=",
    ),
    (
        "two-outputs-selected",
        container_vs_dense(TwoOut, F.cross_entropy, 0, output=0),
        "ok",
        "",
    ),
    (
        "dict-two-keys-operator",
        with_model(
            lambda: DictOut(("logits", "aux")),
            lambda m: (
                hessfast.HessianOperator(m, lambda o, t: F.cross_entropy(o["logits"], t), ragged())
                @ V(m)
            ),
        ),
        ValueError,
        "returns a dict of 2 tensors: pass output=",
    ),
    # --- vectors ---------------------------------------------------------------------------------
    (
        "v-zero-vectors-flat",
        hvp_call(F.cross_entropy, x(8), y(8), v=lambda m: torch.zeros(0, P(m), dtype=D)),
        ValueError,
        "K=0 vectors",
    ),
    (
        "v-zero-vectors-dict",
        hvp_call(
            F.cross_entropy,
            x(8),
            y(8),
            v=lambda m: {n: torch.zeros(0, *p.shape, dtype=D) for n, p in m.named_parameters()},
        ),
        ValueError,
        "K=0 vectors",
    ),
    (
        "v-missing-name",
        hvp_call(F.cross_entropy, x(8), y(8), v=lambda m: {"0.weight": m[0].weight.detach()}),
        ValueError,
        "missing",
    ),
    (
        "v-wrong-dtype",
        hvp_call(F.cross_entropy, x(8), y(8), v=lambda m: torch.zeros(P(m))),
        ValueError,
        "float32",
    ),
    (
        "v-wrong-length",
        hvp_call(F.cross_entropy, x(8), y(8), v=lambda m: torch.zeros(3, dtype=D)),
        ValueError,
        "P=",
    ),
    (
        "v-nan",
        hvp_call(
            F.cross_entropy, x(8), y(8), v=lambda m: torch.full((P(m),), float("nan"), dtype=D)
        ),
        ValueError,
        "NaN",
    ),
    (
        "params-no-match",
        with_model(mlp, lambda m: hessfast.grad(m, F.cross_entropy, x(8), y(8), params="nope.*")),
        ValueError,
        "matches no parameter",
    ),
    # --- operators and algorithms ----------------------------------------------------------------
    (
        "max-batch-size-float",
        op_call(F.cross_entropy, ragged(), max_batch_size=2.5),
        ValueError,
        "positive integer, got 2.5",
    ),
    (
        "max-batch-size-zero",
        op_call(F.cross_entropy, ragged(), max_batch_size=0),
        ValueError,
        "positive integer",
    ),
    (
        "max-batch-size-bool",
        op_call(F.cross_entropy, ragged(), max_batch_size=True),
        ValueError,
        "positive integer",
    ),
    (
        "generator-data",
        op_call(F.cross_entropy, (b for b in ragged())),
        ValueError,
        r"one-shot iterator.*list",
    ),
    ("monitor-generator", monitor(lambda: (b for b in ragged())), ValueError, "one-shot iterator"),
    ("data-not-iterable", op_call(F.cross_entropy, 3), ValueError, "iterable of such batches"),
    ("batch-not-a-pair", op_call(F.cross_entropy, [(x(2),)]), ValueError, r"\(inputs, targets\)"),
    (
        "model-not-a-module",
        lambda: hessfast.HessianOperator(lambda t: t, F.cross_entropy, ragged()),
        ValueError,
        "torch.nn.Module",
    ),
    (
        "condition-number-P1",
        lambda: condition_number(hessfast.DenseOperator(torch.ones(1, 1, dtype=D))),
        ValueError,
        "P >= 2",
    ),
    (
        "dense-operator-vector",
        lambda: hessfast.DenseOperator(torch.ones(3, dtype=D)),
        ValueError,
        "needs a matrix",
    ),
    (
        "operator-3d",
        lambda: hessfast.DenseOperator(torch.eye(2, dtype=D)) @ torch.ones(2, 1, 1, dtype=D),
        ValueError,
        r"\[P\] or \[P, K\]",
    ),
    (
        "dropout-in-training",
        with_model(
            lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 3)).to(D).train(),
            lambda m: hessfast.hvp(m, F.cross_entropy, x(3), y(3), vdict(m)),
        ),
        hessfast.DropoutError,
        r"model\.eval\(\)",
    ),
    (
        "non-finite-input",
        hvp_call(F.cross_entropy, torch.full((2, 4), float("inf"), dtype=D), y(2)),
        hessfast.NonFiniteError,
        "check_finite=False",
    ),
]


@pytest.mark.parametrize("case_id, run, expected, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, run, expected, fragment):
    warns = fragment[len("warns:") :] if fragment.startswith("warns:") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if expected == "ok":
            got, want = run()
            assert torch.isfinite(got).all()
            err = float((got - want).norm() / want.norm().clamp_min(1e-300))
            assert err < 1e-10, f"{case_id}: relative error {err:.3g}"
        else:
            with pytest.raises(expected, match=fragment):
                run()
    if warns is not None:
        assert any(re.search(warns, str(w.message)) for w in caught), [
            str(w.message) for w in caught
        ]


def test_table_covers_every_outcome_class():
    kinds = {c[2] if c[2] == "ok" else c[2].__name__ for c in CASES}
    assert {"ok", "ValueError", "IndexError"} <= kinds
    assert len({c[0] for c in CASES}) == len(CASES), "case ids must be unique"


# ------------------------------------------------------------------------------------------ CLI


def _file(tmp_path):
    f = tmp_path / "exists.txt"
    f.write_text("x")
    return str(f)


CLI_CASES = [
    (
        lambda tmp: ["profile", "--model", "no_such_model"],
        2,
        "profile: error: --model no_such_model: not a built-in model",
    ),
    (
        lambda tmp: ["bench", "--model", "no_such_pkg:fn"],
        2,
        "bench: error: --model no_such_pkg:fn: cannot import it",
    ),
    (lambda tmp: ["bench", "--model", "mlp,missing.py:f"], 2, "no file missing.py"),
    (lambda tmp: ["demo", "--out", _file(tmp)], 2, "demo: error: --out .*existing file"),
    (lambda tmp: ["demo", "--out", _file(tmp) + "/sub"], 2, "cannot be created"),
    (
        lambda tmp: ["analyze", "--model", "m:f", "--data", "d:f", "--out", _file(tmp)],
        2,
        "analyze: error: --out .*existing file",
    ),
]


@pytest.mark.parametrize("argv, code, fragment", CLI_CASES)
def test_cli_bad_input_is_one_line(argv, code, fragment, tmp_path, capsys):
    assert cli.main(argv(tmp_path)) == code
    err = capsys.readouterr().err
    assert re.search(fragment, err), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_ctrl_c_is_one_line_exit_130_and_no_report(tmp_path, capsys, monkeypatch):
    import hessfast.demo as demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "analyze", interrupted)
    out = tmp_path / "report"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == "hessfast demo: interrupted\n"
    assert not out.exists() or not any(out.iterdir())


def test_report_is_written_atomically(tmp_path, monkeypatch):
    from hessfast import analyze

    def broken(report, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze.report, "plot_spectrum", broken)
    with pytest.raises(KeyboardInterrupt):
        analyze.write_report({"eigenvalues": {"values": [1.0]}}, tmp_path / "r")
    assert list((tmp_path / "r").iterdir()) == []
