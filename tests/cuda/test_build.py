"""The extension ``hessfast._C``: its build script, its registered ops, and the dispatch to it.

- the build script (``setup.py``) finds the toolkit behind an ``nvcc`` wrapper script, honours
  ``HESSFAST_BUILD_CUDA`` (0: skip, 1: a missing toolkit is an error) and the default
  architectures, and sizes ``MAX_JOBS``;
- the built extension imports and registers every op with its schema and its CPU, CUDA, Meta and
  Autograd kernels (when ``HESSFAST_BUILD_CUDA=1``, as in CI, an unbuilt extension fails here
  instead of skipping);
- the dispatch picks a CUDA implementation only for GPU tensors with the extension loaded, and
  under ``"auto"`` only where measured (``hessfast.dispatch.MEASURED``) and self-checked:
  never for CPU tensors under ``"auto"``, a ``BackendError`` with the reasons for
  ``backend="cuda"``, and "extension not built" when it cannot be imported.
"""

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import hessfast
import hessfast.cuda
from hessfast.dispatch import BackendError
from hessfast.rules import implementations, registered_rule, rule_for
from hessfast.rules.base import Call

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten

# the aten ops with a CUDA implementation, and a CPU call of each
CALLS = {
    aten.gelu.default: ((torch.randn(3, 4), "none"), (True, False)),
    aten.relu.default: ((torch.randn(3, 4),), (True,)),
    aten.layer_norm.default: (
        (torch.randn(3, 4), [4], torch.randn(4), torch.randn(4), 1e-5, True),
        (True, False, True, True, False, False),
    ),
    aten.rms_norm.default: (
        (torch.randn(3, 4), [4], torch.randn(4), 1e-6),
        (True, False, True, False),
    ),
}


def load_setup():
    spec = importlib.util.spec_from_file_location("hessfast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_extension_imports_and_registers_its_ops():
    """Every op of the table ``HESSFAST_OPS`` (``csrc/ops.h``, exposed as ``hessfast._C.OPS``) is
    defined with its schema and has CPU, CUDA, Meta and Autograd kernels; every op the wrappers in
    ``hessfast/cuda/`` call is in the table; every wrapper module's ``IMPLEMENTATIONS`` is found by
    the registry."""
    why = hessfast.cuda.unavailable()
    if why:
        if os.environ.get("HESSFAST_BUILD_CUDA") == "1":
            pytest.fail(f"HESSFAST_BUILD_CUDA=1 but {why}")
        pytest.skip(why)
    ops = importlib.import_module("hessfast._C").OPS
    table = dict(ops)
    assert len(table) == len(ops) and table
    for name, schema in table.items():
        assert schema.startswith(f"{name}(")
        assert str(getattr(torch.ops.hessfast, name).default._schema) == f"hessfast::{schema}"
        for key in ("CPU", "CUDA", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hessfast::{name}", key), key
    wrappers = sorted((ROOT / "hessfast" / "cuda").glob("*.py"))
    called = {m for p in wrappers for m in re.findall(r"ops\(\)\.(\w+)\(", p.read_text())}
    assert called and called <= set(table), called - set(table)
    for path in wrappers:
        mod = importlib.import_module(f"hessfast.cuda.{path.stem}")
        for impl in getattr(mod, "IMPLEMENTATIONS", ()):
            for op in impl.ops:
                assert impl in implementations(op), (path.name, impl.name)


def test_the_extension_reports_the_architectures_it_was_built_for(ext, monkeypatch):
    """``setup.py`` compiles ``TORCH_CUDA_ARCH_LIST`` into the extension (``,`` between entries:
    the compile command's shell would split at ``;``)."""
    built = importlib.import_module("hessfast._C").BUILT_ARCHS
    assert re.fullmatch(r"[0-9A-Za-z.+]+(,[0-9A-Za-z.+]+)*", built)
    monkeypatch.delenv("HESSFAST_CUDA_ARCHS", raising=False)
    assert hessfast.cuda.built_archs() == built
    monkeypatch.setenv("HESSFAST_CUDA_ARCHS", "7.0;8.0")  # an override
    assert hessfast.cuda.built_archs() == "7.0;8.0"
    setup = load_setup()
    assert setup.archs_define(setup.DEFAULT_ARCHS) == "8.0,9.0+PTX"
    assert setup.archs_define(" 8.6 ; 9.0a,10.0+PTX ") == "8.6,9.0a,10.0+PTX"


def test_ops_are_not_differentiable(ext):
    x = torch.randn(3, requires_grad=True)
    y, _ = torch.ops.hessfast.act_fwd_jvp(x, None, "tanh")
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def toolkit_here():
    home = load_setup().cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    return home


def test_cuda_home_is_found_behind_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    """``nvcc`` on PATH may be a script that execs the real one (so ``bin/..`` of its path is not
    the toolkit): the build script asks nvcc where it lives."""
    home = toolkit_here()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "include").mkdir()  # a bin/../include that is not a toolkit's
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    setup = load_setup()
    assert os.path.realpath(setup.cuda_home()) == os.path.realpath(home)


def test_build_switches(tmp_path, monkeypatch, capsys):
    setup = load_setup()
    monkeypatch.setenv("HESSFAST_BUILD_CUDA", "0")
    assert setup.extensions() == ([], {})
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit
    monkeypatch.setenv("HESSFAST_BUILD_CUDA", "1")
    with pytest.raises(
        RuntimeError, match="HESSFAST_BUILD_CUDA=1 but the extension cannot be built"
    ):
        setup.extensions()
    monkeypatch.delenv("HESSFAST_BUILD_CUDA")
    assert setup.extensions() == ([], {})
    assert "not building the CUDA extension" in capsys.readouterr().err


def test_build_defaults_when_a_toolkit_is_present(monkeypatch):
    home = toolkit_here()
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    for var in ("HESSFAST_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    setup = load_setup()
    (ext,), cmdclass = setup.extensions()
    assert ext.name == "hessfast._C" and "build_ext" in cmdclass
    assert {Path(s).name for s in ext.sources} == {
        p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu")
    }
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert os.path.realpath(os.environ["CUDA_HOME"]) == os.path.realpath(home)
    assert 1 <= int(os.environ["MAX_JOBS"]) <= os.cpu_count()


def cpu_call(op):
    args, active = CALLS[op]
    return Call(op, args, active, (None,) * len(args), 0)


@pytest.mark.parametrize("op", list(CALLS), ids=str)
def test_cpu_tensors_never_dispatch_to_cuda(op, ext):
    call = cpu_call(op)
    assert rule_for(op, call, "auto") is registered_rule(op)
    with pytest.raises(BackendError) as err:
        rule_for(op, call, "cuda")
    assert "[cuda]: tensors are on cpu; this implementation runs on cuda" in str(err.value)


def test_an_unbuilt_extension_is_reported(monkeypatch):
    monkeypatch.setattr(hessfast.cuda, "_LOADED", False)
    monkeypatch.setitem(sys.modules, "hessfast._C", None)  # `import hessfast._C` now fails
    why = hessfast.cuda.unavailable()
    assert why.startswith("extension not built") and "--no-build-isolation" in why
    op = aten.gelu.default
    cuda_impls = [i for i in implementations(op) if i.backend == "cuda"]
    assert cuda_impls and all(i.unavailable() == why for i in cuda_impls)
    assert rule_for(op, cpu_call(op), "auto") is registered_rule(op)
    with pytest.raises(BackendError, match="extension not built"):
        rule_for(op, cpu_call(op), "cuda")
    assert hessfast.backends()["cuda"].reason == why


@pytest.mark.parametrize("op", list(CALLS), ids=str)
def test_gpu_tensors_dispatch_to_cuda_where_measured_and_checked(op, gpu, monkeypatch):
    """Unmeasured (no committed GPU benchmark in ``hessfast.dispatch.MEASURED``): ``"auto"`` runs
    the torch rule; listed there, the CUDA implementation after its self-check on this GPU."""
    from hessfast import dispatch

    monkeypatch.setattr(dispatch, "_VERDICTS", {})
    monkeypatch.setattr(dispatch, "_DISTRUSTED", {})
    monkeypatch.delenv("HESSFAST_SELFCHECK", raising=False)
    args, active = CALLS[op]
    args = tuple(a.to(gpu) if isinstance(a, torch.Tensor) else a for a in args)
    call = Call(op, args, active, (None,) * len(args), 0)
    assert rule_for(op, call, "auto") is registered_rule(op)
    cuda = next(i for i in implementations(op) if i.backend == "cuda")
    monkeypatch.setitem(dispatch.MEASURED, ("cuda", cuda.name), {args[0].dtype: "(test)"})
    assert rule_for(op, call, "auto") is cuda
    assert dispatch._VERDICTS and all(ok for ok, _ in dispatch._VERDICTS.values())
