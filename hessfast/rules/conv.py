"""Convolutions: ``aten.conv1d/conv2d/conv3d`` and non-transposed ``aten.convolution``.

Index conventions: ``x [N, C, *S]`` (``S`` the ``d`` spatial sizes; an unbatched ``x [C, *S]`` is
given a batch of one), ``W [O, C/G, *R]`` with ``G`` groups, ``b [O]``, ``y [N, O, *T]``; tangents
and cotangent tangents carry a leading ``K``. Write ``conv(x, W)`` for the cross-correlation with
the call's stride, padding, dilation and groups, and, for a cotangent ``g [N, O, *T]``,

- ``dgrad(g, W) = conv_xᵀ g`` (``[N, C, *S]``), the adjoint of ``x ↦ conv(x, W)``;
- ``wgrad(g, x) = conv_Wᵀ g`` (``[O, C/G, *R]``), the adjoint of ``W ↦ conv(x, W)``.

``y = conv(x, W) + b`` is bilinear in ``(x, W)``, so

- forward tangent: ``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``;
- cotangents: ``ḡ_x = dgrad(ḡ, W)``, ``ḡ_W = wgrad(ḡ, x)``, ``ḡ_b = Σ_{N,T} ḡ``;
- their tangents: ``ġ_x = dgrad(ġ, W) + dgrad(ḡ, Ẇ)``, ``ġ_W = wgrad(ġ, x) + wgrad(ḡ, ẋ)``,
  ``ġ_b = Σ_{N,T} ġ``. The ``ḡ`` terms are the second-order terms (dropped in GGN mode, where
  ``ḡ`` is absent; kept when ``ġ`` is absent but ``ḡ`` is not).

Batching over K (each product is one convolution call whatever K is, groups included):

- ``conv(ẋ, W)``: K folded into the batch, ``ẋ [K·N, C, *S]``;
- ``conv(x, Ẇ)``: K folded into the output channels, within each group: ``Ẇ`` laid out as
  ``[G, K, O/G, C/G, *R]`` gives ``[N, G·K·O/G, *T]``;
- the gradient alone (no ``ġ``): one ``convolution_backward`` with the combined output mask,
  autograd's call;
- ``dgrad`` of ``ḡ`` and ``ġ`` stacked (``[1+K]``) and folded into the batch;
- ``wgrad`` of ``ḡ`` and ``ġ`` stacked and folded into the output channels (laid out per group as
  above), giving ``[G·(1+K)·O/G, C/G, *R]``;
- ``dgrad(ḡ, Ẇ)``: K folded into the input channels: the convolution of ``[N, G·K·C/G, *S]`` with
  the weight ``Ẇ`` laid out as ``[O, K·C/G, *R]`` is ``Σ_k conv(·_k, Ẇ_k)``, whose ``dgrad`` of ``ḡ``
  holds ``dgrad(ḡ, Ẇ_k)`` in its k-th channel block (of each group);
- ``wgrad(ḡ, ẋ)``: the same convolution seen as a function of its weight: ``wgrad`` of ``ḡ`` with
  ``ẋ`` laid out as ``[N, G·K·C/G, *S]`` is ``[O, K·C/G, *R]``, block k being ``wgrad(ḡ, ẋ_k)``;
  both from one ``convolution_backward`` call.

Inputs that only lend their size to a ``convolution_backward`` call are uninitialised tensors
(``new_empty``), never ``expand``-ed dummies (which a backend may copy into dense tensors).
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, stack_k, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


def _expand(v, d: int) -> list[int]:
    """An int or a length-1/length-d list as a length-``d`` list of ints."""
    if isinstance(v, int):
        return [v] * d
    v = [int(a) for a in v]
    return v * d if len(v) == 1 else v


def _conv(x: Tensor, w: Tensor, b: Tensor | None, p: tuple) -> Tensor:
    stride, padding, dilation, groups = p
    d = w.dim() - 2
    return aten.convolution(x, w, b, stride, padding, dilation, False, [0] * d, groups)


def _bwd(g: Tensor, x: Tensor, w: Tensor, bias_size, p: tuple, mask) -> tuple:
    """``aten.convolution_backward`` (autograd's kernel) of ``g`` for input ``x`` and weight ``w``:
    ``(dgrad(g, W), wgrad(g, x), Σ g)`` for the entries of ``mask``, ``None`` for the others."""
    stride, padding, dilation, groups = p
    d = w.dim() - 2
    out = aten.convolution_backward(
        g, x, w, bias_size, stride, padding, dilation, False, [0] * d, groups, list(mask)
    )
    return tuple(o if m else None for o, m in zip(out, mask))


def _dgrad(g: Tensor, w: Tensor, x_size, p: tuple) -> Tensor:
    """``conv_xᵀ g`` for an input of size ``x_size``: only the input's size matters, so an
    uninitialised tensor of that size stands in for it (an ``expand``-ed dummy would be densified
    inside a backend)."""
    return _bwd(g, g.new_empty(x_size), w, None, p, (True, False, False))[0]


def _wgrad(g: Tensor, x: Tensor, w_size, p: tuple) -> Tensor:
    """``conv_Wᵀ g`` for a weight of size ``w_size`` (an uninitialised stand-in, see
    :func:`_dgrad`)."""
    return _bwd(g, x, g.new_empty(w_size), None, p, (False, True, False))[1]


def _in_groups(t: Tensor, groups: int) -> Tensor:
    """``[M, N, C, *S] -> [N, G·M·C/G, *S]``: M folded into the channels within each group."""
    m, n, c = t.shape[:3]
    rest = tuple(t.shape[3:])
    t5 = t.reshape(m, n, groups, c // groups, *rest)  # [M, N, G, C/G, *S]
    t5 = t5.permute(1, 2, 0, *range(3, t5.dim()))  # [N, G, M, C/G, *S]
    return t5.reshape(n, m * c, *rest)


def _out_groups(t: Tensor, m: int, groups: int) -> Tensor:
    """Inverse of :func:`_in_groups`: ``[N, G·M·C/G, *S] -> [M, N, C, *S]``."""
    n, mc = t.shape[:2]
    rest = tuple(t.shape[2:])
    c = mc // m
    t5 = t.reshape(n, groups, m, c // groups, *rest)  # [N, G, M, C/G, *S]
    t5 = t5.permute(2, 0, 1, *range(3, t5.dim()))  # [M, N, G, C/G, *S]
    return t5.reshape(m, n, c, *rest)


def _w_stacked_out(tw: Tensor, groups: int) -> Tensor:
    """``[M, O, C/G, *R] -> [G·M·O/G, C/G, *R]``: M folded into output channels per group."""
    m, o = tw.shape[:2]
    rest = tw.shape[2:]
    tw = tw.reshape(m, groups, o // groups, *rest).transpose(0, 1)
    return tw.reshape(m * o, *rest)


def _w_unstack_out(w: Tensor, m: int, groups: int) -> Tensor:
    """Inverse of :func:`_w_stacked_out`: ``[G·M·O/G, C/G, *R] -> [M, O, C/G, *R]``."""
    mo = w.shape[0]
    rest = w.shape[1:]
    o = mo // m
    w = w.reshape(groups, m, o // groups, *rest).transpose(0, 1)
    return w.reshape(m, o, *rest)


def conv_fwd_jvp_ref(x, w, b, tx, tw, tb, stride, padding, dilation, groups):
    """``y = conv(x, W) + b`` and ``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``, batched over K.

    ``x [N, C, *S]``, ``W [O, C/G, *R]``, ``b [O]`` or ``None``; ``tx [K, N, C, *S]``,
    ``tw [K, O, C/G, *R]``, ``tb [K, O]``, any of them ``None`` (zero). Returns ``(y, ẏ)`` with
    ``ẏ [K, N, O, *T]`` or ``None``.
    """
    p = (stride, padding, dilation, groups)
    y = _conv(x, w, b, p)
    ydot = None
    if tx is not None:
        k = tx.shape[0]
        ydot = _conv(tx.reshape(k * x.shape[0], *x.shape[1:]), w, None, p)
        ydot = ydot.reshape(k, *y.shape)
    if tw is not None:
        k = tw.shape[0]
        xw = _conv(x, _w_stacked_out(tw, groups), None, p)  # [N, G·K·O/G, *T]
        ydot = add(ydot, _out_groups(xw, k, groups))
    if tb is not None:
        k = tb.shape[0]
        tb = tb.reshape(k, 1, -1, *([1] * (y.dim() - 2)))
        ydot = add(ydot, tb.expand(k, *y.shape))
    return y, ydot


def conv_bwd_jvp_ref(
    x,
    w,
    tx,
    tw,
    g,
    gdot,
    stride,
    padding,
    dilation,
    groups,
    need_x,
    need_w,
    need_b,
    gbar_wb=True,
):
    """Cotangents ``(ḡ, ġ)`` of ``x``, ``W`` and ``b`` (see the module docstring).

    ``g [N, O, *T]`` or ``None`` (GGN mode), ``gdot [K, N, O, *T]`` or ``None``; ``x``, ``W``,
    ``tx``, ``tw`` as in :func:`conv_fwd_jvp_ref`. Returns ``((ḡ_x, ḡ_W, ḡ_b), (ġ_x, ġ_W, ġ_b))``;
    with ``gbar_wb=False`` (nobody reads the primal weight and bias cotangents: an HVP that
    returns no gradient) ``ḡ_W`` and ``ḡ_b`` are ``None`` and the ``wgrad`` call and the bias sum
    run on ``ġ`` alone, K rows instead of 1 + K.

    Calls: the gradient alone (no ``ġ``) is autograd's single ``convolution_backward`` with the
    combined output mask; with ``ġ``, ``ḡ`` and ``ġ`` are stacked into one ``dgrad`` and one
    ``wgrad`` call; the two second-order terms share one ``convolution_backward`` call.
    """
    p = (stride, padding, dilation, groups)
    gx = gw = gb = gdx = gdw = gdb = None
    if gdot is None:
        mask = (bool(need_x), bool(need_w) and gbar_wb, bool(need_b) and gbar_wb)
        if g is not None and any(mask):
            gx, gw, gb = _bwd(g, x, w, [w.shape[0]] if mask[2] else None, p, mask)
    else:
        s, n_g = stack_k(g, gdot)  # [M, N, O, *T], M = n_g + K
        m = s.shape[0]
        if need_x:
            sx = _dgrad(
                s.reshape(m * s.shape[1], *s.shape[2:]), w, (m * x.shape[0], *x.shape[1:]), p
            )
            gx, gdx = unstack_k(sx.reshape(m, *x.shape), n_g)
        # the weight's and bias's: of ġ alone where nobody reads ḡ_W and ḡ_b
        sp, n_p = (s, n_g) if gbar_wb else (gdot, 0)
        mp = sp.shape[0]
        if need_w:
            sw = _wgrad(_in_groups(sp, groups), x, (mp * w.shape[0], *w.shape[1:]), p)
            gw, gdw = unstack_k(_w_unstack_out(sw, mp, groups), n_p)
        if need_b:
            gb, gdb = unstack_k(sp.sum(dim=(1, *range(3, sp.dim()))), n_p)
    want_x = bool(need_x) and tw is not None
    want_w = bool(need_w) and tx is not None
    if g is not None and (want_x or want_w):
        # Σ_k conv(·_k, Ẇ_k) on K-stacked input channels: its dgrad holds dgrad(ḡ, Ẇ_k) and its
        # wgrad at ẋ (laid out as [N, G·K·C/G, *S]) holds wgrad(ḡ, ẋ_k), block k of each group.
        k = (tw if tw is not None else tx).shape[0]
        wk_size = (w.shape[0], k * w.shape[1], *w.shape[2:])
        xk_size = (x.shape[0], k * x.shape[1], *x.shape[2:])
        wk = tw.transpose(0, 1).reshape(wk_size) if want_x else g.new_empty(wk_size)
        xk = _in_groups(tx, groups) if want_w else g.new_empty(xk_size)
        cx, cw, _ = _bwd(g, xk, wk, None, p, (want_x, want_w, False))
        if cx is not None:
            gdx = add(gdx, _out_groups(cx, k, groups))
        if cw is not None:
            gdw = add(gdw, cw.reshape(w.shape[0], k, *w.shape[1:]).transpose(0, 1))
    return (gx, gw, gb), (gdx, gdw, gdb)


class Conv(Rule):
    """``conv{1,2,3}d(x, W, b, stride, padding, dilation, groups)`` and
    ``convolution(x, W, b, stride, padding, dilation, transposed, output_padding, groups)``
    with ``transposed=False``."""

    ops = (
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.convolution.default,
    )
    name = "conv"

    @staticmethod
    def _params(call: Call):
        a = call.args
        d = a[1].dim() - 2
        groups = a[8] if call.op is aten.convolution.default else a[6]
        return _expand(a[3], d), _expand(a[4], d), _expand(a[5], d), int(groups)

    def declines(self, call: Call) -> str | None:
        a = call.args
        x, w, b = a[0], a[1], a[2]
        if not (isinstance(x, Tensor) and isinstance(w, Tensor)):
            return "conv rule needs tensor input and weight"
        if not (x.is_floating_point() and w.is_floating_point()):
            return "conv rule handles real floating-point tensors only"
        if w.dim() not in (3, 4, 5):
            return "conv rule handles 1-, 2- and 3-D convolutions only"
        d = w.dim() - 2
        if x.dim() not in (d + 1, d + 2):
            return "conv rule: input rank does not match the weight"
        if b is not None and (not isinstance(b, Tensor) or b.shape != (w.shape[0],)):
            return "conv rule needs a bias of shape [O] or None"
        if call.op is aten.convolution.default:
            if a[6]:
                return "conv rule does not handle transposed convolutions"
            if any(int(v) != 0 for v in _expand(a[7], d)):
                return "conv rule does not handle output_padding"
        if call.op is aten.convolution.default and x.dim() != d + 2:
            return "aten.convolution needs a batched input"
        if call.is_active(3) or call.is_active(4) or call.is_active(5):
            return "conv rule: only input, weight and bias can be active"
        try:
            stride, padding, dilation, groups = self._params(call)
        except (TypeError, ValueError):
            return "conv rule needs int stride, padding and dilation"
        if any(len(v) != d for v in (stride, padding, dilation)):
            return "conv rule: stride, padding or dilation has the wrong length"
        c = x.shape[-d - 1]
        if groups < 1 or c % groups or w.shape[0] % groups or w.shape[1] * groups != c:
            return "conv rule: channels do not match the groups"
        return None

    def fwd_jvp(self, call: Call):
        x, w, b = call.args[:3]
        tx, tw, tb = call.tangents[:3]
        stride, padding, dilation, groups = self._params(call)
        unbatched = x.dim() == w.dim() - 1
        if unbatched:
            x = x.unsqueeze(0)
            tx = tx.unsqueeze(1) if tx is not None else None
        active = (call.is_active(0), call.is_active(1), call.is_active(2) and b is not None)
        tx = tx if active[0] else None
        tw = tw if active[1] else None
        tb = tb if active[2] else None
        y, ydot = conv_fwd_jvp_ref(x, w, b, tx, tw, tb, stride, padding, dilation, groups)
        if unbatched:
            y = y.squeeze(0)
            ydot = ydot.squeeze(1) if ydot is not None else None
        params = (stride, padding, dilation, groups)
        gbar_wb = call.gbar_read(1, 2)  # else ḡ_W, ḡ_b unread: computed on ġ alone
        res = (x, w, tx, tw, params, active, unbatched, len(call.args), gbar_wb)
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        x, w, tx, tw, params, active, unbatched, nargs, gbar_wb = res
        if unbatched:
            g = g.unsqueeze(0) if g is not None else None
            gdot = gdot.unsqueeze(1) if gdot is not None else None
        (gx, gw, gb), (gdx, gdw, gdb) = conv_bwd_jvp_ref(
            x, w, tx, tw, g, gdot, *params, active[0], active[1], active[2], gbar_wb
        )
        if unbatched:
            gx = gx.squeeze(0) if gx is not None else None
            gdx = gdx.squeeze(1) if gdx is not None else None
        rest = (None,) * (nargs - 3)
        return (gx, gw, gb, *rest), (gdx, gdw, gdb, *rest)


RULES = [Conv()]
