"""Backends and per-call dispatch between a rule's implementations.

Every rule has a plain-torch reference (backend ``"torch"``); some also have a Triton
implementation (``"triton"``, in ``hessfast/triton/``) and a CUDA C++ one (``"cuda"``, in
``csrc/``, wrapped in ``hessfast/cuda/``). Each implementation declares the devices and dtypes it
takes, its tolerance per dtype, and why it declines an input
(:meth:`~hessfast.rules.base.Rule.not_supported_reasons`).

Dispatch happens per call (per node of the captured graph, per product):

- ``"auto"`` (the default): the first implementation in the order cuda → triton → torch that
  accepts the inputs runs; a declining accelerated implementation falls back silently. The Triton
  interpreter is never chosen automatically (it is a testing tool, thousands of times slower than
  plain torch on CPU).
- an explicit backend (``backend=`` on the API and the operators, :func:`use_backend`, or the
  ``HESSFAST_BACKEND`` environment variable, in that order of precedence): every op that has an
  implementation in that backend runs it, or the product raises :class:`BackendError` listing
  every implementation's reasons; ops without an implementation there run their torch reference.
  ``"torch"`` forces the references everywhere.

Under ``TRITON_INTERPRET=1`` (set before hessfast's Triton kernels are first imported) an explicit
``"triton"`` request also runs the kernels on CPU tensors, through Triton's interpreter: that is how
CI tests them on a machine without a GPU.

Nothing here touches the GPU at import time; :func:`backends` looks when it is called.

>>> import hessfast
>>> sorted(hessfast.backends())
['cuda', 'torch', 'triton']
>>> hessfast.backends()["torch"].available
True
>>> with hessfast.use_backend("torch"):
...     hessfast.backends.requested()
'torch'
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import HessfastError

#: Backends in dispatch priority order.
ORDER = ("cuda", "triton", "torch")
CHOICES = ("auto", *ORDER)
ENV = "HESSFAST_BACKEND"

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hessfast_backend", default=None
)


class BackendError(HessfastError, RuntimeError):
    """An explicitly requested backend cannot run an op (the message lists every reason)."""


def _check_choice(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name.lower()


def requested() -> str:
    """The backend the current context asks for: :func:`use_backend` if active, else
    ``HESSFAST_BACKEND`` (read now, not at import), else ``"auto"``."""
    name = _requested.get()
    if name is not None:
        return name
    env = os.environ.get(ENV, "").strip()
    if not env:
        return "auto"
    return _check_choice(env, f"environment variable {ENV}")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """Run the products inside the ``with`` block on backend ``name`` (``"auto"``, ``"cuda"``,
    ``"triton"`` or ``"torch"``); ``None`` leaves the current choice unchanged.

    >>> import hessfast
    >>> with hessfast.use_backend("torch") as b:
    ...     b
    'torch'
    """
    if name is None:
        yield requested()
        return
    name = _check_choice(name, "use_backend")
    token = _requested.set(name)
    try:
        yield name
    finally:
        _requested.reset(token)


# ---- the generic checks every implementation gets ------------------------------------------------


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def call_device(call: Any) -> torch.device | None:
    for t in _tensors(call.args):
        return t.device
    return None


def call_dtype(call: Any) -> torch.dtype | None:
    for t in _tensors(call.args):
        if t.is_floating_point():
            return t.dtype
    return None


def reasons(impl: Any, call: Any, explicit: bool) -> list[str]:
    """Why ``impl`` cannot take ``call`` (empty: it can): availability, device, dtype, then the
    implementation's own :meth:`not_supported_reasons`, and under automatic dispatch
    (``explicit=False``) its :meth:`auto_reasons`."""
    why = impl.unavailable()
    if why:
        return [why]
    out = []
    dev = call_device(call)
    if dev is not None and impl.devices is not None and dev.type not in impl.devices:
        if impl.backend == "triton" and dev.type == "cpu":
            if not explicit:
                out.append(
                    "tensors are on the CPU; automatic dispatch never picks the Triton "
                    "interpreter (request backend='triton' with TRITON_INTERPRET=1 to run it)"
                )
            elif not interpreting():
                out.append(
                    "tensors are on the CPU; Triton kernels run on CUDA devices "
                    "(set TRITON_INTERPRET=1 before importing hessfast to run them on the CPU "
                    "through Triton's interpreter)"
                )
            elif not impl.interpretable():
                out.append(
                    "the Triton kernels were compiled for the GPU when first imported "
                    "(TRITON_INTERPRET was not 1 then); set TRITON_INTERPRET=1 before the "
                    "first import of hessfast's Triton kernels"
                )
        else:
            out.append(
                f"tensors are on {dev.type}; this implementation runs on "
                f"{' or '.join(impl.devices)}"
            )
    dt = call_dtype(call)
    if dt is not None and impl.dtypes is not None and dt not in impl.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        out.append(f"dtype {str(dt).replace('torch.', '')} is not supported (takes {names})")
    if out:
        return out
    out = list(impl.not_supported_reasons(call))
    if not out and not explicit:
        out = list(impl.auto_reasons(call))
    return out


def choose(op: Any, impls: list[Any], call: Any, backend: str) -> Any | None:
    """The implementation of ``op`` that runs ``call`` under ``backend``; ``None`` when only the
    ``torch.func`` fallback is left (the torch reference declined, or the op has no rule).

    ``impls`` is in priority order and ends with the torch reference when the op has one.
    """
    if backend == "auto":
        for impl in impls:
            if not reasons(impl, call, explicit=False):
                return impl
        return None
    mine = [i for i in impls if i.backend == backend]
    if not mine:
        for impl in impls:
            if impl.backend == "torch" and not reasons(impl, call, explicit=True):
                return impl
        return None
    report = []
    for impl in mine:
        why = reasons(impl, call, explicit=True)
        if not why:
            return impl
        report.append((impl, why))
    lines = [f"backend {backend!r} was requested, but it cannot run {op}:"]
    for impl, why in report:
        lines += [f"  - {impl.name} [{impl.backend}]: {w}" for w in why]
    others = [i for i in impls if i.backend != backend]
    for impl in others:
        why = reasons(impl, call, explicit=True)
        state = "would run" if not why else "; ".join(why)
        lines.append(f"  - {impl.name} [{impl.backend}] (not requested): {state}")
    lines.append(
        "Run with backend='auto' (the default) to fall back to another implementation, or "
        "move the inputs to a device and dtype the requested backend takes."
    )
    raise BackendError("\n".join(lines))


# ---- what is available ---------------------------------------------------------------------------


@dataclass
class BackendInfo:
    """One backend: whether it can run here, why not, and the ops it implements."""

    name: str
    available: bool
    reason: str | None
    ops: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name}: {state}; {len(self.ops)} ops"


def _cuda_device_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    return None


def _triton_reason() -> str | None:
    from . import triton as triton_pkg

    why = triton_pkg.unavailable()
    if why:
        return why
    if interpreting():
        return None
    return _cuda_device_reason()


def _cuda_reason() -> str | None:
    from . import cuda as cuda_pkg

    why = cuda_pkg.unavailable()
    if why:
        return why
    return _cuda_device_reason()


class _Backends:
    """``hessfast.backends()``: a dict ``{name: BackendInfo}`` of what can run here and why not;
    also holds :func:`requested` and :func:`use_backend` as attributes."""

    requested = staticmethod(requested)
    use_backend = staticmethod(use_backend)
    ORDER = ORDER

    def __call__(self) -> dict[str, BackendInfo]:
        from .rules import implementations

        ops: dict[str, list[str]] = {b: [] for b in ORDER}
        for op, impls in implementations().items():
            for impl in impls:
                ops[impl.backend].append(str(op))
        out = {}
        for name, why in (
            ("cuda", _cuda_reason()),
            ("triton", _triton_reason()),
            ("torch", None),
        ):
            out[name] = BackendInfo(name, why is None, why, sorted(set(ops[name])))
        return out


backends = _Backends()


__all__ = [
    "BackendError",
    "BackendInfo",
    "backends",
    "requested",
    "use_backend",
    "choose",
    "reasons",
    "interpreting",
]
