"""Build script: the Python package, plus ``hessfast._C`` from ``csrc/`` when it can be built.

The extension is built when ``csrc/`` holds sources, a CUDA toolkit is found (``CUDA_HOME``, or the
real location of ``nvcc`` on ``PATH``) and the installed torch is a CUDA build.
``HESSFAST_BUILD_CUDA=0`` skips it; ``=1`` makes a missing toolkit an error. Without it the package
installs cleanly and the CUDA backend reports how to build it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # the nvcc on PATH may be a wrapper script: follow links to the real binary
    real = Path(os.path.realpath(nvcc))
    if real.parent.name == "bin" and (real.parent.parent / "include").is_dir():
        return str(real.parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def _extensions():
    sources = sorted(str(p) for p in (HERE / "csrc").glob("*.c[pu]*"))
    want = os.environ.get("HESSFAST_BUILD_CUDA", "auto")
    if want == "0" or not sources:
        return [], {}
    home = _cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch = None
    ok = home is not None and torch is not None and torch.version.cuda is not None
    if not ok:
        if want == "1":
            raise RuntimeError(
                "HESSFAST_BUILD_CUDA=1 but no CUDA toolkit / CUDA-enabled torch was found: set "
                "CUDA_HOME to the toolkit (the directory holding bin/nvcc) and install a CUDA "
                "build of torch, then build with `pip install -e . --no-build-isolation`."
            )
        return [], {}
    os.environ.setdefault("CUDA_HOME", home)
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = cpp_extension.CUDAExtension(
        "hessfast._C",
        sources,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
