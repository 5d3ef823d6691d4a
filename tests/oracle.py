"""Independent oracles: ``torch.func`` forward-over-reverse and double backward, in float64."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap


def torch_loss(loss_fn):
    """``loss_fn`` as torch computes it, with hessfast's sequence layout spelled out: logits
    ``[B, T, C]`` with targets ``[B, T]`` mean ``loss_fn(z.flatten(0, -2), t.flatten())``."""

    def f(z, t):
        if z.dim() == 3 and isinstance(t, torch.Tensor) and t.shape == z.shape[:-1]:
            return loss_fn(z.flatten(0, -2), t.flatten())
        return loss_fn(z, t)

    return f


def without_running_stats(model):
    """A copy whose training-mode BatchNorms use batch statistics and update nothing (the
    semantics hessfast gives them), so the oracles can transform it without side effects."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _split(model, names):
    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}
    rest.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return chosen, rest


def _forward(model, rest, inputs):
    def z(p):
        return functional_call(model, {**p, **rest}, inputs, tie_weights=True)

    return z


def math_attention():
    """SDPA's math backend: composite, so ``torch.func`` and double backward see through it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def hvp(model, loss_fn, inputs, targets, v: dict) -> dict:
    """``jvp(grad(L))`` vmapped over the K axis of ``v`` (``[K, *shape]`` per name)."""
    loss_fn = torch_loss(loss_fn)
    model = without_running_stats(model)
    chosen, rest = _split(model, list(v))
    z = _forward(model, rest, inputs)

    def loss(p):
        return loss_fn(z(p), targets)

    g = grad(loss)
    with math_attention():
        return vmap(lambda t: jvp(g, (chosen,), (t,))[1])(v)


def ggn_vp(model, loss_fn, inputs, targets, v: dict) -> dict:
    """``Jᵀ H_L J v`` with ``jvp`` then the loss Hessian then ``vjp``."""
    loss_fn = torch_loss(loss_fn)
    model = without_running_stats(model)
    chosen, rest = _split(model, list(v))
    z = _forward(model, rest, inputs)
    with math_attention():
        out, pull = vjp(z, chosen)
    gl = grad(lambda o: loss_fn(o, targets))

    def one(t):
        _, jv = jvp(z, (chosen,), (t,))
        _, hjv = jvp(gl, (out,), (jv,))
        return pull(hjv)[0]

    with math_attention():
        return vmap(one)(v)


def double_backward_hvp(model, loss_fn, inputs, targets, v: dict) -> dict:
    """The second oracle: ``∇⟨∇L, v⟩`` with autograd, one vector at a time."""
    loss_fn = torch_loss(loss_fn)
    params = dict(model.named_parameters())
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    names = list(v)
    ps = [params[n] for n in names]
    with math_attention():
        loss = loss_fn(model(*inputs), targets)
        g = torch.autograd.grad(loss, ps, create_graph=True)
    out = {n: [] for n in names}
    k = next(iter(v.values())).shape[0]
    for i in range(k):
        with math_attention():
            hv = torch.autograd.grad(
                g, ps, [v[n][i] for n in names], retain_graph=True, allow_unused=True
            )
        for n, h, p in zip(names, hv, ps):
            out[n].append(torch.zeros_like(p) if h is None else h)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    return {n: torch.stack(t) for n, t in out.items()}


def dense_hessian(model, loss_fn, inputs, targets) -> torch.Tensor:
    """The dense float64 Hessian over all parameters (``named_parameters()`` order), by double
    backward (``torch.autograd.functional.hessian``) on a float64 copy of the model, the rows
    batched (``vectorize=True``: reverse over reverse, vmapped over the rows; the same numbers as
    one backward per row, to the last bit on the zoo's models, and tens of times faster). Not
    ``torch.func.hessian``: its ``jacfwd(jacrev)`` gets training-mode BatchNorm wrong on torch
    2.14."""
    model = without_running_stats(model).double()
    loss_fn = torch_loss(loss_fn)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    named = list(model.named_parameters())
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(t):
        ps, off = {}, 0
        for n, p in named:
            ps[n] = t[off : off + p.numel()].view_as(p)
            off += p.numel()
        with math_attention():
            return loss_fn(functional_call(model, {**ps, **buffers}, inputs), targets)

    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def param_offsets(model) -> dict[str, tuple[int, int]]:
    """``name -> (start, stop)`` of each parameter in the flat vector."""
    out, off = {}, 0
    for n, p in model.named_parameters():
        out[n] = (off, off + p.numel())
        off += p.numel()
    return out


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[n] - b[n]) ** 2).sum() for n in b) ** 0.5
    den = sum((b[n] ** 2).sum() for n in b) ** 0.5
    return float(num / max(den, 1e-300))
