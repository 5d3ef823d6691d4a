"""The ``torch.func`` fallback: a correct rule for any differentiable aten op, slow but general.

For an op ``y = f(x₁, …, xₙ)`` restricted to its active tensor arguments:

- ``fwd_jvp``: ``y = f(x)`` and ``ẏ = vmap_K(jvp(f, x, ẋ))`` — one forward-mode pass, vmapped over
  the K tangents;
- ``bwd_jvp``: with ``h(x, c) = vjp(f, x)(c)`` (linear in ``c``),
  ``(ḡ_x, ġ_x) = vmap_K(jvp(h, (x, ḡ_y), (ẋ, ġ_y)))``, i.e. ``ġ_x = Jᵀ ġ_y + (∂²f[ẋ])ᵀ ḡ_y``;
  in GGN mode (``ḡ_y`` absent) just ``ġ_x = vmap_K(vjp(f, x))(ġ_y)``.

Ops known to be affine in their tensor arguments (views, reshapes, cat, sums, ...) skip the
second-order term and apply one vmapped VJP to ``[ḡ; ġ]`` stacked.

When an op has no forward-mode derivative (``jvp`` raises ``NotImplementedError``), the same
quantities come from autograd instead: ``ẏ`` by the double-VJP trick (``ẏ = ∂(Jᵀu)/∂u · ẋ``) and
``ġ_x`` by double backward (``Jᵀ ġ + ∇_x⟨Jᵀ ḡ, ẋ⟩``), one vector at a time.

Never ``jacrev`` inside ``jvp`` (docs/architecture.md §9): ``jvp`` of ``vjp`` is the composition that agrees with
double backward to round-off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from .base import Call, Rule, invoke

aten = torch.ops.aten

#: aten packets that are affine in their tensor arguments jointly: no second-order term.
AFFINE_PACKETS = {
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.expand,
    aten.expand_as,
    aten.slice,
    aten.select,
    aten.narrow,
    aten.cat,
    aten.stack,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.unbind,
    aten.squeeze,
    aten.unsqueeze,
    aten.flatten,
    aten.unflatten,
    aten.movedim,
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten._to_copy,
    aten.to,
    aten.type_as,
    aten.add,
    aten.sub,
    aten.neg,
    aten.sum,
    aten.mean,
    aten.index_select,
    aten.gather,
    aten.index,
    aten.repeat,
    aten.repeat_interleave,
    aten.roll,
    aten.flip,
    aten.tril,
    aten.triu,
    aten.diagonal,
    aten.constant_pad_nd,
    aten.pad,
    aten.where,
    aten.masked_fill,
    aten.cumsum,
    aten.dropout,
}


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class FuncFallback(Rule):
    """``torch.func`` forward-over-reverse for one op, vmapped over the K tangents."""

    name = "torch.func fallback"

    def __init__(self, op: Any):
        self.op = op
        self.affine = getattr(op, "overloadpacket", None) in AFFINE_PACKETS
        # A custom op (outside aten/prims) is differentiated by autograd only: torch.func's
        # forward mode through a custom op registered with register_autograd and no jvp formula
        # returns a zero tangent without an error on torch 2.14 (measured: hessfast_test::cube in
        # tests/test_custom_ops.py), where reverse mode through the registered formula is exact.
        name = getattr(getattr(op, "_schema", None), "name", "aten::")
        self.custom = name.split("::")[0] not in ("aten", "prims")

    def _closure(self, call: Call):
        """Return ``f(*active_leaves) -> tuple(float outputs)``, the leaves, their tangents, and
        the output layout needed to map cotangents back."""
        leaves, tangents, slots = [], [], []
        for i, a in enumerate(call.args):
            act = call.active[i]
            if isinstance(a, (list, tuple)) and isinstance(act, list):
                for j, (x, aj) in enumerate(zip(a, act)):
                    if aj:
                        slots.append((i, j))
                        leaves.append(x)
                        tangents.append(call.tangents[i][j] if call.tangents[i] else None)
            elif act:
                slots.append((i, None))
                leaves.append(a)
                tangents.append(call.tangents[i])
        op, base = self.op, call.args

        def build(xs):
            args = [list(a) if isinstance(a, (list, tuple)) else a for a in base]
            for (i, j), x in zip(slots, xs):
                if j is None:
                    args[i] = x
                else:
                    args[i][j] = x
            return args

        def f(*xs):
            out = invoke(op, build(xs))
            if isinstance(out, (tuple, list)):
                return tuple(o for o in out if _is_float(o))
            return (out,)

        return f, leaves, tangents, slots

    def fwd_jvp(self, call: Call):
        f, leaves, tangents, slots = self._closure(call)
        y = invoke(self.op, call.args)
        multi = isinstance(y, (tuple, list))
        outs = list(y) if multi else [y]
        float_idx = [i for i, o in enumerate(outs) if _is_float(o)]
        ydot = None
        if call.k > 0:
            tans = tuple(t for t in tangents)
            try:
                if self.custom:
                    raise NotImplementedError("custom op: autograd only")
                fd = vmap(lambda *ts: jvp(f, tuple(leaves), ts)[1])(*tans)
            except (NotImplementedError, RuntimeError) as e:
                if not _needs_autograd(e):
                    raise
                fd = _autograd_jvp(f, leaves, tans, call.k)
            if multi:
                full = [None] * len(outs)
                for i, t in zip(float_idx, fd):
                    full[i] = t
                ydot = tuple(full)
            else:
                ydot = fd[0]
        res = (f, leaves, tangents, slots, call, multi, float_idx, outs)
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        f, leaves, tangents, slots, call, multi, float_idx, outs = res
        k = call.k

        def cots(c, batched):
            if not multi:
                return (c,) if c is not None else None
            if c is None:
                return None
            items = []
            for i in float_idx:
                ci = c[i]
                if ci is None:
                    ref = outs[i]
                    ci = ref.new_zeros((k, *ref.shape) if batched else ref.shape)
                items.append(ci)
            return tuple(items)

        gc = cots(g, False)
        gdc = cots(gdot, True)
        leaves_t = tuple(leaves)
        gx = gdx = None
        if gc is None and gdc is None:
            return self._scatter(call, slots, None, None)
        if self.affine or gc is None or k == 0:
            try:
                if self.custom:
                    raise NotImplementedError("custom op: autograd only")
                _, pull = vjp(f, *leaves_t)
                if gc is not None:
                    gx = pull(gc)
                if gdc is not None:
                    gdx = vmap(pull)(gdc)
            except (NotImplementedError, RuntimeError) as e:
                if not _needs_autograd(e):
                    raise
                gx, gdx = _autograd_vjps(f, leaves, gc, gdc)
        else:
            if gdc is None:
                gdc = tuple(c.new_zeros((k, *c.shape)) for c in gc)

            def h(xs, c):
                return vjp(f, *xs)[1](c)

            def one(ts, cd):
                return jvp(h, (leaves_t, gc), (ts, cd))

            try:
                if self.custom:
                    raise NotImplementedError("custom op: autograd only")
                gx, gdx = vmap(one, out_dims=(None, 0))(tuple(tangents), gdc)
            except (NotImplementedError, RuntimeError) as e:
                if not _needs_autograd(e):
                    raise
                gx, gdx = _autograd_bwd(f, leaves, tangents, gc, gdc, k)
        return self._scatter(call, slots, gx, gdx)

    @staticmethod
    def _scatter(call: Call, slots, gx, gdx):
        n = len(call.args)
        gbar: list = [None] * n
        gdot: list = [None] * n
        for idx, (i, j) in enumerate(slots):
            for src, dst in ((gx, gbar), (gdx, gdot)):
                if src is None:
                    continue
                if j is None:
                    dst[i] = src[idx]
                else:
                    if dst[i] is None:
                        dst[i] = [None] * len(call.args[i])
                    dst[i][j] = src[idx]
        return tuple(gbar), tuple(gdot)


def _needs_autograd(e: BaseException) -> bool:
    """Whether ``torch.func`` failed because the op cannot be transformed (no forward-mode
    formula; a custom ``autograd.Function`` without ``setup_context``, as custom ops registered
    with an autograd formula often are), so that plain autograd can still differentiate it."""
    if isinstance(e, NotImplementedError):
        return True
    msg = str(e)
    return "functorch" in msg or "setup_context" in msg or "forward AD" in msg


def _autograd_vjps(f, leaves, gc, gdc):
    """``(Jᵀ ḡ, [Jᵀ ġ_k]_k)`` by autograd (either may be ``None``): the first-order cotangents of
    an op ``torch.func`` cannot transform."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        ys = f(*xs)

        def pull(c, retain):
            got = torch.autograd.grad(ys, xs, c, retain_graph=retain, allow_unused=True)
            return tuple(torch.zeros_like(x) if v is None else v for v, x in zip(got, xs))

        k = 0 if gdc is None else gdc[0].shape[0]
        gx = pull(gc, retain=k > 0) if gc is not None else None
        gdx = None
        if k:
            rows = [pull(tuple(c[i] for c in gdc), retain=i < k - 1) for i in range(k)]
            gdx = tuple(torch.stack(r) for r in zip(*rows))
    return gx, gdx


def _autograd_jvp(f, leaves, tangents, k):
    """``J ẋ`` by the double-VJP trick, for ops without a forward-mode derivative."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        ys = f(*xs)
        us = [torch.zeros_like(y, requires_grad=True) for y in ys]
        vj = torch.autograd.grad(ys, xs, us, create_graph=True, allow_unused=True)
        pairs = [(v, t) for v, t in zip(vj, tangents) if v is not None]
        outs = [[] for _ in ys]
        for i in range(k):
            jv = torch.autograd.grad(
                [v for v, _ in pairs],
                us,
                [t[i] for _, t in pairs],
                retain_graph=True,
                allow_unused=True,
            )
            for o, j, y in zip(outs, jv, ys):
                o.append(torch.zeros_like(y) if j is None else j.detach())
    return tuple(torch.stack(o) for o in outs)


def _autograd_bwd(f, leaves, tangents, gc, gdc, k):
    """``(Jᵀ ḡ, Jᵀ ġ + ∇_x⟨Jᵀ ḡ, ẋ⟩)`` by double backward, one tangent at a time."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        ys = f(*xs)
        vj = torch.autograd.grad(ys, xs, gc, create_graph=True, allow_unused=True)
        gx = tuple(torch.zeros_like(x) if v is None else v.detach() for v, x in zip(vj, xs))
        rows = [[] for _ in xs]
        for i in range(k):
            first = torch.autograd.grad(
                ys, xs, [c[i] for c in gdc], retain_graph=True, allow_unused=True
            )
            terms = [
                (v * t[i]).sum() for v, t in zip(vj, tangents) if v is not None and v.requires_grad
            ]
            second = (
                torch.autograd.grad(sum(terms), xs, retain_graph=True, allow_unused=True)
                if terms
                else [None] * len(xs)
            )
            for r, a, b, x in zip(rows, first, second, xs):
                tot = torch.zeros_like(x)
                for part in (a, b):
                    if part is not None:
                        tot = tot + part.detach()
                r.append(tot)
    return gx, tuple(torch.stack(r) for r in rows)
