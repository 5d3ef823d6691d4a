"""Where implementations are registered: the plain-torch rules and the Triton / CUDA kernels of
every op, found the same way for every backend.

A module registers its implementations by exporting a list of
:class:`~hessfast.rules.base.Rule` instances, each with ``ops`` (the aten overloads it handles)
and ``backend``: ``RULES`` in a module of ``hessfast/rules/`` (backend ``"torch"``: one rule per
op), ``IMPLEMENTATIONS`` in a module of ``hessfast/triton/`` or ``hessfast/cuda/``. The registry
imports those packages' modules on first need (a package whose runtime is missing, e.g. no
Triton, is passed over) and keeps the accelerated ones per op in :data:`ORDER`.

:mod:`hessfast.dispatch` (which implementation runs a call) and :mod:`hessfast.rules` (the torch
rules and :func:`~hessfast.rules.rule_for`) both read the registry here; this module imports
neither at import time, so neither imports the other to find an implementation.

>>> import torch
>>> from hessfast import registry
>>> registry.registered_rule(torch.ops.aten.gelu.default).backend
'torch'
>>> [i.backend for i in registry.implementations(torch.ops.aten.gelu.default)][-1]
'torch'
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rules.base import Rule
    from .rules.fallback import FuncFallback

#: Backends in dispatch order: an op's CUDA implementation before its Triton one before the rule.
ORDER = ("cuda", "triton", "torch")

#: The package of the plain-torch rules: each module exporting ``RULES`` is registered.
RULE_PACKAGE = "hessfast.rules"
#: Packages holding accelerated implementations: each module exporting ``IMPLEMENTATIONS`` is
#: registered, when the package's ``importable()`` says its runtime is there.
ACCELERATED_PACKAGES = ("hessfast.triton", "hessfast.cuda")

_REGISTRY: dict[Any, Rule] | None = None
_ACCELERATED: dict[Any, list[Rule]] | None = None
_FALLBACKS: dict[Any, FuncFallback] = {}


def _exported(pkg_name: str, attr: str) -> list[Rule]:
    """Every ``attr`` list of the modules of package ``pkg_name``, concatenated, modules by name."""
    pkg = importlib.import_module(pkg_name)
    found: list[Rule] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg_name}.{info.name}")
        found.extend(getattr(mod, attr, ()))
    return found


def torch_rules() -> dict[Any, Rule]:
    """``{op: its plain-torch rule}``. Two rules for one op are a registration error."""
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[Any, Rule] = {}
        for rule in _exported(RULE_PACKAGE, "RULES"):
            for op in rule.ops:
                if op in reg and reg[op] is not rule:
                    raise RuntimeError(
                        f"{op} has two torch rules, {reg[op].name} and {rule.name}: an op is "
                        "registered by one module's RULES"
                    )
                reg[op] = rule
        _REGISTRY = reg
    return _REGISTRY


def accelerated() -> dict[Any, list[Rule]]:
    """``{op: its Triton / CUDA implementations in dispatch order}``. Loaded on first need: a
    CPU-only run under automatic dispatch never imports Triton."""
    global _ACCELERATED
    if _ACCELERATED is None:
        found: dict[Any, list[Rule]] = {}
        for pkg_name in ACCELERATED_PACKAGES:
            if not importlib.import_module(pkg_name).importable():
                continue
            for impl in _exported(pkg_name, "IMPLEMENTATIONS"):
                for op in impl.ops:
                    found.setdefault(op, []).append(impl)
        for impls in found.values():
            impls.sort(key=lambda r: ORDER.index(r.backend))
        _ACCELERATED = found
    return _ACCELERATED


def implementations(op: Any = None) -> dict[Any, list[Rule]] | list[Rule]:
    """Every implementation of ``op`` in dispatch order (cuda, triton, torch); without ``op``, a
    dict of all ops that have at least one."""
    acc = accelerated()
    reg = torch_rules()
    if op is not None:
        return [*acc.get(op, ()), *([reg[op]] if op in reg else [])]
    return {o: implementations(o) for o in {*acc, *reg}}


def registered_rule(op: Any) -> Rule | None:
    """The plain-torch rule registered for ``op``, or ``None``."""
    return torch_rules().get(op)


def fallback_for(op: Any) -> FuncFallback:
    """The generic ``torch.func`` rule of ``op`` (one instance per op)."""
    rule = _FALLBACKS.get(op)
    if rule is None:
        from .rules.fallback import FuncFallback

        rule = _FALLBACKS[op] = FuncFallback(op)
    return rule
