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
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


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
        zr, t, rows_of, unrows = to_rows(z, self.target, self.soft)
        a = coefficients(
            zr, t, self.weight, self.ignore_index, self.reduction, self.label_smoothing, self.soft
        )
        logp = torch.log_softmax(zr, dim=-1)
        loss = -(a * logp).sum()
        p = logp.exp()
        A = a.sum(-1, keepdim=True)
        g = unrows(A * p - a) if mode in ("hvp", "grad") else None
        gd = None
        if zdot is not None and mode in ("hvp", "ggn"):
            u = rows_of(zdot)
            pu = p * u
            gd = unrows(A * (pu - p * pu.sum(-1, keepdim=True)))
        return loss, g, gd


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
