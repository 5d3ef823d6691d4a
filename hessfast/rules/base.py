"""The rule contract shared by every op family, and small helpers for writing rules.

A rule implements Pearlmutter's R-op pair for one aten op family:

- ``fwd_jvp(call) -> (y, ẏ, residuals)``: the primal output and its tangent for K tangents at once;
- ``bwd_jvp(residuals, ḡ_y, ġ_y) -> (ḡ_args, ġ_args)``: the cotangents (VJP) of the inputs and the
  tangents of those cotangents.

Index conventions (used by every rule in this package):

- a primal ``x`` has its own shape; its tangent ``ẋ`` has shape ``[K, *x.shape]``; the K tangent
  vectors share one primal pass;
- the primal cotangent ``ḡ`` has the primal's shape; its tangent ``ġ`` has shape ``[K, *shape]``;
- ``None`` stands for a zero (an inactive input, a cotangent that never arrived, GGN mode's absent
  ``ḡ``, or the absent tangents of a gradient-only run).

For an op ``y = f(x)`` with Jacobian ``J = ∂f/∂x`` the backward returns
``ḡ_x = Jᵀ ḡ_y`` and ``ġ_x = Jᵀ ġ_y + (∂²f[ẋ])ᵀ ḡ_y``: the second term is what distinguishes the
exact Hessian from the Gauss-Newton product, where ``ḡ`` is ``None`` and the term is dropped.

Arguments arrive in the op schema's positional order (kwargs folded in, defaults filled), so a rule
indexes ``call.args[i]`` and returns cotangent tuples of the same length, with ``None`` wherever
an argument is not active. List arguments (``cat``) get lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class Call:
    """One node's evaluation: primal args, which of them are active, and their tangents.

    ``args`` holds primal values in schema order; ``active[i]`` is True (or a list of bools for a
    list argument) where the argument depends on the differentiated parameters; ``tangents`` mirrors
    ``args`` with ``[K, *shape]`` tensors or ``None``. ``k`` is the number of tangent vectors; 0 in a
    gradient-only run (all tangents ``None``). ``unread`` holds the indices of active arguments
    whose primal cotangent ``ḡ`` nobody reads — the differentiated parameters when the gradient
    is not returned (an HVP without ``return_grad``, a residual product): a rule may return
    ``None`` for their ``ḡ`` and skip its work; their ``ġ`` is read.
    """

    op: Any
    args: tuple
    active: tuple
    tangents: tuple
    k: int
    unread: frozenset = frozenset()

    def is_active(self, i: int) -> bool:
        a = self.active[i]
        return any(a) if isinstance(a, list) else bool(a)

    def gbar_read(self, first: int, *rest: int) -> bool:
        """Whether a rule must compute the primal cotangents ``ḡ`` of the arguments ``first``
        and ``rest``, which it computes together (a weight and its bias): ``False`` when
        ``first`` is :attr:`unread` and each of ``rest`` is unread or inactive."""
        return first not in self.unread or any(
            i not in self.unread and self.is_active(i) for i in rest
        )


#: Default ``(rtol, atol)`` against the float64 oracle, per dtype, of a plain-torch rule.
TORCH_TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


class Rule:
    """Base class: one implementation of one op family's forward-over-reverse rule.

    Subclasses set ``ops`` (the aten overloads they handle) and implement :meth:`fwd_jvp` and
    :meth:`bwd_jvp`. The same object that ran ``fwd_jvp`` for a node runs its ``bwd_jvp``.

    Declarations read by the dispatch (:mod:`hessfast.backends`):

    - ``backend``: ``"torch"`` (the plain-torch reference, the default), ``"triton"`` or ``"cuda"``;
    - ``devices`` / ``dtypes``: the device types and dtypes taken (``None``: any);
    - ``tolerances``: ``{dtype: (rtol, atol)}`` promised against the float64 oracle;
    - :meth:`unavailable`: why the implementation cannot run in this process at all (``None``: it
      can), e.g. an extension that was not built;
    - :meth:`not_supported_reasons`: why it declines this call (empty: it takes it). Plain-torch
      rules usually override :meth:`declines` (one reason or ``None``) instead; when the torch
      reference declines, the engine uses the ``torch.func`` fallback;
    - :meth:`auto_reasons`: why automatic dispatch skips a call the implementation could run.
    """

    ops: tuple = ()
    name: str = "rule"
    backend: str = "torch"
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    tolerances: dict = TORCH_TOLERANCES

    def unavailable(self) -> str | None:
        return None

    def interpretable(self) -> bool:
        """Whether this implementation can run CPU tensors through Triton's interpreter."""
        return False

    def declines(self, call: Call) -> str | None:
        return None

    def not_supported_reasons(self, call: Call) -> list[str]:
        why = self.declines(call)
        return [why] if why else []

    def auto_reasons(self, call: Call) -> list[str]:
        """Why automatic dispatch should pass this call on to the next implementation although
        this one could run it (e.g. a library kernel is faster there); explicit requests ignore
        these."""
        return []

    def fwd_jvp(self, call: Call) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def bwd_jvp(self, res: Any, g: Any, gdot: Any) -> tuple[tuple, tuple]:
        raise NotImplementedError


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where ``None`` is zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def mul(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a * b`` where ``None`` is zero."""
    if a is None or b is None:
        return None
    return a * b


def lift(t: Tensor | None, out_ndim: int) -> Tensor | None:
    """View a tangent ``[K, *s]`` as ``[K, 1, ..., 1, *s]`` so that it broadcasts, right-aligned,
    against a primal result of ``out_ndim`` dimensions (the K axis stays leading)."""
    if t is None:
        return None
    missing = out_ndim - (t.dim() - 1)
    if missing <= 0:
        return t
    return t.reshape(t.shape[0], *([1] * missing), *t.shape[1:])


def sum_to(g: Tensor | None, shape: Sequence[int], batched: bool) -> Tensor | None:
    """Reduce a (possibly broadcast) cotangent to ``shape``; with ``batched`` the leading K axis of
    ``g`` is kept and ``shape`` excludes it. This is the adjoint of broadcasting."""
    if g is None:
        return None
    shape = tuple(shape)
    lead = 1 if batched else 0
    extra = g.dim() - lead - len(shape)
    if extra > 0:
        g = g.sum(dim=tuple(range(lead, lead + extra)))
    dims = tuple(lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g


def nones(n: int) -> tuple:
    return (None,) * n


def stack_k(g: Tensor | None, gdot: Tensor | None) -> tuple[Tensor | None, int]:
    """Stack the primal cotangent on top of its K tangents, ``[1 + K, ...]``, so linear maps apply
    to both in one call. Returns the stacked tensor and how many leading rows belong to ``g``."""
    if g is None:
        return gdot, 0
    if gdot is None:
        return g.unsqueeze(0), 1
    return torch.cat([g.unsqueeze(0), gdot], dim=0), 1


def unstack_k(s: Tensor | None, n_g: int) -> tuple[Tensor | None, Tensor | None]:
    """Inverse of :func:`stack_k`."""
    if s is None:
        return None, None
    if n_g == 0:
        return None, s
    g = s[0]
    gdot = s[1:] if s.shape[0] > 1 else None
    return g, gdot


def invoke(op: Any, args: Sequence[Any]) -> Any:
    """Call an aten overload with schema-ordered ``args``, passing keyword-only ones by name."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return op(*args)
    pos, kw = [], {}
    for a, value in zip(schema.arguments, args):
        if a.kwarg_only:
            kw[a.name] = value
        else:
            pos.append(value)
    return op(*pos, **kw)


def normalize_args(op: Any, args: Sequence[Any], kwargs: dict) -> tuple:
    """Fold ``kwargs`` into schema order and fill defaults, so rules index arguments by position."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        if kwargs:
            raise TypeError(f"cannot normalise keyword arguments of {op}")
        return tuple(args)
    out = list(args)
    for a in schema.arguments[len(args) :]:
        if a.name in kwargs:
            out.append(kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise TypeError(f"{op}: missing argument {a.name!r}")
    return tuple(out)
