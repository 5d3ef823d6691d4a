"""Differentiable curvature penalties for training toward flat regions.

hessfast's products run on its own engine, without an autograd graph, so they cannot be
differentiated; the penalties here are plain torch autograd on one batch:

- :func:`hessian_trace`: Hutchinson's estimate ``(1/K) Σ_i v_iᵀ H v_i`` of ``tr(H)`` with
  Rademacher probes ``v_i``, as a scalar tensor whose ``.backward()`` adds ``γ · ∇_θ`` of the
  estimate to every parameter's ``.grad``. For fixed probes the estimate is unbiased for
  ``tr(H)`` and its gradient is unbiased for ``∇ tr(H)`` (``method="autograd"``).
- :class:`LambdaMax`: the Rayleigh quotient ``vᵀ H v`` of a unit vector ``v`` carried from call to
  call and refined by power iteration (one step per call by default); at an eigenvector its
  gradient is ``∇ λ`` (Hellmann-Feynman: ``dλ = vᵀ dH v`` for a simple eigenvalue).

Three ways to compute ``vᵀ H v`` and its gradient (``method=``):

- ``"autograd"`` (default): ``g = ∇L`` with ``create_graph``, ``H v = ∇(gᵀv)`` with
  ``create_graph``; ``.backward()`` is then third-order autograd. Exact (no step size); needs
  ops that autograd can differentiate three times (``F.scaled_dot_product_attention`` runs on
  its composite math backend under ``"autograd"`` and ``"fd"``, as in hessfast's autograd
  fallback; torch's fused kernels have no second derivative).
- ``"fd"``: central differences of gradients, ``vᵀ(∇L(θ+εv) − ∇L(θ−εv)) / 2ε``, each gradient
  with ``create_graph``; ``.backward()`` is second-order autograd. Bias ``O(ε²)``.
- ``"fd2"``: second differences of the loss, ``(L(θ+εv) − 2L(θ) + L(θ−εv)) / ε²``; ``.backward()``
  is first-order autograd only, so it works on models that cannot be differentiated twice (ops
  with a first derivative only; fused attention kernels run as they are). Bias ``O(ε²)`` and
  rounding ``O(u·L/ε²)`` (``u`` the unit round-off):
  negligible in float64, but in float32 the value of one probe was off by 10% (its gradient by
  0.15%) in the measurement below — usually still inside Hutchinson's own sampling noise, but
  not exact. On ReLU networks the differences also see the kinks that autograd's Hessian
  ignores: on the zoo's conv-BN-ReLU model one probe gave 50.3 against the exact 3.35
  (``"fd"``, with its smaller step, 3.3517425175 against 3.3517425174).

``ε`` (``eps=None``) is relative: ``ε = r · max(‖θ‖, 1) / ‖v‖`` with ``r = u^{1/3}`` for
``"fd"`` and ``u^{1/4}`` for ``"fd2"`` (the step sizes that balance truncation and rounding).

Measured (``examples/flat_minima.py --bench``: a 784-128-128-10 GELU MLP, 118 k parameters,
batch 256, float32, one thread on a shared, loaded 2-core CPU, median of 7 interleaved rounds; two
runs, the plain step taking 6.4 ms and 2.5 ms): a training step with the penalty (one probe)
against the loss's own forward and backward: ``"autograd"`` 6.0× / 9.9×, ``"fd"`` 6.7× / 11.0×,
``"fd2"`` 4.1× / 7.3×; four probes: ``"autograd"`` 17× / 29×, ``"fd2"`` 12× / 21×.
Error against the float64 ``"autograd"`` value of the same probe: ``"autograd"`` 8e-7 (value)
and 6e-7 (gradient, relative norm), ``"fd"`` 6e-6 and 5e-5, ``"fd2"`` 0.10 and 1.5e-3 (float32
round-off in ``L/ε²``). On hessfast.zoo's models (float64, three probes), ``"autograd"`` agrees
with ``vᵀHv`` from hessfast's own products to 1e-15 (the SDPA GPT, GPT-2, conv-BN in eval mode,
the MLP), ``"fd"`` to 1e-9, ``"fd2"`` to 1e-6 except on the ReLU model. The default is therefore
``"autograd"``: exact, no step size, and the fastest of the two accurate forms here. Use ``"fd"``
for BatchNorm in training mode (torch's ``batch_norm`` has no third derivative there:
``"autograd"``'s ``.backward()`` raises ``RuntimeError: batch_norm does not support 3rd+ order
derivatives``), and ``"fd2"`` for smooth models with an op that cannot be differentiated twice
(a custom op with a first derivative only), preferably in float64.

The penalties run their forwards through ``torch.func.functional_call`` with the perturbed
parameters and a copy of the buffers: neither the parameters nor the buffers (BatchNorm running
statistics) are written, so the model's state is what the training step's own forward leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import api, losses
from .autograd_fallback import check_no_training_dropout, math_attention
from .capture import choose_output
from .vectors import select_params

Tensor = torch.Tensor

__all__ = ["hessian_trace", "LambdaMax", "METHODS"]

METHODS = ("autograd", "fd", "fd2")


def call_loss(loss_fn: Callable, out: Any, targets: Any, output: str | int | None = None) -> Tensor:
    """``loss_fn`` of the model output ``out`` as hessfast's products read it: a lone tensor as it
    is, a container through :func:`hessfast.capture.choose_output` (``output=`` names the entry;
    a custom loss of a one-tensor container receives the container)."""
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    if spec.is_leaf():
        if output is not None:
            raise ValueError(f"output={output!r}: the model returns one tensor; drop output=")
        z = out
    else:
        idx, rebuild = choose_output(spec, output, not losses.is_closed_form(loss_fn))
        if rebuild is not None:
            return loss_fn(out, targets)
        z = leaves[idx]
    if _sequence_layout(loss_fn, z, targets):
        # logits [B, T, C] with targets [B, T]: the mean over all tokens, as hessfast reads it
        return loss_fn(z.flatten(0, -2), targets.flatten())
    return loss_fn(z, targets)


def _sequence_layout(loss_fn: Callable, z: Any, targets: Any) -> bool:
    """Whether a built-in cross-entropy or NLL loss reads ``z`` with classes last (``[B, T, C]``
    logits, ``[B, T]`` class targets), which hessfast's rules accept and torch's call does not."""
    if not (isinstance(z, torch.Tensor) and isinstance(targets, torch.Tensor)) or z.dim() < 3:
        return False
    fn, _ = losses.identify(loss_fn)
    if fn not in (torch.nn.functional.cross_entropy, torch.nn.functional.nll_loss):
        return False
    if targets.is_floating_point():
        return False
    shape, ts = tuple(z.shape), tuple(targets.shape)
    return ts == shape[:-1] and ts != (shape[0], *shape[2:])


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: one of {', '.join(map(repr, METHODS))}")


class _Objective:
    """The loss of one batch as a function of the selected parameters (autograd throughout)."""

    def __init__(self, model, loss_fn, inputs, targets, params, output, method):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        losses.check_loss_fn(loss_fn)
        _check_method(method)
        if method != "autograd":
            # each perturbed forward would draw its own dropout mask: differences of noise
            check_no_training_dropout(model)
        self.model, self.loss_fn, self.targets, self.output = model, loss_fn, targets, output
        self.args, self.kwargs = api.split_inputs(inputs)
        self.selected = select_params(model, params)
        self.names = [n for n, _ in self.selected]
        self.params = [p for _, p in self.selected]
        self.method = method
        self.buffers = dict(model.named_buffers())

    def _fresh_buffers(self) -> dict[str, Tensor]:
        # every forward writes into its own copy of the buffers (BatchNorm running statistics):
        # the model's are never touched, and autograd's saved tensors are never overwritten
        return {n: b.clone() for n, b in self.buffers.items()}

    def loss(self, shift: list[Tensor] | None = None) -> Tensor:
        """``L(θ + shift)`` differentiable in θ (``shift`` a list over the selected params)."""
        over = self._fresh_buffers()
        if shift is not None:
            over.update({n: p + s for n, p, s in zip(self.names, self.params, shift)})
        if self.method == "fd2":  # first-order only: any attention kernel
            out = torch.func.functional_call(self.model, over, self.args, self.kwargs)
        else:  # differentiated two or three times: SDPA on its composite math backend
            with math_attention():
                out = torch.func.functional_call(self.model, over, self.args, self.kwargs)
        loss = call_loss(self.loss_fn, out, self.targets, self.output)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        return loss

    def grad(self, loss: Tensor, create_graph: bool) -> list[Tensor]:
        g = torch.autograd.grad(
            loss, self.params, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, self.params)]

    def eps(self, v: list[Tensor], eps: float | None) -> float:
        if eps is not None:
            if not (eps > 0 and math.isfinite(eps)):
                raise ValueError(f"eps must be a positive finite number, got {eps!r}")
            return float(eps)
        u = torch.finfo(self.params[0].dtype).eps
        r = u ** (1 / 3) if self.method == "fd" else u**0.25
        with torch.no_grad():
            tnorm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in self.params))
            vnorm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in v))
        return r * max(tnorm, 1.0) / max(vnorm, 1e-300)

    def quadratic_forms(
        self, probes: list[list[Tensor]], eps: float | None, want_hv: bool = False
    ) -> tuple[Tensor, list[list[Tensor]] | None]:
        """``(Σ_i v_iᵀ H v_i`` differentiable in θ, ``[H v_i]`` detached or None)``."""
        total = None
        hvs: list[list[Tensor]] | None = [] if want_hv else None
        with torch.enable_grad():
            if self.method == "autograd":
                g = self.grad(self.loss(), create_graph=True)
                for v in probes:
                    gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
                    if not gv.requires_grad:  # a loss linear in θ: H = 0
                        hv = [torch.zeros_like(p) for p in self.params]
                    else:
                        hv = self.grad(gv, create_graph=True)
                    q = sum((hi * vi).sum() for hi, vi in zip(hv, v))
                    total = q if total is None else total + q
                    if hvs is not None:
                        hvs.append([h.detach() for h in hv])
            elif self.method == "fd":
                for v in probes:
                    e = self.eps(v, eps)
                    gp = self.grad(self.loss([e * x for x in v]), create_graph=True)
                    gm = self.grad(self.loss([-e * x for x in v]), create_graph=True)
                    hv = [(a - b) / (2 * e) for a, b in zip(gp, gm)]
                    q = sum((hi * vi).sum() for hi, vi in zip(hv, v))
                    total = q if total is None else total + q
                    if hvs is not None:
                        hvs.append([h.detach() for h in hv])
            else:  # fd2
                if want_hv:
                    raise ValueError("method='fd2' gives vᵀHv but not Hv: use 'autograd' or 'fd'")
                l0 = self.loss()
                for v in probes:
                    e = self.eps(v, eps)
                    lp = self.loss([e * x for x in v])
                    lm = self.loss([-e * x for x in v])
                    q = (lp - 2 * l0 + lm) / (e * e)
                    total = q if total is None else total + q
        if not total.requires_grad:
            # constant curvature (a model linear in θ with a quadratic loss): a zero gradient
            total = total + sum(p.sum() * 0 for p in self.params)
        return total, hvs

    def split(self, flat: Tensor) -> list[Tensor]:
        out, off = [], 0
        for p in self.params:
            out.append(flat[off : off + p.numel()].view_as(p).to(p.dtype))
            off += p.numel()
        return out


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    num_probes: int = 1,
    seed: int | None = None,
    *,
    gamma: float = 1.0,
    method: str = "autograd",
    params: str | Sequence[str] | None = None,
    eps: float | None = None,
    probes: Tensor | None = None,
    output: str | int | None = None,
) -> Tensor:
    """``γ ·`` Hutchinson's estimate of ``tr(H)`` of ``loss_fn(model(inputs), targets)``, as a
    scalar tensor differentiable in the parameters.

    ``(loss + hessian_trace(...)).backward()`` adds ``∇L + γ · ∇_θ tr̂(H)`` to ``.grad``. The
    estimate is ``(1/K) Σ_i v_iᵀ H v_i`` over ``K = num_probes`` Rademacher probes; with a fixed
    probe set it is a smooth function of ``θ``, and its gradient is an unbiased estimate of
    ``∇ tr(H)`` (``method="autograd"``; ``"fd"``/``"fd2"`` add an ``O(ε²)`` bias, module
    docstring).

    Args:
        model, loss_fn, inputs, targets: as for :func:`hessfast.hvp` (one batch).
        num_probes: ``K``. The estimate's variance is ``2(‖H‖_F² − Σ H_ii²)/K``.
        seed: seeds a CPU ``torch.Generator`` for the probes: the same seed gives the same probes
            (pass the step number for fresh, reproducible probes every step). ``None`` draws them
            from torch's global generator (reproducible under ``torch.manual_seed``).
        gamma: the penalty weight ``γ`` the result is multiplied by.
        method: ``"autograd"`` (exact, third-order autograd), ``"fd"`` (gradient differences,
            second-order) or ``"fd2"`` (loss differences, first-order); module docstring.
        params: names or glob patterns of the parameters whose Hessian block is traced and that
            the penalty's gradient reaches (default: all with ``requires_grad``).
        eps: the finite-difference step (absolute; default relative, module docstring).
        probes: explicit probe vectors ``[K, P]`` instead of Rademacher ones (tests: ``√P·I``
            gives the exact trace).
        output: which entry of a container output the loss reads (as in :func:`hessfast.hvp`).

    Cost per training step with one probe (module docstring, measured on a 118 k-parameter MLP):
    ``"autograd"`` 6–10× the loss's own forward and backward, ``"fd"`` 7–11×, ``"fd2"`` 4–7×.

    >>> import torch, torch.nn.functional as F
    >>> from hessfast.penalties import hessian_trace
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> pen = hessian_trace(model, F.cross_entropy, x, y, num_probes=2, seed=0, gamma=0.1)
    >>> (F.cross_entropy(model(x), y) + pen).backward()
    >>> model[0].weight.grad.shape
    torch.Size([4, 3])
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    obj = _Objective(model, loss_fn, inputs, targets, params, output, method)
    P = sum(p.numel() for p in obj.params)
    if probes is not None:
        V = probes if probes.dim() == 2 else probes[None]
        if V.shape[1] != P:
            raise ValueError(f"probes must be [K, P] with P={P}, got {list(probes.shape)}")
    else:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        V = torch.randint(0, 2, (num_probes, P), generator=g).mul_(2).sub_(1)
    dtype, device = obj.params[0].dtype, obj.params[0].device
    V = V.to(device=device, dtype=dtype)
    total, _ = obj.quadratic_forms([obj.split(v) for v in V], eps)
    return total * (gamma / V.shape[0])


class LambdaMax:
    """A differentiable ``λ_max`` penalty: ``γ · vᵀ H v`` for a unit vector ``v`` carried from
    call to call and refined by ``power_iters`` steps of power iteration per call.

    Each call returns ``γ · vᵀ H(θ) v`` with ``v`` fixed (differentiable in ``θ``; at an
    eigenvector its gradient is ``γ ∇λ``), then replaces ``v`` by ``H v / ‖H v‖`` from the same
    product, so over training ``v`` tracks the top eigenvector at no extra cost
    (``power_iters=n`` spends ``n − 1`` more products per call without a graph). Power iteration
    finds the eigenvalue of largest magnitude: near a minimum that is ``λ_max``.
    ``value`` holds the last Rayleigh quotient (without ``γ``), ``vector`` the current ``v``
    (flat, detached). ``method``: ``"autograd"`` or ``"fd"`` (module docstring; ``"fd2"`` has no
    ``H v`` for the power step). The vector starts from a seeded Gaussian.

    >>> import torch, torch.nn.functional as F
    >>> from hessfast.penalties import LambdaMax
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> penalty = LambdaMax(model, F.cross_entropy, gamma=0.1, seed=0)
    >>> for _ in range(3):
    ...     model.zero_grad()
    ...     (F.cross_entropy(model(x), y) + penalty(x, y)).backward()
    >>> penalty.vector.shape
    torch.Size([26])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        *,
        gamma: float = 1.0,
        power_iters: int = 1,
        seed: int = 0,
        method: str = "autograd",
        params: str | Sequence[str] | None = None,
        eps: float | None = None,
        output: str | int | None = None,
    ):
        _check_method(method)
        if method == "fd2":
            raise ValueError("LambdaMax needs H v for its power step: method 'autograd' or 'fd'")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be a positive integer, got {power_iters!r}")
        self.model, self.loss_fn = model, loss_fn
        self.gamma, self.power_iters, self.seed = float(gamma), power_iters, seed
        self.method, self.params, self.eps, self.output = method, params, eps, output
        self.vector: Tensor | None = None
        self.value: float | None = None

    def __call__(self, inputs: Any, targets: Any) -> Tensor:
        """``γ · vᵀ H v`` on this batch (differentiable), and one power step for ``v``."""
        obj = _Objective(
            self.model, self.loss_fn, inputs, targets, self.params, self.output, self.method
        )
        P = sum(p.numel() for p in obj.params)
        dtype, device = obj.params[0].dtype, obj.params[0].device
        if self.vector is None or self.vector.numel() != P:
            g = torch.Generator().manual_seed(self.seed)
            v = torch.randn(P, generator=g, dtype=torch.float64)
            self.vector = (v / v.norm()).to(device=device, dtype=dtype)
        v = self.vector.to(device=device, dtype=dtype)
        for _ in range(self.power_iters - 1):
            _, hv = obj.quadratic_forms([obj.split(v)], self.eps, want_hv=True)
            v = _unit(torch.cat([h.reshape(-1) for h in hv[0]]), v)
        q, hv = obj.quadratic_forms([obj.split(v)], self.eps, want_hv=True)
        self.value = float(q.detach())
        self.vector = _unit(torch.cat([h.reshape(-1) for h in hv[0]]), v)
        return q * self.gamma


def _unit(hv: Tensor, fallback: Tensor) -> Tensor:
    n = hv.norm()
    if not torch.isfinite(n) or n == 0:
        return fallback
    return hv / n
