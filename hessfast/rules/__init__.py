"""Rules: one module per op family, each a plain-torch forward-over-reverse implementation.

:func:`rule_for` maps an op (an aten overload or ``operator.getitem``) to the rule that handles it,
or to the ``torch.func`` fallback when no hand-written rule exists or the rule declines the call.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Call, Rule
from .fallback import FuncFallback

#: Rule modules, each exporting ``RULES``: a list of Rule instances.
_MODULES = (
    "getitem",
    "linear",
    "matmul",
    "conv",
    "embedding",
    "layer_norm",
    "batch_norm",
    "activation",
    "softmax",
    "attention",
    "elementwise",
    "shape",
    "reduction",
)

_REGISTRY: dict[Any, Rule] | None = None
_FALLBACKS: dict[Any, FuncFallback] = {}


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


def registered_rule(op: Any) -> Rule | None:
    """The hand-written rule registered for ``op``, or ``None``."""
    return _registry().get(op)


def fallback_for(op: Any) -> FuncFallback:
    rule = _FALLBACKS.get(op)
    if rule is None:
        rule = _FALLBACKS[op] = FuncFallback(op)
    return rule


def rule_for(op: Any, call: Call) -> Rule:
    """The rule that evaluates ``call``: the registered rule unless it declines, else the fallback."""
    rule = registered_rule(op)
    if rule is not None and rule.declines(call) is None:
        return rule
    return fallback_for(op)


__all__ = ["Call", "Rule", "rule_for", "registered_rule", "fallback_for"]
