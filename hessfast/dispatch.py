"""Backends and per-call dispatch between a rule's implementations.

Every rule has a plain-torch reference (backend ``"torch"``); some also have a Triton
implementation (``"triton"``, in ``hessfast/triton/``) and a CUDA C++ one (``"cuda"``, in
``csrc/``, wrapped in ``hessfast/cuda/``). Each implementation declares the devices and dtypes it
takes, its tolerance per dtype, and why it declines an input
(:meth:`~hessfast.rules.base.Rule.not_supported_reasons`).

Dispatch happens per call (per node of the captured graph, per product):

- ``"auto"`` (the default): the first implementation in the order cuda → triton → torch that
  accepts the inputs and is trusted (below) runs; a declining accelerated implementation falls
  back silently. The Triton
  interpreter is never chosen automatically (it is a testing tool, thousands of times slower than
  plain torch on CPU).
- an explicit backend (``backend=`` on the API and the operators, :func:`use_backend`, or the
  ``HESSFAST_BACKEND`` environment variable, in that order of precedence): every op that has an
  implementation in that backend runs it, or the product raises :class:`BackendError` listing
  every implementation's reasons; ops without an implementation there run their torch reference.
  ``"torch"`` forces the references everywhere.

Automatic dispatch trusts an accelerated implementation only when measured and checked:

- measured: a committed GPU benchmark shows it beats the torch rule at that dtype (:data:`MEASURED`,
  read by the implementations' ``auto_reasons``), or the torch rule cannot run at all (the math
  attention's ``T×T`` scores would not fit in free memory); otherwise the torch rule runs;
- checked: the first time automatic dispatch would hand an op to it on a ``(device, dtype)``, it
  runs on a small random problem shaped like the call in the four engine modes and is compared with
  the torch reference (:func:`selfcheck`, :mod:`hessfast.selftest`). A pass is remembered for the
  process (and, with ``HESSFAST_SELFCHECK_CACHE=<file>``, in that file, keyed by device name,
  CUDA/ROCm, torch, Triton and hessfast versions); a failure or an exception warns once, naming the
  implementation and the error, and automatic dispatch never chooses that implementation again in
  the process. An explicit backend request runs the same check and raises :class:`BackendError`
  when it fails. ``HESSFAST_SELFCHECK=0`` turns the checks off.

Accelerated implementations also decline devices they were not built or written for
(``device_reasons``, queried on first use): the CUDA extension a GPU outside its built architecture
list or a ROCm build of torch; the Triton kernels NVIDIA GPUs older than sm_80, and float32
attention on ROCm (3×TF32 products).

Which implementations ran: :func:`recording` counts the choices of the products run inside it
(``return_info=True`` on :func:`hessfast.hvp`, :func:`~hessfast.ggn_vp`, :func:`~hessfast.grad`
returns them as a :class:`ProductInfo`; the ``hessfast`` logger writes one DEBUG line per product).

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
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import HessfastError
from .registry import ORDER, implementations

log = logging.getLogger("hessfast")

CHOICES = ("auto", *ORDER)
ENV = "HESSFAST_BACKEND"

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hessfast_backend", default=None
)

#: ``ENV`` as a key of ``os.environ``'s own dict (bytes on POSIX; ``None``: no such encoder)
_ENV_KEY = getattr(os.environ, "encodekey", lambda _: None)(ENV)


class BackendError(HessfastError, RuntimeError):
    """An explicitly requested backend cannot run an op (the message lists every reason)."""


def check_choice(name: str, where: str) -> str:
    """``name`` as a backend choice (lower case), or ``ValueError`` naming ``where`` it came from
    and the choices.

    >>> check_choice("Torch", "backend=")
    'torch'
    """
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
    return check_choice(env, f"environment variable {ENV}")


def request_state() -> tuple:
    """What :func:`requested` reads, raw and unchecked: the :func:`use_backend` context's value
    and the environment variable's (bytes on POSIX, ``None`` when unset). Equal states request
    the same backend. One dictionary read instead of ``os.environ.get``'s Python and the
    validation: a replayed product compares it on every call (its settings read, cold after a
    small product: 31 µs through :func:`requested`, 15 µs through this).

    >>> import hessfast.dispatch as d
    >>> with d.use_backend("torch"):
    ...     d.request_state()[0]
    'torch'
    """
    env = os.environ
    data = getattr(env, "_data", None)
    raw = env.get(ENV) if data is None or _ENV_KEY is None else data.get(_ENV_KEY)
    return _requested.get(), raw


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
    name = check_choice(name, "use_backend")
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
    if dev is not None and dev.type == "cuda" and hasattr(impl, "device_reasons"):
        out = list(impl.device_reasons(dev, dt))
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
            if not reasons(impl, call, explicit=False) and selfcheck(impl, call) is None:
                return _note(impl, call)
        return None
    mine = [i for i in impls if i.backend == backend]
    if not mine:
        for impl in impls:
            if impl.backend == "torch" and not reasons(impl, call, explicit=True):
                return _note(impl, call)
        return None
    report = []
    for impl in mine:
        why = reasons(impl, call, explicit=True)
        if not why:
            failed = selfcheck(impl, call, explicit=True)
            if failed is not None:
                raise BackendError(
                    f"backend {backend!r} was requested, but {impl.name} [{impl.backend}] failed "
                    f"its self-check on {call_device(call)} {_dtype_name(call_dtype(call))} for "
                    f"{op}: {failed}. Run `hessfast selftest` for the full report; "
                    f"{SELFCHECK_ENV}=0 skips the checks."
                )
            return _note(impl, call)
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


# ---- measured: where automatic dispatch may choose an accelerated implementation -----------------

#: The accelerated implementations that automatic dispatch may choose, per dtype, each with the
#: committed GPU benchmark that shows it beating the torch rule:
#: ``{(backend, name): {dtype: "benchmarks/results/<file>"}}``. Empty: no GPU benchmark of
#: hessfast's kernels has been committed yet, so under ``"auto"`` every op runs its torch rule
#: except where that cannot run at all (attention whose ``T×T`` scores would not fit in memory).
MEASURED: dict[tuple[str, str], dict[torch.dtype, str]] = {}


def unmeasured(impl: Any, call: Any) -> list[str]:
    """The ``auto_reasons`` of an accelerated implementation without a committed benchmark at the
    call's dtype (empty when :data:`MEASURED` lists it)."""
    dt = call_dtype(call)
    if dt in MEASURED.get((impl.backend, impl.name), {}):
        return []
    return [
        f"no committed GPU benchmark shows {impl.name} [{impl.backend}] beating the torch rule in "
        f"{_dtype_name(dt)} (hessfast.dispatch.MEASURED), so automatic dispatch runs the torch "
        f"rule; request backend={impl.backend!r} to run it"
    ]


def _dtype_name(dt: Any) -> str:
    return str(dt).replace("torch.", "")


# ---- self-checks ---------------------------------------------------------------------------------

SELFCHECK_ENV = "HESSFAST_SELFCHECK"
SELFCHECK_CACHE_ENV = "HESSFAST_SELFCHECK_CACHE"

#: Verdicts of this process: ``{key: (ok, message)}``, key = implementation, device, dtype, case;
#: ``ok`` is ``None`` when nothing could be checked (automatic dispatch then passes the
#: implementation by, an explicit request runs it).
_VERDICTS: dict[tuple, tuple[bool, str]] = {}
#: Implementations automatic dispatch no longer chooses: ``{implementation id: why}``.
_DISTRUSTED: dict[tuple, str] = {}


def selfcheck_enabled() -> bool:
    """Whether self-checks run (``HESSFAST_SELFCHECK`` is not ``0``; read now)."""
    return os.environ.get(SELFCHECK_ENV, "").strip() != "0"


def reset_selfchecks() -> None:
    """Forget every verdict of this process (tests; a driver update in a long session)."""
    _VERDICTS.clear()
    _DISTRUSTED.clear()


def _impl_id(impl: Any) -> tuple:
    cls = type(impl)
    return (impl.backend, impl.name, f"{cls.__module__}.{cls.__qualname__}")


def _device_id(dev: torch.device) -> str:
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def selfcheck(impl: Any, call: Any, explicit: bool = False) -> str | None:
    """``None`` when ``impl`` may run ``call``; else why not: its self-check on the call's
    ``(device, dtype)`` (and the shape of the problem, :func:`hessfast.selftest.case_key`) failed,
    now or earlier in the process, or under automatic dispatch (``explicit=False``) it failed on any
    call before. torch rules and ``HESSFAST_SELFCHECK=0`` skip the check. Runs on real tensors
    also while a product is being traced (the trace's modes are suspended meanwhile)."""
    if impl.backend == "torch" or not selfcheck_enabled():
        return None
    iid = _impl_id(impl)
    if not explicit and iid in _DISTRUSTED:
        return _DISTRUSTED[iid]
    from .selftest import case_key

    dev, dt = call_device(call), call_dtype(call)
    if dev is None or dt is None:
        return None  # nothing numeric to check
    key = (iid, _device_id(dev), dt, case_key(call.op, call))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _VERDICTS[key] = _check(impl, call, dev, dt, key)
    ok, message = verdict
    if ok:
        return None
    if ok is None:  # unverified (the implementation declines the problem built for the check)
        return None if explicit else message
    if iid not in _DISTRUSTED:
        _DISTRUSTED[iid] = message
        if explicit:  # the caller raises BackendError with the message
            return message
        warnings.warn(
            f"hessfast: {impl.name} [{impl.backend}] failed its self-check on {dev} "
            f"{_dtype_name(dt)} ({message}); automatic dispatch will not choose it again in this "
            "process and runs the next implementation instead. Run `hessfast selftest` for the "
            f"full report, or set {SELFCHECK_ENV}=0 to skip the checks.",
            RuntimeWarning,
            stacklevel=2,
        )
    return message


def _check(impl: Any, call: Any, dev: torch.device, dt: torch.dtype, key: tuple) -> tuple:
    from .selftest import check_call

    disk = _disk_key(key, dev)
    if disk is not None and disk in _read_cache():
        log.debug(
            "hessfast: self-check of %s [%s] passed before (%s)", impl.name, impl.backend, disk
        )
        return True, "passed (on-disk cache)"
    try:
        verdict = check_call(impl, call, dev, dt)
    except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed check
        return False, f"the self-check raised {type(e).__name__}: {e}"[:400]
    msg = verdict.describe()
    log.debug("hessfast: self-check of %s [%s] on %s %s: %s", impl.name, impl.backend, dev, dt, msg)
    if verdict.declined:
        return None, f"not self-checked: it {msg}"
    if verdict.ok and disk is not None:
        _write_cache(disk)
    return verdict.ok, msg


def _disk_key(key: tuple, dev: torch.device) -> str | None:
    """The on-disk cache key (``None``: no cache file configured)."""
    if not os.environ.get(SELFCHECK_CACHE_ENV):
        return None
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    runtime = torch.version.hip or torch.version.cuda
    driver = None
    if dev.type == "cuda":
        with contextlib.suppress(Exception):
            driver = torch._C._cuda_getDriverVersion()
    return repr((name, runtime, driver, torch.__version__, triton_version, __version__, key))


def _read_cache() -> set:
    path = os.environ.get(SELFCHECK_CACHE_ENV)
    try:
        with open(path) as f:
            return set(json.load(f))
    except (OSError, ValueError, TypeError):
        return set()


def _write_cache(entry: str) -> None:
    path = os.environ[SELFCHECK_CACHE_ENV]
    entries = _read_cache() | {entry}
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(entries), f, indent=0)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("hessfast: could not write the self-check cache %s: %s", path, e)


# ---- what ran ------------------------------------------------------------------------------------


@dataclass
class _Record:
    eager: Counter = field(default_factory=Counter)  # (family, backend) -> calls on real tensors
    traced: Counter = field(default_factory=Counter)  # the same, while tracing (fake tensors)


_recording: contextvars.ContextVar[_Record | None] = contextvars.ContextVar(
    "hessfast_recording", default=None
)


@contextlib.contextmanager
def recording() -> Iterator[_Record]:
    """Count the implementations :func:`choose` picks inside the block (``(family, backend)``:
    calls), apart for real tensors and for the fake tensors of a trace."""
    rec = _Record()
    token = _recording.set(rec)
    try:
        yield rec
    finally:
        _recording.reset(token)


def _note(impl: Any, call: Any) -> Any:
    rec = _recording.get()
    if rec is not None:
        t = next(_tensors(call.args), None)
        (rec.traced if t is not None and _is_fake(t) else rec.eager)[(impl.name, impl.backend)] += 1
    return impl


@dataclass
class ProductInfo:
    """What one product ran: ``implementations`` ``{op family: {backend: calls}}`` (the fused
    head's row op is counted per chunk), ``fallback_ops`` ``{op: nodes}`` that ran the
    ``torch.func`` fallback, the ``requested`` backend, and ``path``: ``"interpreted"``,
    ``"traced"`` (a replay of the traced graph: the counts are those recorded when it was
    traced) or ``"autograd"`` (the whole-loss fallback of a model that could not be captured)."""

    mode: str
    requested: str
    path: str
    implementations: dict[str, dict[str, int]] = field(default_factory=dict)
    fallback_ops: dict[str, int] = field(default_factory=dict)

    def backends(self) -> dict[str, int]:
        """Calls per backend, over every op family."""
        out: Counter = Counter()
        for per in self.implementations.values():
            out.update(per)
        return dict(out)

    def __str__(self) -> str:
        ran = ", ".join(
            f"{fam} [{', '.join(f'{b}×{n}' for b, n in sorted(per.items()))}]"
            for fam, per in sorted(self.implementations.items())
        )
        fell = ", ".join(f"{op}×{n}" for op, n in sorted(self.fallback_ops.items())) or "none"
        return (
            f"{self.mode} ({self.path}, backend={self.requested}): {ran or 'no rules'}; "
            f"torch.func fallback: {fell}"
        )


def _grouped(counts: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (family, backend), n in counts.items():
        out.setdefault(family, {})[backend] = n
    return out


def product_info(
    rec: _Record, mode: str, requested_backend: str, fallback_ops: Any, trace: Any = None
) -> ProductInfo:
    """The :class:`ProductInfo` of one product from its :func:`recording`. ``trace``: the traced
    product it replayed or traced (``None``: interpreted): the choices of its tracing are kept on
    it (:attr:`hessfast.traced.Trace.dispatch_choices`) and reported for its replays, which
    dispatch nothing."""
    if trace is not None and rec.traced:
        trace.dispatch_choices = Counter(rec.traced)
    if rec.eager:
        counts, path = rec.eager, "interpreted"
    elif trace is not None and trace.dispatch_choices is not None:
        counts, path = trace.dispatch_choices, "traced"
    else:
        counts, path = rec.traced, "traced"
    return ProductInfo(
        mode, requested_backend, path, _grouped(counts), dict(Counter(fallback_ops or {}))
    )


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
    "MEASURED",
    "ProductInfo",
    "recording",
    "selfcheck",
    "backends",
    "requested",
    "use_backend",
    "choose",
    "reasons",
    "interpreting",
]
