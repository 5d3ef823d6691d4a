"""Triton implementations of hessfast's rules (backend ``"triton"``).

One module per op family, named like its rule in ``hessfast/rules/``; each exports
``IMPLEMENTATIONS``, a list of :class:`TritonRule` instances, which the dispatch
(:mod:`hessfast.backends`) registers. The kernels are decorated with ``triton.jit`` when a module
is first imported, which happens on the first product that may use them (not at ``import
hessfast``): whether they run compiled on a GPU or in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) is fixed at that moment.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..rules.base import Rule

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


class TritonRule(Rule):
    """Base of the Triton implementations: CUDA tensors, or CPU tensors in the interpreter."""

    backend = "triton"
    devices = ("cuda",)

    def unavailable(self) -> str | None:
        return unavailable()

    def interpretable(self) -> bool:
        return INTERPRETED
