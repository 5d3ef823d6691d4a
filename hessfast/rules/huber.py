"""Huber and smooth-L1 loss rules at the model output.

Per element, with residual ``r = z − t``:

- Huber (``delta = δ > 0``): ``ℓ = ½ r²`` where ``|r| < δ``, else ``δ (|r| − ½ δ)``; gradient
  ``clamp(r, −δ, δ)``; second derivative ``1`` where ``|r| < δ``, else 0.
- smooth L1 (``beta = β ≥ 0``): ``ℓ = ½ r² / β`` where ``|r| < β``, else ``|r| − ½ β``; gradient
  ``clamp(r / β, −1, 1)`` (``sign(r)`` for ``β = 0``, plain L1); second derivative ``1/β`` where
  ``|r| < β``, else 0.

The Hessian is diagonal: ``H u = s · c ⊙ u`` with ``c`` the second derivative above and ``s =
1/numel`` for ``mean``, 1 for ``sum``. At ``|r| = δ`` (resp. ``β``) the second derivative is 0, as in
torch's double backward. Targets must have the output's shape (broadcasting calls go through the
autograd loss instead, with torch's warning).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class HuberLoss:
    """``F.huber_loss`` (``smooth=False``, threshold ``delta``) or ``F.smooth_l1_loss``
    (``smooth=True``, threshold ``beta``): they differ by the factor ``1/β`` inside the threshold."""

    name = "huber_loss"

    def __init__(
        self, target: Tensor, reduction: str = "mean", threshold: float = 1.0, smooth: bool = False
    ):
        threshold = float(threshold)
        if threshold < 0 or (threshold == 0 and not smooth):
            what = "beta must be >= 0" if smooth else "delta must be > 0"
            raise ValueError(f"{'smooth_l1_loss' if smooth else 'huber_loss'}: {what}")
        self.target = target
        self.reduction = reduction
        self.threshold = threshold
        self.smooth = smooth

    def denominator(self) -> float | None:
        """What ``mean`` divides by (the number of elements); ``None`` for ``sum``."""
        return float(self.target.numel()) if self.reduction == "mean" else None

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        s = 1.0 / z.numel() if self.reduction == "mean" else 1.0
        b = self.threshold
        r = z - self.target.to(z.dtype)
        a = r.abs()
        inside = a < b
        if self.smooth:
            quad = 0.5 * r * r / b if b > 0 else torch.zeros_like(r)
            lin = a - 0.5 * b
            scale = 1.0 / b if b > 0 else 0.0
            g1 = torch.where(inside, r * scale, torch.sign(r)) if mode in ("hvp", "grad") else None
        else:
            quad = 0.5 * r * r
            lin = b * (a - 0.5 * b)
            scale = 1.0
            g1 = r.clamp(-b, b) if mode in ("hvp", "grad") else None
        loss = s * torch.where(inside, quad, lin).sum()
        g = s * g1 if g1 is not None else None
        gd = None
        if zdot is not None and mode in ("hvp", "ggn"):
            gd = (s * scale) * inside.to(z.dtype) * zdot
        return loss, g, gd


class SmoothL1Loss(HuberLoss):
    """``F.smooth_l1_loss`` with threshold ``beta`` (``beta=0``: L1, whose Hessian is zero)."""

    name = "smooth_l1_loss"

    def __init__(self, target: Tensor, reduction: str = "mean", beta: float = 1.0):
        super().__init__(target, reduction, beta, smooth=True)
