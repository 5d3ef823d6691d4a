"""Softmax cross-entropy and NLL loss rules: value, gradient and Hessian-vector product at the logits.

Layout: logits ``z`` are viewed as rows ``[M, C]`` (classes last). ``[N, C]`` with targets ``[N]`` is
torch's layout; ``[B, T, C]`` with targets ``[B, T]`` (sequence models) means classes last, i.e.
``F.cross_entropy(z.flatten(0, -2), y.flatten())``; torch's own ``[N, C, d₁, …]`` with targets
``[N, d₁, …]`` is also accepted (class axis 1). When a shape fits both readings the call is
refused rather than guessed.

Math. Every variant (class weights ``w``, ``ignore_index``, label smoothing ``ε``, soft targets,
``mean``/``sum``) is ``L = −Σ_{n,c} a_{n,c} log p_{n,c}`` with ``p = softmax(z)`` row-wise and
coefficients ``a ≥ 0``:

- hard targets ``y``: ``a_{n,c} = s[(1−ε) w_{y_n} δ_{c,y_n} + (ε/C) w_c]`` on rows with
  ``y_n ≠ ignore_index`` (0 elsewhere); ``s = 1 / Σ_{valid n} w_{y_n}`` for ``mean``, 1 for ``sum``;
- soft targets ``t`` (probabilities, same shape as ``z``): ``a = s ((1−ε) t + ε/C) ⊙ w`` with
  ``s = 1/M`` for ``mean``.

With ``A_n = Σ_c a_{n,c}``: gradient ``∂L/∂z_n = A_n p_n − a_n`` and Hessian
``∂²L/∂z_n² = A_n (diag p_n − p_n p_nᵀ)``, so ``H u = A (p ⊙ u − p ⟨p, u⟩)`` row-wise.

NLL takes log-probabilities ``x`` and is linear: ``L = −Σ a_{n,c} x_{n,c}`` (hard targets, no
smoothing), gradient ``−a``, Hessian zero.

The fused model head. When the logits come from a linear layer, ``z = h Wᵀ + b``, the engine
evaluates the layer and the loss together (:class:`LinearCrossEntropy`), a chunk of rows at a time,
so that neither ``z [N, V]`` nor its tangents ``ż [K, N, V]`` exist for the whole batch. The
per-row work is the pseudo-op ``hessfast::cross_entropy_rows`` (:func:`cross_entropy_rows_ref`;
Triton and CUDA implementations declare the same op), dispatched per chunk like any rule.
"""

from __future__ import annotations

import math

import torch

from .. import subnormal
from . import rule_for
from .base import Call, Rule

Tensor = torch.Tensor
aten = torch.ops.aten


def to_rows(z: Tensor, target: Tensor, soft: bool) -> tuple[Tensor, Tensor, callable, callable]:
    """Return ``(z_rows [M, C], target_rows, rows_of, unrows)`` where ``rows_of`` maps a
    ``[*lead, *z.shape]`` tensor to ``[*lead, M, C]`` and ``unrows`` inverts it."""
    shape = tuple(z.shape)
    if z.dim() == 1:
        t = target.reshape(1, -1) if soft else target.reshape(1)
        return z[None], t, (lambda x: x.unsqueeze(-2)), (lambda x: x.squeeze(-2))
    if z.dim() == 2:
        return z, target, (lambda x: x), (lambda x: x)
    torch_layout = (
        tuple(target.shape) == shape if soft else tuple(target.shape) == (shape[0], *shape[2:])
    )
    last_layout = (not soft) and tuple(target.shape) == shape[:-1]
    if last_layout and torch_layout:
        raise ValueError(
            f"ambiguous cross-entropy layout: logits {list(shape)} with targets "
            f"{list(target.shape)} could have classes in dim 1 (torch) or last (sequence models). "
            "Flatten them yourself: loss on logits.flatten(0, -2) and targets.flatten()."
        )
    C = shape[-1] if last_layout else shape[1]
    if last_layout:
        n = len(shape)

        def rows_of(x):
            return x.reshape(*x.shape[: x.dim() - n], -1, C)

        def unrows(x):
            return x.reshape(*x.shape[:-2], *shape)

        return rows_of(z), target.reshape(-1), rows_of, unrows
    if not torch_layout:
        raise ValueError(
            f"cross-entropy: logits {list(shape)} and targets {list(target.shape)} do not match "
            "either [N, C] / [N] or [B, T, C] / [B, T] (or torch's [N, C, d...] / [N, d...])."
        )
    n = len(shape)
    moved = (shape[0], *shape[2:], shape[1])

    def rows_of(x):
        lead = x.dim() - n
        return x.movedim(lead + 1, -1).reshape(*x.shape[:lead], -1, C)

    def unrows(x):
        lead = x.dim() - 2
        return x.reshape(*x.shape[:lead], *moved).movedim(-1, lead + 1)

    t = rows_of(target) if soft else target.reshape(-1)
    return rows_of(z), t, rows_of, unrows


def coefficients(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    soft: bool,
) -> Tensor:
    """The coefficient matrix ``a [M, C]`` of the module docstring for row logits ``z [M, C]``."""
    M, C = z.shape
    eps = float(label_smoothing)
    w = weight.to(z.dtype) if weight is not None else None
    if soft:
        t = target.to(z.dtype)
        if eps:
            t = t * (1 - eps) + eps / C
        a = t * w if w is not None else t
        return a / M if reduction == "mean" else a
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    wy = w[y] if w is not None else torch.ones(M, dtype=z.dtype, device=z.device)
    wy = wy * valid.to(z.dtype)
    a = torch.zeros_like(z)
    a.scatter_(1, y[:, None], ((1 - eps) * wy)[:, None])
    if eps:
        smooth = (w if w is not None else torch.ones(C, dtype=z.dtype, device=z.device)) * (eps / C)
        a = a + valid.to(z.dtype)[:, None] * smooth
    if reduction == "mean":
        a = a / wy.sum()
    return a


def _target_weight(target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """``Σ_{valid n} w_{y_n}``: the denominator of a ``mean`` over hard targets."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum()
    y = torch.where(valid, target, torch.zeros_like(target))
    return (weight[y] * valid).sum()


class CrossEntropyLoss:
    """Softmax cross-entropy at the model output (see the module docstring for the math)."""

    name = "cross_entropy"

    def __init__(
        self, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
    ):
        self.target = target
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.soft = target.is_floating_point()

    def denominator(self) -> float | None:
        """What ``mean`` divides by (the summed weights of the counted targets, or the number of
        rows for soft targets); ``None`` for ``sum``. Datasets weight batches by it."""
        if self.reduction != "mean":
            return None
        t = self.target
        if self.soft:
            return t.numel() / (t.shape[1] if t.dim() >= 2 else t.shape[0])
        return float(_target_weight(t, self.weight, self.ignore_index))

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        """``(L, ∂L/∂z or None, ∇²_z L · ż or None)`` for the engine's ``mode``.

        Hard targets without label smoothing take autograd's kernels: ``log_softmax``,
        ``nll_loss_forward``, ``nll_loss_backward`` (which gives ``−a``) and
        ``_log_softmax_backward_data`` (``A p − a``); the Hessian product is
        ``A ⊙ _softmax_backward_data(u, p)`` with ``A = −Σ_c (−a)``. Other variants form the
        coefficient matrix ``a`` (module docstring) explicitly."""
        if zdot is not None:  # a tangent may arrive broadcastable (only a bias active)
            zdot = zdot.expand(zdot.shape[0], *z.shape)
        zr, t, rows_of, unrows = to_rows(z, self.target, self.soft)
        logp = torch.log_softmax(zr, dim=-1)
        want_g = mode in ("hvp", "grad")
        want_h = zdot is not None and mode in ("hvp", "ggn")
        if not self.soft and not self.label_smoothing:
            w = self.weight.to(zr.dtype) if self.weight is not None else None
            red = 1 if self.reduction == "mean" else 2  # at::Reduction::Mean / Sum
            tl = t.long()
            loss, total = aten.nll_loss_forward(logp, tl, w, red, self.ignore_index)
            neg_a = aten.nll_loss_backward(
                loss.new_ones(()), logp, tl, w, red, self.ignore_index, total
            )
            g = None
            if want_g:
                g = unrows(aten._log_softmax_backward_data(neg_a, logp, 1, logp.dtype))
            gd = None
            if want_h:
                A = -neg_a.sum(-1, keepdim=True)
                u = rows_of(zdot)
                p = logp.exp().expand(u.shape)
                gd = unrows(A * aten._softmax_backward_data(u, p, -1, p.dtype))
            return loss, g, gd
        a = coefficients(
            zr, t, self.weight, self.ignore_index, self.reduction, self.label_smoothing, self.soft
        )
        loss = -(a * logp).sum()
        p = logp.exp()
        A = a.sum(-1, keepdim=True)
        g = unrows(A * p - a) if want_g else None
        gd = None
        if want_h:
            u = rows_of(zdot)
            pu = p * u
            gd = unrows(A * (pu - p * pu.sum(-1, keepdim=True)))
        return loss, g, gd


ROWS_OP = "hessfast::cross_entropy_rows"


def cross_entropy_rows_ref(
    z: Tensor,
    zdot: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Softmax cross-entropy on rows of logits: loss rows, gradient and loss-Hessian products.

    The specification of the pseudo-op ``hessfast::cross_entropy_rows`` (every implementation has
    this signature, as a ``rows`` method).

    Arguments: logits ``z [M, V]``; tangents ``zdot [K, M, V]`` or ``None``; hard targets
    ``target [M]`` (integers); class weights ``weight [V]`` or ``None`` (all ones); ``ignore_index``;
    label smoothing ``ε``; ``scale`` (``1 / Σ_{valid n} w_{y_n}`` over the *whole batch* for a
    ``mean``, 1 for a ``sum``); ``want_grad``.

    With ``p_n = softmax(z_n)`` and, on rows with ``y_n ≠ ignore_index`` (all zero on the others),
    coefficients ``a_{n,c} = (1−ε) w_{y_n} δ_{c,y_n} + (ε/V) w_c``, ``A_n = Σ_c a_{n,c}``:

    - ``loss_rows [M] = −scale Σ_c a_{n,c} log p_{n,c}``, float32 (float64 for float64 logits);
    - ``gz [M, V] = scale (A_n p_n − a_n)`` (``∂L/∂z``), in ``z``'s dtype; ``None`` unless
      ``want_grad``;
    - ``gdz [K, M, V] = scale A_n (p_n ⊙ u − p_n ⟨p_n, u⟩)`` with ``u = zdot[k, n]`` (``∇²_z L · u``),
      in ``z``'s dtype; ``None`` when ``zdot`` is ``None``.

    Computed in float32 (float64 for float64 logits) whatever the input dtype.
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    V = z.shape[-1]
    logp = torch.log_softmax(z.to(acc), dim=-1)
    p = logp.exp()
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    vf = valid.to(acc)
    eps = float(label_smoothing)
    w = weight.to(device=z.device, dtype=acc) if weight is not None else None
    c_y = (1 - eps) * (w[y] * vf if w is not None else vf)  # coefficient of the target class
    c_s = (eps / V) * vf  # the smoothing coefficient, times w_c
    loss_rows = c_y * logp.gather(1, y[:, None])[:, 0]
    A = c_y
    if eps:
        loss_rows = loss_rows + c_s * (logp @ w if w is not None else logp.sum(-1))
        A = A + c_s * (w.sum() if w is not None else V)
    loss_rows = -scale * loss_rows
    gz = None
    if want_grad:
        g = p * (scale * A)[:, None]
        if eps:
            g -= (scale * c_s)[:, None] * (w if w is not None else 1.0)
        g.scatter_add_(1, y[:, None], -(scale * c_y)[:, None])
        gz = g.to(z.dtype)
    gdz = None
    if zdot is not None:
        pu = p * zdot  # in the accumulation dtype (type promotion)
        pu.addcmul_(p, pu.sum(-1, keepdim=True), value=-1.0)
        gdz = pu.mul_((scale * A)[:, None]).to(z.dtype)
    return loss_rows, gz, gdz


def rows_call(
    z: Tensor,
    zdot: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    want_grad: bool,
) -> Call:
    """The :class:`~hessfast.rules.base.Call` that the dispatch (and ``not_supported_reasons``)
    sees for one ``hessfast::cross_entropy_rows`` evaluation: the arguments in signature order."""
    args = (z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad)
    return Call(ROWS_OP, args, (), (), 0 if zdot is None else zdot.shape[0])


def rows_arg_reasons(call: Call) -> list[str]:
    """What is wrong with a ``hessfast::cross_entropy_rows`` call's arguments (empty: nothing):
    the shape, dtype and device checks every kernel implementation of the row op shares."""
    z, zdot, target, weight, _, label_smoothing = call.args[:6]
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2:
        return ["logits must be a floating-point [M, V] tensor"]
    m, v = z.shape
    out = []
    if v == 0:
        out.append("no classes (V = 0)")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        out.append(f"label_smoothing {label_smoothing} is not in [0, 1]")
    if zdot is not None and (zdot.dim() != 3 or tuple(zdot.shape[1:]) != (m, v)):
        out.append(f"tangents {list(zdot.shape)} are not [K, {m}, {v}]")
    elif zdot is not None and zdot.dtype != z.dtype:
        out.append(f"tangents in {zdot.dtype}, logits in {z.dtype}: one dtype expected")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.shape != (m,):
        out.append(f"targets must be [{m}] class indices")
    if weight is not None and tuple(weight.shape) != (v,):
        out.append(f"class weights {list(weight.shape)} are not [{v}]")
    tensors = (z, zdot, target, weight)
    devices = {t.device for t in tensors if isinstance(t, Tensor)}
    if len(devices) > 1:
        out.append(f"inputs on several devices: {sorted(map(str, devices))}")
    return out


class CrossEntropyRows(Rule):
    """``hessfast::cross_entropy_rows`` in plain torch (:func:`cross_entropy_rows_ref`): the
    reference every other implementation is tested against, and the CPU path. Not a graph op: it
    has ``rows`` instead of ``fwd_jvp`` / ``bwd_jvp``."""

    ops = (ROWS_OP,)
    name = "cross_entropy_rows"

    def rows(
        self,
        z: Tensor,
        zdot: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        scale: float,
        want_grad: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return cross_entropy_rows_ref(
            z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad
        )


#: Memory budget of one chunk of the fused head: the chunk's logits and their K tangents,
#: ``[K+1, rows, V]`` in the logits' dtype, take at most this many bytes (the row op's outputs
#: ``gz``, ``gdz`` as much again).
HEAD_CHUNK_BYTES = 256 * 2**20

#: Rows per chunk of the fused head, overriding :data:`HEAD_CHUNK_BYTES` (``None``: from the
#: budget). Tests set it to force several chunks on small models.
HEAD_CHUNK_ROWS: int | None = None


def head_chunk_rows(k: int, v: int, dtype: torch.dtype) -> int:
    """Rows per chunk for K tangents and V classes: :data:`HEAD_CHUNK_ROWS` if set, else the most
    rows whose ``[K+1, rows, V]`` fit in :data:`HEAD_CHUNK_BYTES` (at least one)."""
    if HEAD_CHUNK_ROWS is not None:
        return max(1, int(HEAD_CHUNK_ROWS))
    per_row = (k + 1) * v * dtype.itemsize
    return max(1, HEAD_CHUNK_BYTES // per_row)


def _add_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b`` (``a``, ``b`` 2-D or ``[K, ...]`` batched, ``out`` 2-D or ``[K, ...]``):
    in place when the dtypes agree, else through a temporary in the operands' dtype (half-precision
    operands accumulating into a float32 ``out``)."""
    if out.dtype != a.dtype:
        out.add_(torch.matmul(a, b))
    elif out.dim() == 2:
        out.addmm_(a, b)
    else:
        k = out.shape[0]
        out.baddbmm_(a.expand(k, *a.shape[-2:]), b.expand(k, *b.shape[-2:]))


class LinearCrossEntropy:
    """The model head ``L = CE(h Wᵀ + b, y)`` evaluated in chunks of rows (the fused head).

    Index conventions: ``h [..., D]`` (its rows ``N`` = all leading axes, in the order of the
    targets' rows), ``W [V, D]``, ``b [V]``; tangents ``[K, *shape]``. Per chunk of rows:

    - forward: ``z = h Wᵀ + b``, ``ż = ḣ Wᵀ + h Ẇᵀ + ḃ``;
    - the row op (``hessfast::cross_entropy_rows``, dispatched per chunk on ``backend``):
      ``gz = ∂L/∂z``, ``gdz = ∇²_z L · ż``, and the loss rows;
    - backward, accumulated over chunks: ``ḡ_h = gz W``, ``ḡ_W = gzᵀ h``, ``ḡ_b = Σ_rows gz``;
      ``ġ_h = gdz W + gz Ẇ``, ``ġ_W = gdzᵀ h + gzᵀ ḣ``, ``ġ_b = Σ_rows gdz``. The ``gz`` terms of
      ``ġ`` are the head's second-order terms: GGN mode (``gz`` absent) drops them.

    ``ḡ_h``, ``ġ_h`` are written per chunk (the rows are disjoint); ``ḡ_W``, ``ġ_W``, ``ḡ_b``,
    ``ġ_b`` accumulate in place (in float32 for half-precision models). Memory beyond the inputs
    and the cotangents: one chunk's ``z``, ``ż``, ``gz``, ``gdz`` (:func:`head_chunk_rows`).
    A ``mean`` divides by the counted targets of the whole batch, not of the chunk.

    GGN mode on the CPU in float32 or bfloat16 (:mod:`hessfast.subnormal`): ``ġ`` leaves the head
    scaled by ``s_k``, the power of two of :func:`~hessfast.subnormal.pow2_scale` for the largest
    ``|gdz[k]|`` of the whole batch, and :meth:`evaluate` returns ``s`` for the engine to undo at
    the parameters. The chunks come one at a time, so the scale follows the running maximum: chunk
    ``c`` multiplies its ``gdz`` by ``s`` of the maximum over chunks ``≤ c``, the accumulators
    ``ġ_W``, ``ġ_b`` are multiplied by ``s_new / s_old`` when that changes, and each chunk's rows of
    ``ġ_h`` by ``s_final / s_c`` at the end. All factors are powers of two (exact, see
    :mod:`hessfast.subnormal`), at most 1 unless a non-finite maximum resets the scale to 1.
    """

    name = "linear_cross_entropy"

    def __init__(self, loss: CrossEntropyLoss, backend: str = "auto"):
        if loss.soft:
            raise ValueError("the fused head takes hard (class-index) targets only")
        self.loss = loss
        self.backend = backend

    def scale(self, target: Tensor) -> Tensor:
        """``1 / Σ_{valid n} w_{y_n}`` for a ``mean`` (NaN when no target counts, as in torch), 1
        for a ``sum``: a 0-d tensor, so that a traced product reads the count of the batch it is
        given, never a number baked in at tracing time (no host synchronisation either). The
        targets were checked against the class count when the loss was resolved
        (:func:`hessfast.losses.validate_targets`)."""
        if self.loss.reduction != "mean":
            return torch.ones((), dtype=torch.float64, device=target.device)
        den = _target_weight(target, self.loss.weight, self.loss.ignore_index).double()
        return torch.where(den != 0, 1.0 / den, torch.full_like(den, math.nan))

    def evaluate(
        self,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        th: Tensor | None,
        tw: Tensor | None,
        tb: Tensor | None,
        active: tuple,
        mode: str,
    ) -> tuple[Tensor, tuple, tuple, Tensor | None]:
        """``(loss, (ḡ_h, ḡ_W, ḡ_b), (ġ_h, ġ_W, ġ_b), s)`` for the engine's ``mode`` (``"hvp"``,
        ``"ggn"``, ``"grad"``); ``active`` says which of ``h``, ``W``, ``b`` need cotangents, and
        ``None`` stands for a zero. ``s [K]`` (float32) is the power-of-two scale the ``ġ`` carry
        (divide the parameter products by it; class docstring), ``None`` when they carry none."""
        V, D = w.shape
        need_h, need_w, need_b = (bool(a) for a in active)
        need_b = need_b and b is not None
        h2 = h.reshape(-1, D)
        N = h2.shape[0]
        tan = next((t for t in (th, tw, tb) if t is not None), None)
        k = 0 if tan is None or mode == "grad" else tan.shape[0]
        if not k:
            th = tw = tb = None
        th2 = th.reshape(k, N, D) if th is not None else None
        lo = self.loss
        target = lo.target.reshape(-1)
        if target.numel() != N:
            raise ValueError(
                f"cross-entropy: {target.numel()} targets for {N} rows of logits {[*h.shape[:-1], V]}"
            )
        scale = self.scale(target)  # applied to each chunk's rows: they are linear in it
        want_grad = mode in ("hvp", "grad")
        acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
        gh = h2.new_empty((N, D)) if want_grad and need_h else None
        gdh = h2.new_zeros((k, N, D)) if k and need_h else None
        gw = w.new_zeros((V, D), dtype=acc) if want_grad and need_w else None
        gdw = w.new_zeros((k, V, D), dtype=acc) if k and need_w else None
        gb = w.new_zeros((V,), dtype=acc) if want_grad and need_b else None
        gdb = w.new_zeros((k, V), dtype=acc) if k and need_b else None
        total = None
        rescale = mode == "ggn" and subnormal.applies(h2)
        top = s = None  # the running max |gdz| per product, and its scale
        scales = []  # (r0, r1, s) per chunk: the scale its rows of ġ_h were computed at
        rows = head_chunk_rows(k, V, h.dtype)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            hc = h2[r0:r1]
            thc = th2[:, r0:r1] if th2 is not None else None
            z = torch.nn.functional.linear(hc, w, b)
            zd = None
            if thc is not None:
                zd = torch.matmul(thc, w.t())
            if tw is not None:
                if zd is None:
                    zd = torch.matmul(hc, tw.transpose(1, 2))
                else:
                    zd.baddbmm_(hc.expand(k, -1, -1), tw.transpose(1, 2))
            if tb is not None:
                zd = tb[:, None, :].expand(k, r1 - r0, V) if zd is None else zd.add_(tb[:, None])
            call = rows_call(
                z,
                zd,
                target[r0:r1],
                lo.weight,
                lo.ignore_index,
                lo.label_smoothing,
                1.0,
                want_grad,
            )
            impl = rule_for(ROWS_OP, call, self.backend)
            loss_rows, gz, gdz = impl.rows(*call.args)
            part = loss_rows.sum() * scale.to(loss_rows.dtype)
            gz = gz.mul_(scale.to(gz.dtype)) if gz is not None else None
            gdz = gdz.mul_(scale.to(gdz.dtype)) if gdz is not None else None
            total = part if total is None else total + part
            del z, zd
            if gdz is not None and rescale:
                m = gdz.abs().amax(dim=(1, 2)).float()
                top = m if top is None else torch.maximum(top, m)  # NaN stays NaN: s = 1
                s_new = subnormal.pow2_scale(top)
                if s is not None:  # bring the accumulators to the new scale (factors ≤ 1)
                    _rescale((gdw, gdb), s_new, s)
                s = s_new
                gdz.mul_(subnormal.per_product(s, gdz))
                scales.append((r0, r1, s))
            if gdz is not None:
                if need_h:
                    _add_matmul(gdh[:, r0:r1], gdz, w)
                if need_w:
                    _add_matmul(gdw, gdz.transpose(1, 2), hc)
                if need_b:
                    gdb += gdz.sum(1)
            if gz is not None:
                if need_h:
                    gh[r0:r1] = gz @ w
                    if tw is not None:
                        _add_matmul(gdh[:, r0:r1], gz, tw)
                if need_w:
                    _add_matmul(gw, gz.t(), hc)
                    if thc is not None:
                        _add_matmul(gdw, gz.t(), thc)
                if need_b:
                    gb += gz.sum(0)
        loss = total.to(h.dtype) if total is not None else h.new_zeros(())
        if gdh is not None:
            for r0, r1, sc in scales[:-1]:  # the last chunk's scale is s
                _rescale((gdh[:, r0:r1],), s, sc)

        def out(t, shape):
            return None if t is None else t.to(h.dtype).reshape(shape)

        return (
            loss,
            (out(gh, h.shape), out(gw, (V, D)), out(gb, (V,))),
            (out(gdh, (k, *h.shape)), out(gdw, (k, V, D)), out(gdb, (k, V))),
            s,
        )


def _rescale(ts: tuple, s_new: Tensor, s_old: Tensor) -> None:
    """Multiply each ``[K, ...]`` tensor of ``ts`` (``None``: skipped) in place by ``s_new / s_old``
    per product (powers of two; the quotient is formed in float64, where it cannot overflow)."""
    ratio = s_new.double() / s_old.double()
    for t in ts:
        if t is not None:
            t.mul_(subnormal.per_product(ratio, t))


class NLLLoss:
    """Negative log-likelihood of log-probabilities: linear, so its Hessian is zero."""

    name = "nll_loss"

    def __init__(self, target, weight=None, ignore_index=-100, reduction="mean"):
        self.target = target
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction

    def denominator(self) -> float | None:
        """What ``mean`` divides by; ``None`` for ``sum``."""
        if self.reduction != "mean":
            return None
        return float(_target_weight(self.target, self.weight, self.ignore_index))

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        zr, t, rows_of, unrows = to_rows(z, self.target, False)
        a = coefficients(zr, t, self.weight, self.ignore_index, self.reduction, 0.0, False)
        loss = -(a * zr).sum()
        g = unrows(-a) if mode in ("hvp", "grad") else None
        return loss, g, None


RULES = [CrossEntropyRows()]
