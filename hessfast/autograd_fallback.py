"""The whole-loss autograd path, for models that ``torch.export`` cannot capture.

HVP by double backward (``∇(⟨∇L, v⟩)``), GGN-VP by the double-VJP trick for ``J v`` followed by the
loss rule's Hessian and one VJP; the residual ``R = H − G`` by double backward with ``∂L/∂z`` held
constant. One backward per vector: a loop over K. As in the engine, the GGN-VP's VJP gets the loss
Hessian's product ``ġ_z`` scaled by a power of two per product on the CPU in float32 and bfloat16,
and its products are scaled back (:mod:`hessfast.subnormal`: exact; a saturated softmax's
subnormal ``ġ_z`` stays out of the backward pass). Buffers (BatchNorm running
statistics) are restored afterwards, so a call has no side effects on the model.

Everything runs under SDPA's math backend: the fused attention kernels (flash, memory-efficient,
cuDNN) have backward formulas that cannot be differentiated again, the math backend is composite
(and exact).
"""

from __future__ import annotations

import torch
from torch import nn

from . import subnormal
from .errors import DropoutError
from .losses import read_output


def math_attention():
    """``F.scaled_dot_product_attention`` on its composite math backend, twice differentiable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def check_no_training_dropout(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise DropoutError(
                f"dropout with p={m.p} is active in training mode at {name or '<model>'} "
                f"({type(m).__name__}): call model.eval() before asking for curvature, or set "
                "its probability to 0."
            )


def run(model, loss_rule, inputs, selected, tangents, k, mode, kwargs=None, output=None):
    """Return ``(loss, grads, products)`` as the engine does, computed with autograd, for
    ``model(*inputs, **kwargs)``; a container output is read as on the captured path
    (:func:`hessfast.capture.choose_output` with ``output``)."""
    with math_attention():
        return _run(model, loss_rule, inputs, selected, tangents, k, mode, kwargs or {}, output)


def select_output(out, loss_rule, output):
    """The tensor of ``out`` the loss reads, and the loss rule (a custom loss of a one-tensor
    container receives the container, as on the captured path)."""
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    if spec.is_leaf():
        z = out
    elif not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        z = None
    else:
        idx, loss_rule = read_output(loss_rule, spec, output)
        z = leaves[idx]
    if not isinstance(z, torch.Tensor):
        raise ValueError(
            "the model must return a tensor, or a dict/tuple of tensors (pass output= to say "
            "which one the loss reads)"
        )
    return z, loss_rule


def _run(model, loss_rule, inputs, selected, tangents, k, mode, kwargs, output):
    check_no_training_dropout(model)
    names = [n for n, _ in selected]
    params = [p for _, p in selected]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with torch.enable_grad():
            z, loss_rule = select_output(model(*inputs, **kwargs), loss_rule, output)
            loss, gz, _ = loss_rule.evaluate(z, None, "grad")
            grads = products = None
            if mode in ("grad", "hvp", "residual"):
                # residual: R V = ∇_θ((∂L/∂z)ᵀ z(θ)) · V with ∂L/∂z held constant, i.e. without
                # the loss Hessian's term
                g = torch.autograd.grad(
                    z,
                    params,
                    gz.detach() if mode == "residual" else gz,
                    create_graph=(mode != "grad"),
                    allow_unused=True,
                    retain_graph=True,
                )
                g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
                grads = {n: gi.detach() for n, gi in zip(names, g)} if mode != "residual" else None
            if mode in ("hvp", "residual"):
                products = {n: [] for n in names}
                live = [(n, gi) for n, gi in zip(names, g) if gi.requires_grad]
                for i in range(k):
                    hv = [None] * len(params)
                    if live:
                        hv = torch.autograd.grad(
                            [gi for _, gi in live],
                            params,
                            [tangents[n][i] for n, _ in live],
                            retain_graph=True,
                            allow_unused=True,
                        )
                    for n, p, h in zip(names, params, hv):
                        products[n].append(torch.zeros_like(p) if h is None else h.detach())
                products = {n: torch.stack(t) for n, t in products.items()}
            elif mode == "ggn":
                products = {n: [] for n in names}
                scales = []  # the power-of-two scale of each product's ġ_z (hessfast.subnormal)
                u = torch.zeros_like(z, requires_grad=True)
                gu = torch.autograd.grad(z, params, u, create_graph=True, allow_unused=True)
                pairs = [(gi, tangents[n]) for gi, n in zip(gu, names) if gi is not None]
                for i in range(k):
                    jv = torch.autograd.grad(
                        [gi for gi, _ in pairs], u, [t[i] for _, t in pairs], retain_graph=True
                    )[0]
                    _, _, hjv = loss_rule.evaluate(z.detach(), jv.detach()[None], "ggn")
                    if subnormal.applies(hjv):
                        scales.append(subnormal.pow2_scale(hjv))
                        hjv = hjv * subnormal.per_product(scales[-1], hjv)
                    out = torch.autograd.grad(
                        z, params, hjv[0], retain_graph=True, allow_unused=True
                    )
                    for n, p, o in zip(names, params, out):
                        products[n].append(torch.zeros_like(p) if o is None else o.detach())
                products = {n: torch.stack(t) for n, t in products.items()}
                if scales:  # in place: the stacks are new tensors
                    unscale = subnormal.inverse(torch.cat(scales))
                    for t in products.values():
                        t.mul_(subnormal.per_product(unscale, t))
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    return loss.detach(), grads, products
