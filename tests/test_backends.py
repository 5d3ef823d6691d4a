"""Dispatch between implementations: automatic choice, explicit requests, reasons, listing.

Fake implementations (plain-torch rules relabelled as another backend, wrapped to count calls) are
registered for one op through the registry's accelerated table, so the routing is tested without
depending on any kernel.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfast
from hessfast import dispatch as B
from hessfast import registry, rules
from hessfast.rules import activation
from hessfast.rules.base import Call

aten = torch.ops.aten
TANH = aten.tanh.default


class Fake(activation.ElementwiseUnary):
    """The torch tanh rule, declared as ``backend`` on ``devices``; counts its forward calls."""

    def __init__(self, backend, devices=None, dtypes=None, decline=None):
        super().__init__(TANH, f"fake_{backend}_tanh", activation.tanh_derivs, from_result=True)
        self.backend = backend
        self.devices = devices
        self.dtypes = dtypes
        self.decline = decline
        self.calls = 0

    def not_supported_reasons(self, call):
        return [self.decline] if self.decline else []

    def fwd_jvp(self, call):
        self.calls += 1
        return super().fwd_jvp(call)


@pytest.fixture
def fakes(monkeypatch):
    """Install fake cuda and triton implementations of tanh (CPU-capable, so they can run here).
    The routing tests count the fakes' calls, so their self-checks (which call them too; tested in
    ``tests/test_selfcheck.py``) are off, and the process's verdicts are the test's own."""
    table = {}
    monkeypatch.setattr(registry, "_ACCELERATED", table)
    monkeypatch.setenv("HESSFAST_SELFCHECK", "0")
    monkeypatch.setattr(B, "_VERDICTS", {})
    monkeypatch.setattr(B, "_DISTRUSTED", {})

    def install(*impls):
        table[TANH] = list(impls)
        return impls

    return install


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data():
    return torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))


def _call(x):
    return Call(TANH, (x,), (True,), (torch.randn(2, *x.shape, dtype=x.dtype),), 2)


def test_auto_on_cpu_uses_the_torch_reference_and_never_loads_accelerated(monkeypatch):
    monkeypatch.setattr(registry, "_ACCELERATED", None)
    rule = rules.rule_for(TANH, _call(torch.randn(3)), "auto")
    assert rule.backend == "torch"
    assert registry._ACCELERATED is None  # a CPU run under auto dispatch imports no kernels


def test_auto_takes_the_first_implementation_that_accepts(fakes):
    cuda, triton = fakes(Fake("cuda", decline="not today"), Fake("triton"))
    x = torch.randn(4)
    chosen = B.choose(TANH, [cuda, triton, rules.registered_rule(TANH)], _call(x), "auto")
    assert chosen is triton
    cuda.decline = None
    assert B.choose(TANH, [cuda, triton], _call(x), "auto") is cuda


def test_explicit_request_runs_that_backend_end_to_end(fakes):
    (triton,) = fakes(Fake("triton", devices=None))
    model, (x, y) = _model(), _data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    assert triton.calls == 0
    # interpreted, so that the fake counts one call per product (a traced product's first call
    # also traces, and is checked against the interpreter)
    got = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", compile="interpret")
    assert triton.calls == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with hessfast.use_backend("triton"):
        hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret")
    assert triton.calls == 2


def test_explicit_request_that_cannot_run_raises_with_every_reason(fakes):
    fakes(Fake("cuda", devices=("cuda",)), Fake("triton", decline="rows longer than 65536"))
    model, (x, y) = _model(), _data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(hessfast.BackendError) as e:
        hessfast.hvp(model, F.cross_entropy, x, y, v, backend="cuda")
    msg = str(e.value)
    assert "backend 'cuda' was requested" in msg and "aten.tanh.default" in msg
    assert "tensors are on cpu; this implementation runs on cuda" in msg
    assert "rows longer than 65536" in msg  # the other implementations' reasons are listed too
    assert "fake_torch_tanh" not in msg
    with pytest.raises(hessfast.BackendError, match="rows longer than 65536"):
        hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton")


def test_ops_without_an_implementation_in_the_requested_backend_run_torch(fakes):
    fakes(Fake("cuda"))
    rule = rules.rule_for(aten.relu.default, _call(torch.randn(3)), "cuda")
    assert rule.backend == "torch" and rule.name == "relu"


def test_dtype_declaration_is_a_reason(fakes):
    (cuda,) = fakes(Fake("cuda", dtypes=(torch.float32,)))
    why = B.reasons(cuda, _call(torch.randn(3, dtype=torch.float64)), explicit=True)
    assert why == ["dtype float64 is not supported (takes float32)"]


def test_triton_on_cpu_needs_an_explicit_request_and_the_interpreter(monkeypatch):
    from hessfast.triton import TritonRule

    class T(TritonRule):
        name = "t"
        ops = (TANH,)

    call = _call(torch.randn(3))
    auto = B.reasons(T(), call, explicit=False)
    assert "never picks the Triton interpreter" in auto[0]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "set TRITON_INTERPRET=1" in B.reasons(T(), call, explicit=True)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("hessfast.triton.INTERPRETED", False)
    assert "compiled for the GPU" in B.reasons(T(), call, explicit=True)[0]
    monkeypatch.setattr("hessfast.triton.INTERPRETED", True)
    assert B.reasons(T(), call, explicit=True) == []


def test_environment_variable_and_precedence(monkeypatch):
    monkeypatch.setenv("HESSFAST_BACKEND", "torch")
    assert B.requested() == "torch"
    with hessfast.use_backend("triton"):
        assert B.requested() == "triton"
        with hessfast.use_backend(None):
            assert B.requested() == "triton"
    assert B.requested() == "torch"
    monkeypatch.setenv("HESSFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="HESSFAST_BACKEND: unknown backend 'fastest'"):
        B.requested()
    monkeypatch.delenv("HESSFAST_BACKEND")
    assert B.requested() == "auto"


def test_unknown_backend_names_are_errors():
    with pytest.raises(ValueError, match="choose one of auto, cuda, triton, torch"):
        with hessfast.use_backend("jax"):
            pass
    model, (x, y) = _model(), _data()
    with pytest.raises(ValueError, match="unknown backend"):
        hessfast.HessianOperator(model, F.cross_entropy, (x, y), backend="tpu")


def test_operator_backend_reaches_every_product(fakes):
    (triton,) = fakes(Fake("triton"))
    model, (x, y) = _model(), _data()
    H = hessfast.HessianOperator(model, F.cross_entropy, [(x, y), (x, y)], backend="triton")
    H @ torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert triton.calls == 2
    H.block(["0.weight"]) @ torch.randn(15, dtype=torch.float64)
    assert triton.calls == 4


def test_backends_lists_availability_with_reasons(monkeypatch):
    info = hessfast.backends()
    assert list(info) == ["cuda", "triton", "torch"]
    assert info["torch"].available and str(TANH) in info["torch"].ops
    if not torch.cuda.is_available():
        assert not info["cuda"].available and info["cuda"].reason
    monkeypatch.setattr("hessfast.cuda._LOADED", "extension not built (simulated): rebuild")
    cuda = hessfast.backends()["cuda"]
    assert not cuda.available and cuda.reason.startswith("extension not built")
    assert "unavailable: extension not built" in str(cuda)


def test_profile_names_the_backend_that_ran():
    from hessfast.profile import rule_name

    assert rule_name(Fake("triton"), "forward") == "fake_triton_tanh [triton]"
    assert rule_name(rules.registered_rule(TANH), "forward") == "tanh"


def test_cli_lists_backends(capsys):
    from hessfast.cli import main

    assert main(["backends", "--ops"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("requested: auto")
    assert "torch: available" in out and "aten.tanh.default" in out


def test_auto_reasons_apply_only_to_automatic_dispatch(fakes):
    class Cautious(Fake):
        def auto_reasons(self, call):
            return ["a library kernel is faster here"]

    (cuda,) = fakes(Cautious("cuda"))
    call = _call(torch.randn(3))
    assert B.reasons(cuda, call, explicit=False) == ["a library kernel is faster here"]
    assert B.reasons(cuda, call, explicit=True) == []
    ref = rules.registered_rule(TANH)
    assert B.choose(TANH, [cuda, ref], call, "auto") is ref
    assert B.choose(TANH, [cuda, ref], call, "cuda") is cuda
