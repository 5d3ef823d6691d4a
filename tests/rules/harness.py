"""Check one rule on one op call against autograd, in every mode the engine uses.

For ``y = op(*args)`` with active arguments ``x`` (float64):

- forward: ``y`` against ``op(*args)``; ``ẏ`` against ``torch.func.jvp`` vmapped over K;
- backward (hvp mode): ``ḡ_x = Jᵀ ḡ`` by one VJP and ``ġ_x = Jᵀ ġ + ∇_x⟨ḡ, J ẋ⟩`` by double backward;
- GGN mode (``ḡ`` absent): ``ġ_x = Jᵀ ġ``;
- gradient mode (K = 0, no tangents): ``ḡ_x`` only;
- hvp with ``ġ`` absent (a loss with zero Hessian, e.g. NLL): the second-order term alone.

Cases are data: ``(op, args, active)`` with ``active`` a tuple of bools (or lists for list args).
"""

from __future__ import annotations

import torch
from torch.func import jvp, vmap

from hessfast.rules import registered_rule
from hessfast.rules.base import Call, invoke


def _leaves(args, active):
    out = []
    for i, act in enumerate(active):
        if isinstance(act, list):
            out += [(i, j) for j, aj in enumerate(act) if aj]
        elif act:
            out.append((i, None))
    return out


def _get(args, slot):
    i, j = slot
    return args[i] if j is None else args[i][j]


def _build(args, slots, xs):
    new = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
    for (i, j), x in zip(slots, xs):
        if j is None:
            new[i] = x
        else:
            new[i][j] = x
    return new


def _floats(y):
    if isinstance(y, (tuple, list)):
        return [t if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in y]
    return [y]


def _close(a, b, what, rtol, atol):
    if b is None:
        assert a is None or torch.count_nonzero(a) == 0, f"{what}: expected zero, got values"
        return
    if a is None:
        assert torch.count_nonzero(b) == 0, (
            f"{what}: rule returned None where the oracle is nonzero"
        )
        return
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_rule(
    op,
    args,
    active,
    k=3,
    seed=0,
    rtol=1e-10,
    atol=1e-10,
    modes=("hvp", "hvp-second-order-only", "ggn", "grad"),
    reference=None,
    unread=None,
):
    """Run the registered rule for ``op`` on ``args`` and compare with autograd (see module doc).

    ``reference(op, args)`` replaces ``invoke`` as the oracle's function where the rule's
    semantics differ from the op's forward-mode derivative (an embedding's padding row is
    constant on both sides, as in torch's gradient). ``unread`` (argument indices) adds a mode
    ``"hvp-unread"``: an HVP whose call says nobody reads those arguments' primal cotangents
    (:attr:`hessfast.rules.base.Call.unread`); the rule must return ``None`` for them and
    everything else as in ``"hvp"``."""
    if unread is not None:
        modes = (*modes, "hvp-unread")
    gen = torch.Generator().manual_seed(seed)
    rule = registered_rule(op)
    assert rule is not None, f"no rule registered for {op}"
    slots = _leaves(args, active)
    xs = [_get(args, s) for s in slots]

    def f(*zs):
        return (reference or invoke)(op, _build(args, slots, zs))

    y_ref = f(*xs)
    multi = isinstance(y_ref, (tuple, list))
    outs = _floats(y_ref)

    def rnd(shape):
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)

    tans = [rnd((k, *x.shape)) for x in xs]
    gbar = [rnd(o.shape) if o is not None else None for o in outs]
    gdot = [rnd((k, *o.shape)) if o is not None else None for o in outs]

    def tangents_struct(kk):
        t = [None] * len(args)
        for (i, j), tv in zip(slots, tans):
            if j is None:
                t[i] = tv if kk else None
            else:
                if t[i] is None:
                    t[i] = [None] * len(args[i])
                t[i][j] = tv if kk else None
        return tuple(t)

    for mode in modes:
        kk = 0 if mode == "grad" else k
        skipped = frozenset(unread) if mode == "hvp-unread" else frozenset()
        call = Call(op, tuple(args), tuple(active), tangents_struct(kk), kk, skipped)
        assert rule.declines(call) is None, f"{rule.name} declines: {rule.declines(call)}"
        y, ydot, res = rule.fwd_jvp(call)
        for a, b in zip(_floats(y), outs):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        if kk:
            ref = vmap(
                lambda *ts: jvp(
                    lambda *zs: tuple(o for o in _floats(f(*zs)) if o is not None), tuple(xs), ts
                )[1]
            )(*tans)
            got = list(ydot) if multi else [ydot]
            got = [g for g, o in zip(got, outs) if o is not None]
            for a, b in zip(got, ref):
                _close(a, b, f"{mode} forward tangent", rtol, atol)
        g_in = None if mode == "ggn" else (tuple(gbar) if multi else gbar[0])
        gd_in = (
            None
            if mode in ("grad", "hvp-second-order-only")
            else (tuple(gdot) if multi else gdot[0])
        )
        gx, gdx = rule.bwd_jvp(res, g_in, gd_in)
        # oracle by autograd
        xr = [x.detach().clone().requires_grad_(True) for x in xs]
        with torch.enable_grad():
            yo = [o for o, ref in zip(_floats(f(*xr)), outs) if ref is not None]
            gb = [g for g, ref in zip(gbar, outs) if ref is not None]
            vj = torch.autograd.grad(yo, xr, gb, create_graph=True, allow_unused=True)
            for idx, s in enumerate(slots):
                got_g = gx[s[0]] if s[1] is None else (gx[s[0]] or [None] * 99)[s[1]]
                if s[0] in skipped:
                    assert got_g is None, f"{mode}: arg {s}'s unread primal cotangent computed"
                elif mode != "ggn":
                    _close(
                        got_g,
                        vj[idx].detach() if vj[idx] is not None else None,
                        f"{mode} cotangent of arg {s}",
                        rtol,
                        atol,
                    )
            if mode == "grad":
                continue
            gds = [g for g, ref in zip(gdot, outs) if ref is not None]
            for kidx in range(k):
                first = [None] * len(xr)
                if gd_in is not None:
                    first = torch.autograd.grad(
                        yo, xr, [g[kidx] for g in gds], retain_graph=True, allow_unused=True
                    )
                second = [None] * len(xr)
                if mode.startswith("hvp"):
                    terms = [
                        (v * t[kidx]).sum()
                        for v, t in zip(vj, tans)
                        if v is not None and v.requires_grad
                    ]
                    if terms:
                        second = torch.autograd.grad(
                            sum(terms), xr, retain_graph=True, allow_unused=True
                        )
                for idx, s in enumerate(slots):
                    want = None
                    for part in (first[idx], second[idx]):
                        if part is not None:
                            want = part.detach() if want is None else want + part.detach()
                    got = gdx[s[0]] if s[1] is None else (gdx[s[0]] or [None] * 99)[s[1]]
                    _close(
                        got[kidx] if got is not None else None,
                        want,
                        f"{mode} cotangent tangent of arg {s}, vector {kidx}",
                        rtol,
                        atol,
                    )


def model_vectors(model, k, seed=1):
    """``k`` random tangent vectors per parameter, ``{name: [k, *shape]}``."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


def check_model_end_to_end(model, inputs, y, compile, reference=None, k=3, tol=1e-10):
    """``hessfast.hvp``, ``ggn_vp`` and ``grad`` of ``cross_entropy(model(*inputs), y)`` against
    double backward, the jvp/vjp GGN oracle and autograd in float64. ``reference``: a twin
    computing the same function that the oracles differentiate instead (default: ``model``)."""
    import torch.nn.functional as F
    from oracle import double_backward_hvp, ggn_vp, rel_err

    import hessfast

    ref = model if reference is None else reference
    lf = F.cross_entropy
    v = model_vectors(model, k)
    got = hessfast.hvp(model, lf, inputs, y, v, compile=compile)
    assert rel_err(got, double_backward_hvp(ref, lf, inputs, y, v)) < tol
    gv = hessfast.ggn_vp(model, lf, inputs, y, v, compile=compile)
    assert rel_err(gv, ggn_vp(ref, lf, inputs, y, v)) < tol
    g = hessfast.grad(model, lf, inputs, y, compile=compile)
    ref.zero_grad()
    lf(ref(*inputs), y).backward()
    assert rel_err(g, {n: p.grad for n, p in ref.named_parameters()}) < tol
