"""Binary cross-entropy with logits: value, gradient and Hessian at the model output.

Per element, with ``σ = sigmoid(z)``, target ``t``, element weight ``w`` and positive-class weight
``q`` (``pos_weight``, broadcast over the last axis):
``ℓ = −w [q t log σ + (1 − t) log(1 − σ)]``,
``∂ℓ/∂z = w [σ (q t + 1 − t) − q t]``,
``∂²ℓ/∂z² = w (q t + 1 − t) σ (1 − σ)`` (diagonal). ``mean`` divides by ``numel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class BCEWithLogitsLoss:
    name = "binary_cross_entropy_with_logits"

    def __init__(self, target, weight=None, reduction="mean", pos_weight=None):
        self.target = target
        self.weight = weight
        self.reduction = reduction
        self.pos_weight = pos_weight

    def denominator(self) -> float | None:
        """What ``mean`` divides by (the number of elements); ``None`` for ``sum``."""
        return float(self.target.numel()) if self.reduction == "mean" else None

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        t = self.target.to(z.dtype)
        loss = F.binary_cross_entropy_with_logits(
            z, t, weight=self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )
        s = 1.0 / z.numel() if self.reduction == "mean" else 1.0
        w = s if self.weight is None else s * self.weight.to(z.dtype)
        q = 1.0 if self.pos_weight is None else self.pos_weight.to(z.dtype)
        sig = torch.sigmoid(z)
        c = q * t + 1 - t
        g = w * (sig * c - q * t) if mode in ("hvp", "grad") else None
        gd = None
        if zdot is not None and mode in ("hvp", "ggn"):
            gd = (w * c * sig * (1 - sig)) * zdot
        if g is not None and g.shape != z.shape:
            g = g.expand(z.shape)
        return loss, g, gd
