"""Build script: the Python package, plus ``hessfast._C`` from ``csrc/`` when it can be built.

The extension (CUDA kernels and their CPU counterparts, registered as ``torch.ops.hessfast.*``) is
built with ninja when a CUDA toolkit is found and the installed torch is a CUDA build. torch must be
importable at build time, so build without isolation::

    pip install -e . --no-build-isolation

Environment:

- ``HESSFAST_BUILD_CUDA``: ``0`` skips the extension; ``1`` makes a missing toolkit (or torch) an
  error instead of a silent skip; unset: build when possible.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the toolkit. Unset, it is found from ``nvcc`` on ``PATH`` — the
  real toolkit directory, also when that ``nvcc`` is a wrapper script elsewhere — or
  ``/usr/local/cuda``.
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures (default ``8.0;9.0+PTX``: A100, H100/H200 and,
  through the PTX, newer GPUs), compiled into the extension as ``hessfast._C.BUILT_ARCHS``.
- ``MAX_JOBS``: parallel compile jobs (default: from the CPU cores and the available memory, about
  3 GiB per nvcc job).

Without the extension the package installs and runs on its torch (and Triton) backends; the CUDA
backend reports that the extension was not built and how to build it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
DEFAULT_ARCHS = "8.0;9.0+PTX"
GIB_PER_JOB = 3


def _is_toolkit(path: str | Path) -> bool:
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _nvcc_home(nvcc: str) -> str | None:
    """The toolkit of an ``nvcc`` on ``PATH``: its real location, or (for a wrapper script) the
    directory that nvcc itself reports (``_HERE_`` in its ``-dryrun`` output)."""
    real = Path(os.path.realpath(nvcc))
    if _is_toolkit(real.parent.parent):
        return str(real.parent.parent)
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    if m and _is_toolkit(Path(m.group(1).strip()).parent):
        return str(Path(os.path.realpath(m.group(1).strip())).parent)
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit directory (the one holding ``bin/nvcc``), or ``None``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            return home if _is_toolkit(home) else None
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = _nvcc_home(nvcc)
        if home is not None:
            return home
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def max_jobs() -> int:
    """Parallel compile jobs: one per core, at most one per ``GIB_PER_JOB`` of available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    avail_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    jobs = cores or 1
    if avail_gib is not None:
        jobs = min(jobs, int(avail_gib // GIB_PER_JOB))
    return max(1, jobs)


def archs_define(arch_list: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as the value of the ``HESSFAST_CUDA_ARCHS`` define that
    ``hessfast._C.BUILT_ARCHS`` reports: its entries joined by ``,`` (no ``;`` or space, which
    the compile command's shell would split)."""
    return ",".join(re.findall(r"[0-9A-Za-z.+]+", arch_list))


def _skip(why: str, want: str) -> tuple[list, dict]:
    if want == "1":
        raise RuntimeError(
            f"HESSFAST_BUILD_CUDA=1 but the extension cannot be built: {why}. Install a CUDA "
            "toolkit (or set CUDA_HOME to the directory holding bin/nvcc) and a CUDA build of "
            "torch, then build with `pip install -e . --no-build-isolation`."
        )
    print(f"hessfast: not building the CUDA extension hessfast._C: {why}", file=sys.stderr)
    return [], {}


def extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``setup``: ``hessfast._C`` when it can be built."""
    want = os.environ.get("HESSFAST_BUILD_CUDA", "").strip()
    sources = sorted(str(p.relative_to(HERE)) for p in (*CSRC.glob("*.cpp"), *CSRC.glob("*.cu")))
    if want == "0":
        return [], {}
    if not sources:
        return _skip("csrc/ holds no sources", want)
    home = cuda_home()
    if home is None:
        return _skip(
            "no CUDA toolkit found (none at CUDA_HOME / CUDA_PATH, behind nvcc on PATH or at "
            "/usr/local/cuda)",
            want,
        )
    # torch.utils.cpp_extension reads CUDA_HOME when first imported
    os.environ.setdefault("CUDA_HOME", home)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip(
            "torch is not importable at build time (build with --no-build-isolation, torch "
            "installed first)",
            want,
        )
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build", want)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(max_jobs()))
    ext = cpp_extension.CUDAExtension(
        "hessfast._C",
        sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": [
                "-O3",
                f"-DHESSFAST_CUDA_ARCHS={archs_define(os.environ['TORCH_CUDA_ARCH_LIST'])}",
            ],
            "nvcc": ["-O3", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # as pip, setuptools' build backend and `python setup.py` run it
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
