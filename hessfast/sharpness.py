"""Sharpness measures of a model's loss over a dataset, reported together.

:func:`sharpness` computes, over the loss of :class:`hessfast.HessianOperator` (all batches,
weighted as the operator weights them):

- ``lambda_max``: the largest Hessian eigenvalue (:func:`hessfast.eigsh`, exact products).
- ``relative_flatness``: ``λ_max · ‖θ‖²`` over the selected parameters.
- ``sam``: SAM's sharpness, the worst-case loss increase ``max_{‖δ‖ ≤ ρ} L(θ + δ) − L(θ)`` in a
  Euclidean ball of radius ``ρ`` (Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware
  Minimization", ICLR 2021), estimated from below by projected normalised-gradient ascent: SAM's
  own step ``δ = ρ ∇L/‖∇L‖`` (``sam_first_step``), then ``ascent_steps − 1`` steps
  ``δ ← Proj_ρ(δ + ρ/2 · ĝ(θ + δ))``; the largest increase seen is reported.
- ``quadratic_bound``: ``ρ‖∇L‖ + ½ λ_max ρ²``, what the quadratic model allows in the ball (the
  exact worst case of a quadratic loss is at most this).

Which ones survive a reparameterisation that leaves the function unchanged (``invariance`` holds
the same notes):

- ``λ_max`` is not invariant: rescaling consecutive layers of a ReLU network
  (``W₁ → αW₁, W₂ → W₂/α``) computes the same function with an arbitrarily different ``λ_max``
  (Dinh, Pascanu, Bengio and Bengio, "Sharp Minima Can Generalize for Deep Nets", ICML 2017).
- ``λ_max · ‖θ‖²`` is invariant to a global rescaling ``θ → αθ`` of a loss with
  ``L(αθ) = L(θ)`` (all weights behind normalisation layers: ``H`` scales by ``1/α²``,
  ``‖θ‖²`` by ``α²``), but not to layer-wise rescaling; Petzka et al.'s layer-wise
  relative flatness (NeurIPS 2021) is the measure invariant to layer- and neuron-wise rescaling.
- SAM's sharpness with a fixed Euclidean ``ρ`` is not invariant (the ball is not); ASAM's
  adaptive ball (Kwon et al., ICML 2021) is invariant to per-parameter scaling.

The model is never written (every evaluation is a ``torch.func.functional_call`` on copies), and
its parameters and buffers are checked and put back bitwise on exit, as in
:func:`hessfast.landscape`.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .landscape import DataLoss, ModelGuard, eigsh_top, loss_operator

__all__ = ["sharpness", "Sharpness", "INVARIANCE"]

INVARIANCE = {
    "lambda_max": (
        "not invariant: layer rescaling of ReLU nets changes it at will (Dinh et al. 2017)"
    ),
    "relative_flatness": (
        "invariant to a global rescaling of scale-invariant parameters (L(αθ) = L(θ)); not to "
        "layer-wise rescaling (Petzka et al. 2021's layer-wise measure is)"
    ),
    "sam": "not invariant: the Euclidean ρ-ball is not (ASAM's adaptive ball is)",
}


@dataclass
class Sharpness:
    """The result of :func:`sharpness` (module docstring for each measure).

    ``loss``: ``L(θ)``; ``grad_norm``: ``‖∇L(θ)‖``; ``param_norm_sq``: ``‖θ‖²``; ``sam_trace``:
    the increase after each ascent step; ``products``: Hessian-vector products of the
    eigensolver; ``passes``: gradient passes over the data; ``seconds``.
    """

    lambda_max: float
    relative_flatness: float
    sam: float
    sam_first_step: float
    quadratic_bound: float
    loss: float
    grad_norm: float
    param_norm_sq: float
    rho: float
    ascent_steps: int
    sam_trace: list[float] = field(default_factory=list)
    products: int = 0
    passes: int = 0
    seconds: float = 0.0
    invariance: dict[str, str] = field(default_factory=lambda: dict(INVARIANCE))

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return asdict(self)


def sharpness(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    rho: float = 0.05,
    ascent_steps: int = 5,
    params: str | Sequence[str] | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    lambda_max: float | None = None,
    max_batch_size: int | None = None,
    reduction: str | None = None,
    output: str | int | None = None,
) -> Sharpness:
    """``λ_max``, ``λ_max·‖θ‖²`` and SAM's ``ρ``-ball sharpness of the loss over ``data``.

    Args:
        model, loss_fn, data: as for :class:`hessfast.HessianOperator`.
        rho: the radius of the Euclidean ball (absolute, in parameter space; SAM's default 0.05).
        ascent_steps: gradient passes of the ascent (the first is SAM's own step); each is one
            pass over the data.
        params: names or glob patterns of the parameters measured and perturbed.
        seed: seeds the eigensolver.
        tol: the eigensolver's tolerance.
        lambda_max: a value computed before (skips the eigensolver).
        max_batch_size, reduction, output: as for the operator.

    Returns:
        a :class:`Sharpness`, whose ``invariance`` says which measures are
        reparameterisation-invariant.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    >>> s = hessfast.sharpness(model, F.cross_entropy, data, rho=0.05, ascent_steps=3)
    >>> len(s.sam_trace), s.sam >= s.sam_first_step, sorted(s.invariance)
    (3, True, ['lambda_max', 'relative_flatness', 'sam'])
    >>> s2 = hessfast.sharpness(model, F.cross_entropy, data, lambda_max=s.lambda_max)  # no eigsh
    >>> s2.relative_flatness == s.relative_flatness
    True
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be a positive integer, got {ascent_steps!r}")
    t0 = time.perf_counter()
    op = loss_operator(
        model,
        loss_fn,
        data,
        params=params,
        max_batch_size=max_batch_size,
        reduction=reduction,
        output=output,
    )
    products = 0
    with ModelGuard(model):
        dl = DataLoss(op)
        if lambda_max is None:
            evals, _, info = eigsh_top(op, 1, seed, tol)
            lam = float(evals[-1])
            products = info.products
        else:
            lam = float(lambda_max)
        theta_sq = sum(float(p.detach().double().pow(2).sum()) for p in dl.params)
        loss0, g0 = dl.value_and_grad()
        passes = 1
        gnorm = float(g0.norm())
        dtype, device = dl.params[0].dtype, dl.params[0].device
        delta = torch.zeros_like(g0)
        g = g0
        trace: list[float] = []
        for step in range(ascent_steps):
            n = float(g.norm())
            if n == 0 or not math.isfinite(n):
                break
            if step == 0:
                delta = rho * g / n
            else:
                delta = delta + (rho / 2) * g / n
                dn = float(delta.norm())
                if dn > rho:
                    delta = delta * (rho / dn)
            val, g = dl.value_and_grad(delta.to(device, dtype))
            passes += 1
            trace.append(val - loss0)
    sam = max(trace) if trace else 0.0
    return Sharpness(
        lambda_max=lam,
        relative_flatness=lam * theta_sq,
        sam=sam,
        sam_first_step=trace[0] if trace else 0.0,
        quadratic_bound=rho * gnorm + 0.5 * lam * rho * rho,
        loss=loss0,
        grad_norm=gnorm,
        param_norm_sq=theta_sq,
        rho=float(rho),
        ascent_steps=ascent_steps,
        sam_trace=trace,
        products=products,
        passes=passes,
        seconds=time.perf_counter() - t0,
    )


class _CallableModule(types.ModuleType):
    """``hessfast.sharpness`` is this module and, called, :func:`sharpness` (as
    ``hessfast.selftest``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Sharpness:
        return sharpness(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
