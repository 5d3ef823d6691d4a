"""Self-check before trust (:func:`hessfast.dispatch.selfcheck`), what ran (``return_info``, the
DEBUG log), and the gates automatic dispatch applies before a kernel (measurement, capability).

The mechanism is proven on the CPU with fake accelerated implementations of tanh: the torch rule
relabelled as ``cuda``/``triton``, one of them deliberately wrong (a tangent off by 1e-3 relative:
small enough that a product would look plausible) and one that raises.
"""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfast
import hessfast.cuda as hcuda
import hessfast.triton as htriton
from hessfast import dispatch as B
from hessfast import registry, rules, selftest
from hessfast.rules import activation
from hessfast.rules.base import Call

aten = torch.ops.aten
TANH = aten.tanh.default


class Fake(activation.ElementwiseUnary):
    """The torch tanh rule declared as ``backend``; ``wrong`` scales its output tangent by
    ``1 + wrong``; ``boom`` makes it raise."""

    def __init__(self, backend="cuda", wrong=0.0, boom=False, name=None):
        super().__init__(
            TANH, name or f"fake_{backend}_tanh", activation.tanh_derivs, from_result=True
        )
        self.backend = backend
        self.devices = None
        self.dtypes = None
        self.wrong = wrong
        self.boom = boom

    def fwd_jvp(self, call):
        if self.boom:
            raise RuntimeError("no kernel image is available for execution on the device")
        y, ydot, res = super().fwd_jvp(call)
        if ydot is not None and self.wrong:
            ydot = ydot * (1 + self.wrong)
        return y, ydot, res


@pytest.fixture
def fresh(monkeypatch):
    """Self-checks on, with no verdicts from earlier tests; fakes installed for tanh."""
    monkeypatch.delenv("HESSFAST_SELFCHECK", raising=False)
    monkeypatch.delenv("HESSFAST_SELFCHECK_CACHE", raising=False)
    monkeypatch.setattr(B, "_VERDICTS", {})
    monkeypatch.setattr(B, "_DISTRUSTED", {})
    table = {}
    monkeypatch.setattr(registry, "_ACCELERATED", table)
    checks = []
    real = selftest.check_call

    def counting(impl, call, device, dtype):
        checks.append((impl.name, str(device), dtype))
        return real(impl, call, device, dtype)

    monkeypatch.setattr(selftest, "check_call", counting)

    def install(*impls):
        table[TANH] = list(impls)
        return checks

    return install


def _call(dtype=torch.float32):
    x = torch.randn(4, 6, dtype=dtype)
    return Call(TANH, (x,), (True,), (torch.randn(2, 4, 6, dtype=dtype),), 2)


def _ref():
    return rules.registered_rule(TANH)


def test_a_wrong_implementation_warns_once_and_is_never_chosen_again(fresh):
    bad = Fake("cuda", wrong=1e-3)
    checks = fresh(bad)
    with pytest.warns(RuntimeWarning, match=r"fake_cuda_tanh \[cuda\] failed its self-check"):
        assert B.choose(TANH, [bad, _ref()], _call(), "auto") is _ref()
    assert len(checks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert B.choose(TANH, [bad, _ref()], _call(), "auto") is _ref()
        # not on another dtype either: the implementation is distrusted for the process
        assert B.choose(TANH, [bad, _ref()], _call(torch.float64), "auto") is _ref()
    assert len(checks) == 1


def test_the_warning_names_the_error_of_an_implementation_that_raises(fresh):
    boom = Fake("triton", boom=True)
    fresh(boom)
    with pytest.warns(RuntimeWarning, match="RuntimeError: no kernel image"):
        assert B.choose(TANH, [boom, _ref()], _call(), "auto") is _ref()


def test_a_correct_implementation_is_checked_once_per_device_and_dtype(fresh):
    good = Fake("cuda")
    checks = fresh(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert B.choose(TANH, [good, _ref()], _call(), "auto") is good
        assert len(checks) == 1
        assert B.choose(TANH, [good, _ref()], _call(torch.float64), "auto") is good
    assert [c[2] for c in checks] == [torch.float32, torch.float64]


def test_the_check_compares_every_mode_at_the_declared_tolerance():
    case = selftest.case_for_call(TANH, _call())
    good = selftest.compare(Fake("cuda"), case, torch.float32, torch.device("cpu"))
    assert good.ok and good.max_error < 1e-6
    assert {k.split(":")[0] for k in good.details} == set(selftest.MODES)
    # a tangent 10x over the float32 tolerance (2e-4 relative) fails; the error is located
    bad = selftest.compare(Fake("cuda", wrong=1e-3), case, torch.float32, torch.device("cpu"))
    assert not bad.ok and "output tangent" in bad.worst
    assert bad.max_error == pytest.approx(1e-3, rel=0.05)
    # the problem is not a multiple of a tile, K > 1
    args, _ = case.build()
    assert args[0].numel() % 1024 and selftest.K > 1


def test_an_implementation_that_declines_its_check_problem_is_unverified(fresh):
    """Nothing could be checked: automatic dispatch passes it by (silently), an explicit request
    runs it."""

    class Picky(Fake):
        def not_supported_reasons(self, call):
            return ["more than 1000 elements"] if call.args[0].numel() > 1000 else []

    picky = Picky("cuda")
    fresh(picky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.choose(TANH, [picky, _ref()], _call(), "auto") is _ref()
        assert B.choose(TANH, [picky, _ref()], _call(), "cuda") is picky
    assert "not self-checked" in next(iter(B._VERDICTS.values()))[1]


def test_an_explicit_request_runs_the_check_and_raises(fresh):
    bad = Fake("triton", wrong=1e-3)
    fresh(bad)
    with pytest.raises(hessfast.BackendError, match=r"failed its self-check on cpu float32"):
        B.choose(TANH, [bad, _ref()], _call(), "triton")


def test_an_explicit_request_of_a_wrong_implementation_fails_the_product(fresh):
    fresh(Fake("triton", wrong=1e-3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    with pytest.raises(hessfast.BackendError, match="failed its self-check"):
        hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton")
    # the traced path too (the conftest traces every signature on its first product)
    with pytest.raises(hessfast.BackendError, match="failed its self-check"):
        hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", compile="interpret")


def test_selfcheck_off(fresh, monkeypatch):
    bad = Fake("cuda", wrong=1e-3)
    checks = fresh(bad)
    monkeypatch.setenv("HESSFAST_SELFCHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.choose(TANH, [bad, _ref()], _call(), "auto") is bad
        assert B.choose(TANH, [bad, _ref()], _call(), "cuda") is bad
    assert checks == []


def test_a_trace_checks_on_real_tensors(fresh):
    """While a product is traced the call's tensors are fake: the check runs on real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    good, bad = Fake("cuda"), Fake("triton", wrong=1e-3)
    checks = fresh(good, bad)
    with FakeTensorMode():
        call = _call()
        assert B.choose(TANH, [good, _ref()], call, "auto") is good
        with pytest.warns(RuntimeWarning, match="failed its self-check"):
            assert B.choose(TANH, [bad, _ref()], call, "auto") is _ref()
    assert len(checks) == 2


def test_traced_products_with_a_checked_implementation_agree(fresh):
    good = Fake("triton")
    checks = fresh(good)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    for _ in range(2):
        got = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton")
        torch.testing.assert_close(got, want)
    assert len(checks) == 1


def test_on_disk_cache_remembers_passes(fresh, monkeypatch, tmp_path):
    path = tmp_path / "selfcheck.json"
    monkeypatch.setenv("HESSFAST_SELFCHECK_CACHE", str(path))
    good = Fake("cuda")
    checks = fresh(good)
    assert B.choose(TANH, [good, _ref()], _call(), "auto") is good
    assert len(checks) == 1 and path.exists()
    assert "fake_cuda_tanh" in path.read_text() and torch.__version__ in path.read_text()
    B._VERDICTS.clear()  # a new process
    assert B.choose(TANH, [good, _ref()], _call(), "auto") is good
    assert len(checks) == 1


# ---- measured, capability ------------------------------------------------------------------------


def test_unmeasured_kernels_run_their_torch_rule_under_auto(monkeypatch):
    class K(htriton.TritonRule):
        name = "k"
        ops = (TANH,)

    call = _call()
    why = K().auto_reasons(call)
    assert why and "no committed GPU benchmark" in why[0] and "backend='triton'" in why[0]
    monkeypatch.setitem(B.MEASURED, ("triton", "k"), {torch.float32: "benchmarks/results/x.json"})
    assert K().auto_reasons(call) == []
    assert K().auto_reasons(_call(torch.float64))  # measured per dtype


def test_cuda_rules_are_gated_by_the_built_architectures(monkeypatch):
    monkeypatch.setattr(hcuda, "_compiled_archs", lambda: "8.0,9.0+PTX")  # setup.py's default
    cap = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    dev = torch.device("cuda", 0)
    for value, ok in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                      ((8, 9), True), ((9, 0), True), ((10, 0), True), ((12, 0), True)):  # fmt: skip
        cap["value"] = value
        hcuda._capability.cache_clear()
        why = hcuda.device_reasons(dev)
        assert (why == []) == ok, (value, why)
    cap["value"] = (7, 0)
    hcuda._capability.cache_clear()
    assert "compute capability 7.0" in hcuda.device_reasons(dev)[0]
    monkeypatch.setenv("HESSFAST_CUDA_ARCHS", "7.0;8.0")
    assert hcuda.device_reasons(dev) == []
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm" in hcuda.device_reasons(dev)[0]
    hcuda._capability.cache_clear()


def test_triton_rules_are_gated_by_capability_and_vendor(monkeypatch):
    from hessfast.triton.attention import TritonScaledDotProductAttention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.version, "hip", None)
    htriton._capability.cache_clear()
    dev = torch.device("cuda", 0)
    assert "compute capability 7.5" in htriton.device_reasons(dev)[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    htriton._capability.cache_clear()
    attn = TritonScaledDotProductAttention()
    assert attn.device_reasons(dev, torch.float32) == []
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "tf32x3" in attn.device_reasons(dev, torch.float32)[0]
    assert attn.device_reasons(dev, torch.bfloat16) == []
    htriton._capability.cache_clear()


def test_capability_reasons_reach_dispatch(monkeypatch):
    """Through :func:`hessfast.dispatch.reasons` on (fake) CUDA tensors: automatic dispatch
    skips, an explicit request raises with the reason."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class C(hcuda.CudaRule):
        name = "c"
        ops = (TANH,)

        def unavailable(self):
            return None

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    hcuda._capability.cache_clear()
    with FakeTensorMode():
        x = torch.empty(3, device="cuda:0")
        call = Call(TANH, (x,), (True,), (None,), 0)
        why = B.reasons(C(), call, explicit=True)
    assert why and "compute capability 7.0" in why[0]
    hcuda._capability.cache_clear()


def test_attention_is_automatic_only_where_the_math_rule_cannot_fit(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hessfast.triton import attention as ta

    impl = ta.TritonScaledDotProductAttention()
    with FakeTensorMode():
        q = torch.empty(8, 16, 8192, 64, device="cuda:0")
        args = (q, q, q, None, 0.0, True, None, False)
        call = Call(aten.scaled_dot_product_attention.default, args, (True,) * 3 + (False,) * 5,
                    (None,) * 8, 4)  # fmt: skip
        need = ta.math_attention_bytes(call)
        assert need == 6 * 8 * 16 * 8192 * 8192 * 4
        monkeypatch.setattr(ta, "_free_bytes", lambda dev: need // 2)
        assert impl.auto_reasons(call) == []
        monkeypatch.setattr(ta, "_free_bytes", lambda dev: need * 2)
        assert "no committed GPU benchmark" in impl.auto_reasons(call)[0]


# ---- what ran ------------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    return model, x, y, v


def test_return_info_names_the_implementations_per_op_family():
    model, x, y, v = _mlp()
    hv, info = hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret", return_info=True)
    assert hv.shape == v.shape
    assert info.implementations == {"linear": {"torch": 2}, "tanh": {"torch": 1}}
    assert info.path == "interpreted" and info.requested == "auto" and info.fallback_ops == {}
    assert info.backends() == {"torch": 3}
    assert "linear [torch×2]" in str(info)
    hv2, g, info2 = hessfast.hvp(
        model, F.cross_entropy, x, y, v, return_grad=True, return_info=True
    )
    assert g.shape == v.shape and info2.mode == "hvp"
    gv, info3 = hessfast.ggn_vp(model, F.cross_entropy, x, y, v, return_info=True)
    assert info3.mode == "ggn" and info3.implementations["tanh"] == {"torch": 1}
    gr, info4 = hessfast.grad(model, F.cross_entropy, x, y, return_info=True)
    assert isinstance(gr, dict) and info4.mode == "grad"


def test_traced_replays_report_the_choices_made_when_traced():
    model, x, y, v = _mlp()
    infos = [hessfast.hvp(model, F.cross_entropy, x, y, v, return_info=True)[1] for _ in range(3)]
    # the conftest traces at once: the first product traces and returns the interpreter's result,
    # the next ones replay the graph, which dispatches nothing
    assert [i.path for i in infos] == ["interpreted", "traced", "traced"]
    for info in infos:
        assert info.implementations == {"linear": {"torch": 2}, "tanh": {"torch": 1}}


def test_fallback_ops_are_reported():
    class Cum(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).cumsum(-1)

    torch.manual_seed(0)
    model = Cum()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    v = torch.randn(8)
    for _ in range(2):  # interpreted (traced at once), then a replay
        _, info = hessfast.hvp(model, F.cross_entropy, x, y, v, return_info=True)
        assert info.fallback_ops == {"aten.cumsum.default": 1}


def test_debug_log_line_per_product(caplog):
    model, x, y, v = _mlp()
    with caplog.at_level(logging.DEBUG, logger="hessfast"):
        hessfast.hvp(model, F.cross_entropy, x, y, v)
        hessfast.ggn_vp(model, F.cross_entropy, x, y, v)
    lines = [r.getMessage() for r in caplog.records if r.name == "hessfast"]
    ran = [m for m in lines if "torch.func fallback" in m]
    assert len(ran) == 2
    assert ran[0].startswith("hessfast: hvp (") and "tanh [torch×1]" in ran[0]
    assert ran[1].startswith("hessfast: ggn (")


def test_selftest_cli_exit_codes(capsys, monkeypatch):
    from hessfast.cli import main

    argv = ["selftest", "--device", "cpu", "--backend", "torch", "--dtype", "float64"]
    assert main([*argv, "--family", "activation"]) == 0
    out = capsys.readouterr().out
    assert "| activation | tanh | torch | float64 | cpu |" in out and "0 failed" in out

    def broken(*a):
        return torch.zeros(0)

    monkeypatch.setattr(activation.ElementwiseUnary, "fwd_jvp", lambda self, call: broken())
    assert main([*argv, "--family", "activation"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main([*argv, "--family", "nope"]) == 2


def test_the_autograd_fallback_reports_itself():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export cannot capture it
                return self.lin(x)
            return -self.lin(x)

    model = Dynamic()
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
    v = torch.randn(8)
    with pytest.warns(UserWarning, match="could not capture"):
        _, info = hessfast.hvp(model, F.cross_entropy, x, y, v, return_info=True)
    assert info.path == "autograd" and info.implementations == {} and info.fallback_ops == {}
