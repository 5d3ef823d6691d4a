"""Rules: one module per op family, each a plain-torch forward-over-reverse implementation.

:func:`rule_for` maps an op (an aten overload or ``operator.getitem``) to the rule that handles it,
or to the ``torch.func`` fallback when no hand-written rule exists or the rule declines the call.
Accelerated implementations (Triton, CUDA) of the same ops live in ``hessfast/triton/`` and
``hessfast/cuda/``; :func:`rule_for` picks among them per call (:mod:`hessfast.backends`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..dispatch import ORDER, call_device, choose
from .base import Call, Rule
from .fallback import FuncFallback

#: Rule modules, each exporting ``RULES``: a list of Rule instances.
_MODULES = (
    "getitem",
    "linear",
    "matmul",
    "baddbmm",
    "conv",
    "pool",
    "embedding",
    "layer_norm",
    "group_norm",
    "batch_norm",
    "activation",
    "softmax",
    "attention",
    "elementwise",
    "shape",
    "structural",
    "select",
    "reduction",
    "cross_entropy",
)

_REGISTRY: dict[Any, Rule] | None = None
_ACCELERATED: dict[Any, list[Rule]] | None = None
_FALLBACKS: dict[Any, FuncFallback] = {}

#: Packages holding accelerated implementations: every module in them that exports
#: ``IMPLEMENTATIONS`` (a list of Rule instances with ``backend`` set) is registered.
_ACCELERATED_PACKAGES = ("hessfast.triton", "hessfast.cuda")


def _registry() -> dict[Any, Rule]:
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[Any, Rule] = {}
        for name in _MODULES:
            mod = importlib.import_module(f"{__name__}.{name}")
            for rule in mod.RULES:
                for op in rule.ops:
                    reg[op] = rule
        _REGISTRY = reg
    return _REGISTRY


def _accelerated() -> dict[Any, list[Rule]]:
    """Accelerated implementations per op, in priority order (cuda before triton). Loaded on first
    need: a CPU-only run under automatic dispatch never imports Triton."""
    global _ACCELERATED
    if _ACCELERATED is None:
        found: dict[Any, list[Rule]] = {}
        for pkg_name in _ACCELERATED_PACKAGES:
            pkg = importlib.import_module(pkg_name)
            if not pkg.importable():
                continue
            for info in pkgutil.iter_modules(pkg.__path__):
                mod = importlib.import_module(f"{pkg_name}.{info.name}")
                for impl in getattr(mod, "IMPLEMENTATIONS", ()):
                    for op in impl.ops:
                        found.setdefault(op, []).append(impl)
        for impls in found.values():
            impls.sort(key=lambda r: ORDER.index(r.backend))
        _ACCELERATED = found
    return _ACCELERATED


def implementations(op: Any = None) -> dict[Any, list[Rule]] | list[Rule]:
    """Every implementation of ``op`` in dispatch order (cuda, triton, torch); without ``op``, a
    dict of all ops that have at least one."""
    acc = _accelerated()
    reg = _registry()
    if op is not None:
        return [*acc.get(op, ()), *([reg[op]] if op in reg else [])]
    return {o: implementations(o) for o in {*acc, *reg}}


def registered_rule(op: Any) -> Rule | None:
    """The plain-torch rule registered for ``op``, or ``None``."""
    return _registry().get(op)


def fallback_for(op: Any) -> FuncFallback:
    rule = _FALLBACKS.get(op)
    if rule is None:
        rule = _FALLBACKS[op] = FuncFallback(op)
    return rule


def rule_for(op: Any, call: Call, backend: str = "auto") -> Rule:
    """The implementation that evaluates ``call`` under ``backend`` (see :mod:`hessfast.backends`):
    an accelerated one, the plain-torch rule, or the ``torch.func`` fallback when the rule declines
    or the op has none."""
    ref = registered_rule(op)
    if backend == "torch":
        impls = [ref] if ref is not None else []
    elif backend == "auto" and (call_device(call) is None or call_device(call).type != "cuda"):
        impls = [ref] if ref is not None else []
    else:
        impls = implementations(op)
    rule = choose(op, impls, call, backend)
    return rule if rule is not None else fallback_for(op)


__all__ = [
    "Call",
    "Rule",
    "rule_for",
    "registered_rule",
    "fallback_for",
    "implementations",
]
