"""CUDA C++ implementations of hessfast's rules (backend ``"cuda"``).

The kernels live in ``csrc/`` and are built by ``setup.py`` into the extension ``hessfast._C``,
which registers them as ``torch.ops.hessfast.*``. The modules here wrap those ops as rules, one
module per op family named like its rule; each exports ``IMPLEMENTATIONS``. Importing this
package never loads the extension: :func:`unavailable` does, on first need.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ..rules.base import Call, Rule

_LOADED: str | None | bool = False

BUILD_HINT = (
    "reinstall with a CUDA toolkit and a CUDA build of torch present "
    "(pip install -e . --no-build-isolation; HESSFAST_BUILD_CUDA=1 makes a missing toolkit an "
    "error instead of a silent skip)"
)


def importable() -> bool:
    return True


def unavailable() -> str | None:
    """Why the CUDA extension cannot be used (``None``: ``hessfast._C`` is loaded)."""
    global _LOADED
    if _LOADED is False:
        try:
            importlib.import_module("hessfast._C")
            _LOADED = None
        except ImportError as e:
            _LOADED = f"extension not built ({e}): {BUILD_HINT}"
        except OSError as e:
            _LOADED = f"extension hessfast._C failed to load ({e}): {BUILD_HINT}"
    return _LOADED


def ops():
    """``torch.ops.hessfast``, after loading ``hessfast._C`` (a clear error when it cannot be)."""
    why = unavailable()
    if why:
        raise RuntimeError(f"hessfast's CUDA backend cannot run: {why}")
    return torch.ops.hessfast


def built_archs() -> str:
    """The GPU architectures ``hessfast._C`` was compiled for, in ``TORCH_CUDA_ARCH_LIST`` syntax:
    the list ``setup.py`` compiled into the extension (``hessfast._C.BUILT_ARCHS``; by default
    ``8.0,9.0+PTX``: sm_80 machine code, which runs on every 8.x GPU, sm_90 machine code, and PTX
    that the driver compiles for newer GPUs), or ``HESSFAST_CUDA_ARCHS`` when set (an override);
    empty when the extension is not loaded.

    >>> isinstance(built_archs(), str)
    True
    """
    return os.environ.get("HESSFAST_CUDA_ARCHS") or _compiled_archs()


def _compiled_archs() -> str:
    """``hessfast._C.BUILT_ARCHS`` (empty when the extension is not loaded)."""
    if unavailable():
        return ""
    return getattr(importlib.import_module("hessfast._C"), "BUILT_ARCHS", "")


def _archs() -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """``(machine-code capabilities, lowest PTX capability or None)`` of the built extension."""
    sass, ptx = [], []
    for part in built_archs().replace(",", ";").replace(" ", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        with_ptx = part.endswith("+PTX")
        major, _, minor = part.removesuffix("+PTX").partition(".")
        try:
            cap = (int(major), int(minor.rstrip("af") or 0))
        except ValueError:
            continue
        sass.append(cap)
        if with_ptx:
            ptx.append(cap)
    return sass, (min(ptx) if ptx else None)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_reasons(device: torch.device) -> list[str]:
    """Why the extension's kernels cannot run on ``device`` (queried on first use, never at
    import): a ROCm build of torch, or a GPU for which :func:`built_archs` holds neither machine
    code of its major version (at or below its capability) nor PTX it can compile ("no kernel
    image is available" otherwise, mid-product)."""
    if device.type != "cuda":
        return []
    if torch.version.hip:
        return ["hessfast's CUDA extension is CUDA-only; this is a ROCm (HIP) build of torch"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    sass, ptx = _archs()
    if any(a[0] == cap[0] and a[1] <= cap[1] for a in sass) or (ptx is not None and ptx <= cap):
        return []
    return [
        f"compute capability {cap[0]}.{cap[1]} of {device} is not among the architectures "
        f"hessfast._C was built for ({built_archs()}): rebuild with TORCH_CUDA_ARCH_LIST "
        f"including {cap[0]}.{cap[1]}"
    ]


class CudaRule(Rule):
    """Base of the CUDA C++ implementations: CUDA tensors, ``hessfast._C`` loaded, a GPU the
    extension was built for. Automatic dispatch chooses one only where
    :data:`hessfast.dispatch.MEASURED` lists it for the call's dtype (:meth:`auto_reasons`), and
    after its self-check passed."""

    backend = "cuda"
    devices = ("cuda",)

    def unavailable(self) -> str | None:
        return unavailable()

    def device_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        return device_reasons(device)

    def auto_reasons(self, call: Call) -> list[str]:
        from ..dispatch import unmeasured

        return unmeasured(self, call)
