"""Mean-squared-error loss rule at the model output.

``L = s Σ_i (z_i − t_i)²`` with ``s = 1/numel`` for ``mean`` and 1 for ``sum``; gradient
``2 s (z − t)``; Hessian ``2 s I``, so ``H u = 2 s u``. Targets must have the output's shape (torch
broadcasts with a warning; such calls go through the autograd loss fallback instead).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class MSELoss:
    name = "mse_loss"

    def __init__(self, target: Tensor, reduction: str = "mean"):
        self.target = target
        self.reduction = reduction

    def denominator(self) -> float | None:
        """What ``mean`` divides by (the number of elements); ``None`` for ``sum``."""
        return float(self.target.numel()) if self.reduction == "mean" else None

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        s = 1.0 / z.numel() if self.reduction == "mean" else 1.0
        r = z - self.target.to(z.dtype)
        loss = s * (r * r).sum()
        g = 2 * s * r if mode in ("hvp", "grad") else None
        gd = 2 * s * zdot if zdot is not None and mode in ("hvp", "ggn") else None
        return loss, g, gd
