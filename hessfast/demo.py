"""``hessfast demo``: one HVP of a built-in model, checked against autograd, with both timings.

The model is a small GELU MLP classifier on a synthetic 10-class Gaussian mixture (no download).
The check is against ``torch.func.jvp(grad(loss))`` — forward-over-reverse autograd — in the same
dtype; the timings are medians over a few repeats after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from .api import ggn_vp, hvp


def gaussian_mixture(n: int, dim: int = 32, classes: int = 10, seed: int = 0):
    """``n`` points from ``classes`` Gaussian blobs in ``dim`` dimensions: ``(x, y)``."""
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def build_mlp(dim: int = 32, width: int = 128, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, classes),
    )


def _median_time(fn, device, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(device: str = "cpu", k: int = 1, dtype: str = "float32", batch: int = 512) -> int:
    """Run the demo; returns a process exit code (0: hessfast agrees with autograd)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    model = build_mlp().to(dev, dt).eval()
    x, y = gaussian_mixture(batch)
    x, y = x.to(dev, dt), y.to(dev)
    params = {n: p.detach() for n, p in model.named_parameters()}
    P = sum(p.numel() for p in params.values())
    g = torch.Generator(device="cpu").manual_seed(1)
    v = {n: torch.randn(k, *p.shape, generator=g).to(dev, dt) for n, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def autograd_hvp():
        return [jvp(grad(loss), (params,), ({n: t[i] for n, t in v.items()},))[1] for i in range(k)]

    ours = hvp(model, F.cross_entropy, x, y, v)
    ref = autograd_hvp()
    num = sum(float(((ours[n][i] - ref[i][n]) ** 2).sum()) for n in params for i in range(k))
    den = sum(float((ref[i][n] ** 2).sum()) for n in params for i in range(k))
    err = (num / den) ** 0.5
    gv = ggn_vp(model, F.cross_entropy, x, y, v)
    psd = min(float(sum((v[n][i] * gv[n][i]).sum() for n in params)) for i in range(k))

    t_ours = _median_time(lambda: hvp(model, F.cross_entropy, x, y, v), dev)
    t_ref = _median_time(autograd_hvp, dev)
    tol = 1e-4 if dt == torch.float32 else 1e-10
    print(f"hessfast {__import__('hessfast').__version__} demo on {dev} ({dtype})")
    print(f"  model: GELU MLP 32-128-128-10, {P:,} parameters; batch {batch}; K = {k} vector(s)")
    print(f"  exact HVP vs torch.func.jvp(grad): relative error {err:.2e} (tolerance {tol:g})")
    print(f"  GGN-VP quadratic form vᵀGv = {psd:.4g} (positive semidefinite: {psd >= 0})")
    print(
        f"  time per call: hessfast {t_ours * 1e3:.2f} ms, torch.func {t_ref * 1e3:.2f} ms "
        f"({t_ref / t_ours:.2f}x)"
    )
    ok = err <= tol
    print("  OK" if ok else "  MISMATCH: hessfast disagrees with autograd")
    return 0 if ok else 1
