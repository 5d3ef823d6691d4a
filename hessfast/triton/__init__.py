"""Triton implementations of hessfast's rules (backend ``"triton"``).

One module per op family, named like its rule in ``hessfast/rules/``; each exports
``IMPLEMENTATIONS``, a list of :class:`TritonRule` instances, which the dispatch
(:mod:`hessfast.backends`) registers. The kernels are decorated with ``triton.jit`` when a module
is first imported, which happens on the first product that may use them (not at ``import
hessfast``): whether they run compiled on a GPU or in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) is fixed at that moment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ..rules.base import Call, Rule

#: Whether TRITON_INTERPRET=1 was set when this package (and so its kernels) was first imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def absent(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for an output it does not compute: an empty tensor (custom ops cannot
    return ``None``)."""
    return like.new_empty((0,))


def importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable() -> str | None:
    """Why Triton cannot run here (``None``: it can, given a CUDA device or the interpreter)."""
    if not importable():
        return "Triton is not installed (pip install triton; CUDA builds of torch ship it)"
    return None


def on_device(t: torch.Tensor):
    """The context of a kernel launch on ``t``'s device: Triton launches on the *current* CUDA
    device, so every launch makes the tensors' device current (a model on ``cuda:1``, or split
    across devices, would otherwise run on ``cuda:0`` and crash or read garbage)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


#: The oldest compute capability the kernels are for (bfloat16 ``tl.dot`` and TF32 tensor cores
#: need Ampere).
MIN_CAPABILITY = (8, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_reasons(device: torch.device) -> list[str]:
    """Why the Triton kernels do not run on CUDA device ``device`` (queried on first use, never at
    import): an NVIDIA GPU older than :data:`MIN_CAPABILITY`."""
    if device.type != "cuda" or torch.version.hip:
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < MIN_CAPABILITY:
        return [
            f"compute capability {cap[0]}.{cap[1]} of {device}: hessfast's Triton kernels need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere)"
        ]
    return []


class TritonRule(Rule):
    """Base of the Triton implementations: CUDA tensors, or CPU tensors in the interpreter.

    Automatic dispatch chooses one only where :data:`hessfast.dispatch.MEASURED` lists it for the
    call's dtype (:meth:`auto_reasons`), and after its self-check passed."""

    backend = "triton"
    devices = ("cuda",)

    def unavailable(self) -> str | None:
        return unavailable()

    def interpretable(self) -> bool:
        return INTERPRETED

    def device_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        return device_reasons(device)

    def auto_reasons(self, call: Call) -> list[str]:
        from ..dispatch import unmeasured

        return unmeasured(self, call)
