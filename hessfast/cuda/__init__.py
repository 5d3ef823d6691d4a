"""CUDA C++ implementations of hessfast's rules (backend ``"cuda"``).

The kernels live in ``csrc/`` and are built by ``setup.py`` into the extension ``hessfast._C``,
which registers them as ``torch.ops.hessfast.*``. The modules here wrap those ops as rules, one
module per op family named like its rule; each exports ``IMPLEMENTATIONS``. Importing this
package never loads the extension: :func:`unavailable` does, on first need.
"""

from __future__ import annotations

import importlib

import torch

from ..rules.base import Rule

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


class CudaRule(Rule):
    """Base of the CUDA C++ implementations: CUDA tensors, ``hessfast._C`` loaded."""

    backend = "cuda"
    devices = ("cuda",)

    def unavailable(self) -> str | None:
        return unavailable()
