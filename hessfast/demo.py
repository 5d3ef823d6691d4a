"""``hessfast demo``: train a small classifier on built-in data, then analyse its Hessian.

Everything is built in (no download): a synthetic 10-class Gaussian mixture with overlapping
classes, and a GELU MLP trained on it for a few hundred Adam steps (seconds on a CPU). Then the
Hessian of the training loss over the whole training set is analysed by
:func:`hessfast.analyze.analyze`: the top eigenvalues and how many of them separate from the bulk
against the number of classes (a trained classifier's Hessian typically has about ``C − 1`` or
``C`` outliers for ``C`` classes), ``λ_min``, the condition number over the computed ends, the
trace, the spectral density, per-layer ``λ_max`` and trace, and the loss over the training set
along the top eigenvector beside its quadratic model ``L₀ + g t + ½λ_max t²`` (the landscape
panel, over ``±√(2L₀/λ_max)``, where ``½λ_max t²`` reaches the loss), and the Gauss-Newton
decomposition ``H = G + R`` (:func:`hessfast.decompose`: top eigenvalues of H, G and R, λ_min of H
and R, the three traces on shared probes, the overlap of H's and G's top eigenspaces, the three
densities). The first exact HVP is
checked and timed against ``torch.func.jvp(grad(loss))`` (forward-over-reverse autograd, median of
a few calls after a warm-up).

It prints a summary and writes ``report.json``, ``spectrum.png``, ``landscape_1d.png`` and
``decomposition.png`` into
``--out`` (default ``./hessfast-demo``). Exit code 0 when hessfast's HVP agrees with autograd (1 otherwise).
``--quick`` runs a smaller model and lighter analysis (a few seconds; the CI test).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from .analyze import analyze, check_out_folder, format_summary, version, write_report
from .api import hvp
from .operators import HessianOperator


@dataclass(frozen=True)
class Config:
    """Sizes of the demo: data, model, training and analysis."""

    dim: int
    width: int
    classes: int
    samples: int
    batch: int
    train_steps: int
    train_batch: int
    lr: float
    spread: float  # scale of the class centres; the noise is 1: smaller overlaps the classes more
    top_k: int
    trace_matvecs: int
    density_probes: int
    density_steps: int
    layer_steps: int


DEFAULT = Config(
    dim=32,
    width=64,
    classes=10,
    samples=2048,
    batch=512,
    train_steps=300,
    train_batch=128,
    lr=3e-3,
    spread=0.3,
    top_k=20,
    trace_matvecs=60,
    density_probes=6,
    density_steps=50,
    layer_steps=20,
)
QUICK = Config(
    dim=16,
    width=16,
    classes=10,
    samples=512,
    batch=256,
    train_steps=100,
    train_batch=128,
    lr=1e-2,
    spread=0.5,
    top_k=12,
    trace_matvecs=30,
    density_probes=4,
    density_steps=30,
    layer_steps=10,
)


def gaussian_mixture(n: int, dim: int = 32, classes: int = 10, seed: int = 0, spread: float = 3.0):
    """``n`` points from ``classes`` Gaussian blobs in ``dim`` dimensions: ``(x, y)``. The centres
    are ``spread × N(0, I)``, the points their centre plus ``N(0, I)``."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def build_mlp(dim: int = 32, width: int = 128, classes: int = 10, seed: int = 0) -> nn.Module:
    """A GELU MLP ``dim-width-width-classes``, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(dim, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, classes),
        )


@dataclass
class Setup:
    model: nn.Module
    data: list  # [(x, y)] batches on the device
    config: Config
    training: dict


def setup(
    quick: bool = False, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Setup:
    """The data and the trained model of the demo (deterministic for a given seed, device and
    dtype). The model is returned in eval mode."""
    cfg = QUICK if quick else DEFAULT
    dev = torch.device(device)
    x, y = gaussian_mixture(cfg.samples, cfg.dim, cfg.classes, seed=seed, spread=cfg.spread)
    x, y = x.to(dev, dtype), y.to(dev)
    model = build_mlp(cfg.dim, cfg.width, cfg.classes, seed=seed).to(dev, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.train_steps):
        idx = torch.randint(0, cfg.samples, (cfg.train_batch,), generator=g).to(dev)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        logits = model(x)
        train_loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).double().mean())
    data = [(x[a : a + cfg.batch], y[a : a + cfg.batch]) for a in range(0, cfg.samples, cfg.batch)]
    training = {
        "optimizer": "Adam",
        "lr": cfg.lr,
        "steps": cfg.train_steps,
        "batch_size": cfg.train_batch,
        "seconds": time.perf_counter() - t0,
        "loss": train_loss,
        "accuracy": acc,
    }
    return Setup(model, data, cfg, training)


def _median_time(fn, device: torch.device, repeats: int = 5) -> float:
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


def hvp_check(model: nn.Module, x, y, seed: int = 1) -> dict:
    """One exact HVP on the batch ``(x, y)`` by hessfast and by ``torch.func.jvp(grad(loss))``:
    relative error and median times."""
    dev = x.device
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(p.shape, generator=g).to(dev, p.dtype) for n, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def reference():
        return jvp(grad(loss), (params,), (v,))[1]

    def ours():
        return hvp(model, F.cross_entropy, x, y, v)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    first = ours()  # the first call captures the model with torch.export
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_first = time.perf_counter() - t
    with warnings.catch_warnings():  # torch.func.jvp's first call loads TorchScript decompositions
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        ref = reference()
    num = sum(float(((first[n] - ref[n]).double() ** 2).sum()) for n in params)
    den = sum(float((ref[n].double() ** 2).sum()) for n in params)
    err = (num / den) ** 0.5 if den > 0 else 0.0
    t_ours = _median_time(ours, dev)
    t_ref = _median_time(reference, dev)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    return {
        "batch_size": int(x.shape[0]),
        "relative_error": err,
        "tolerance": tol,
        "ok": err <= tol,
        "hessfast_seconds": t_ours,
        "torch_func_seconds": t_ref,
        "speedup": t_ref / t_ours if t_ours > 0 else None,
        "first_call_seconds": t_first,
    }


def run(
    out: str = "hessfast-demo",
    device: str = "cpu",
    quick: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    progress: bool | None = None,
    threads: int | None = None,
) -> int:
    """Run the demo; returns the process exit code (0: hessfast's HVP agrees with autograd and the
    report was written). ``threads``: torch's intra-op threads for the run (default on the CPU: 1 —
    the demo's matrices are small, and one thread keeps the run fast on a busy machine, where
    several threads that wait for each other make it many times slower)."""
    old = torch.get_num_threads()
    if threads is None and torch.device(device).type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(out, device, quick, seed, dtype, progress)
    finally:
        torch.set_num_threads(old)


def _run(out: str, device: str, quick: bool, seed: int, dtype: str, progress: bool | None) -> int:
    t0 = time.perf_counter()
    check_out_folder(out)  # UsageError now, not after the analysis
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    if progress is None:
        progress = sys.stderr.isatty()
    s = setup(quick, seed, device, dt)
    cfg, model, data = s.config, s.model, s.data
    P = sum(p.numel() for p in model.parameters())
    check = hvp_check(model, *data[0])
    H = HessianOperator(model, F.cross_entropy, data)
    arch = f"{cfg.dim}-{cfg.width}-{cfg.width}-{cfg.classes}"
    extra = {
        "command": "demo",
        "quick": quick,
        "seed": seed,
        "data": {
            "name": "synthetic Gaussian mixture",
            "classes": cfg.classes,
            "features": cfg.dim,
            "samples": cfg.samples,
            "batches": len(data),
            "batch_size": cfg.batch,
            "spread": cfg.spread,
        },
        "model": {"name": f"GELU MLP {arch}", "parameters": P, "mode": "eval"},
        "loss": "cross_entropy",
        "curvature": "hessian",
        "training": s.training,
        "hvp_check": check,
    }
    report = analyze(
        H,
        top_k=cfg.top_k,
        classes=cfg.classes,
        seed=seed,
        max_iter=400,
        trace_matvecs=cfg.trace_matvecs,
        density_probes=cfg.density_probes,
        density_steps=cfg.density_steps,
        layer_steps=cfg.layer_steps,
        landscape=1,
        decompose=True,
        progress=progress,
        extra=extra,
    )
    js, png = write_report(report, out)
    land = report["files"]["landscape"]
    dec = report["files"]["decomposition"]
    tr = s.training
    where = f"{dev}, {torch.get_num_threads()} thread(s)" if dev.type == "cpu" else str(dev)
    print(f"hessfast {version()} demo on {where}, {dtype}{', --quick' if quick else ''}")
    print(
        f"  data:  synthetic {cfg.classes}-class Gaussian mixture, {cfg.dim} features, "
        f"{cfg.samples:,} samples ({len(data)} batches of {cfg.batch})"
    )
    print(
        f"  model: GELU MLP {arch}, {P:,} parameters, trained {tr['steps']} Adam steps in "
        f"{tr['seconds']:.1f} s:\n    training loss {tr['loss']:.3f}, accuracy "
        f"{100 * tr['accuracy']:.1f}%"
    )
    print(
        f"  first exact HVP vs torch.func.jvp(grad) on a batch of {check['batch_size']}: relative "
        f"error {check['relative_error']:.1e} (tolerance {check['tolerance']:g})"
    )
    print(
        f"    time per call: hessfast {check['hessfast_seconds'] * 1e3:.2f} ms, torch.func "
        f"{check['torch_func_seconds'] * 1e3:.2f} ms ({check['speedup']:.2f}x);\n    the "
        f"first hessfast call, which captures the model, {check['first_call_seconds']:.2f} s"
    )
    print(format_summary(report))
    print(f"  wrote {js}, {png}, {land} and {dec} ({time.perf_counter() - t0:.1f} s in all)")
    if not check["ok"]:
        print("  MISMATCH: hessfast's HVP disagrees with autograd")
        return 1
    return 0
