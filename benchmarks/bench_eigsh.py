"""Top-10 Hessian eigenvalues: hessfast's block Lanczos against the tools people use today.

One model, one batch, one process, one device. The job: the 10 largest (algebraic) eigenvalues of
the Hessian of the mean cross-entropy over the batch, with

- ``hessfast``: ``HessianOperator`` + ``hessfast.eigsh(k=10, which="LA", tol=1e-6)``, with the
  default block size (``hessfast``) and with ``block_size=1`` (``hessfast-b1``);
- ``pyhessian``: PyHessian's ``hessian(...).eigenvalues(maxIter=100, tol=1e-3, top_n=10)``, power
  iteration with deflation: it finds the largest ``|λ|``, not the largest ``λ``, and its values
  are compared as returned (sorted descending);
- ``curvlinops``: ``HessianLinearOperator(...).to_scipy()`` + ``scipy.sparse.linalg.eigsh(k=10,
  which="LA", tol=1e-3)``; its construction runs its determinism check (two gradients, two
  products), which is part of what a user pays and of what can fail;
- ``eigenthings`` / ``eigenthings-50``: hessian-eigenthings' ``lanczos`` (``which="LA"``, the
  job; everything else at its defaults: ``max_iter = 2k = 20``, ``tol=1e-4``, full
  reorthogonalisation), and the same with ``max_iter=50``;
- ``func-arpack``: a ``torch.func`` forward-over-reverse HVP (``jvp(grad)``) + SciPy ``eigsh``
  (ARPACK), ``tol=1e-3``.

Reference, independent of all of them: SciPy ``eigsh(k=10, which="LA", tol=1e-10)`` on a float64
double-backward HVP of a float64 copy of the model (same device), its true relative residuals
``‖H v − λ v‖ / |λ|`` checked with 10 more products.

Per method: a warm-up product on the same batch first (not counted: hessfast captures its graph
there, the others warm their allocator), then one timed solve, operator construction included.
Products are counted and timed by wrapping each tool's own product function (CUDA-synchronised
around every product): PyHessian's module-level ``hessian_vector_product``, curvlinops'
``_matmat``, eigenthings' ``matvec``, hessfast's ``info.seconds_in_products``. "Elsewhere" is the
wall time minus the time in products (solver arithmetic, host transfers, SciPy, setup).
"grad-eq" is one product's mean time over the median time of one gradient (``autograd.grad`` of
the loss). Errors are ``|λ_i − λ_i^ref| / |λ_i^ref|`` with both lists sorted descending.

``--overhead`` measures something else: hessfast's ``eigsh`` on a wider MLP (P in the millions)
for a fixed number of Lanczos steps (``tol=0``), reporting ``info.seconds_elsewhere /
info.seconds_total``, the share of the time outside the products.

    python benchmarks/bench_eigsh.py --problem mlp --threads 2
    python benchmarks/bench_eigsh.py --problem cnn --device cuda \\
        --json benchmarks/results/h100-eigsh-cnn-<date>.json \\
        --markdown benchmarks/results/h100-eigsh-cnn-<date>.md
    python benchmarks/bench_eigsh.py --overhead --overhead-dims 784,1280,1280,10

``--race`` (below) is issue 14's race against ARPACK on the same operator; the rows are chosen by
``--race-methods``. One round of the three rows that matter (about 8 minutes on one CPU core,
the float64 ARPACK reference included; ``hessfast-b1-eig-ncv21`` adds about one more, and
separates the stopping test's share from the basis size's):

    python benchmarks/bench_eigsh.py --race --race-rounds 1 --threads 1 --verbose \
        --race-methods hessfast-b1,hessfast-b1-eig,arpack \
        --json benchmarks/results/cpu-eigsh-race-<date>.json \
        --markdown benchmarks/results/cpu-eigsh-race-<date>.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessfast
from hessfast import bench_models, zoo
from hessfast.bench import provenance, resolve_device, tf32, threads

K = 10
THRESHOLDS = (1e-2, 1e-4, 1e-6)
METHODS = (
    "hessfast",
    "hessfast-b1",
    "pyhessian",
    "curvlinops",
    "eigenthings",
    "eigenthings-50",
    "func-arpack",
)
PROBLEMS = {
    "mlp": (bench_models.mlp, "small", 512, "MLP 784-256-256-10, GELU"),
    "cnn": (
        bench_models.resnet18,
        "small",
        128,
        "ResNet-18 layout, width 16, 32x32 inputs, eval-mode BatchNorm",
    ),
}


# ------------------------------------------------------------------------------------ timing


class Clock:
    """Counts and times products through wrapped functions (CUDA-synchronised on GPU)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.products = 0
        self.seconds = 0.0

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def wrap(self, fn: Callable, columns: Callable[..., int] = lambda *a, **k: 1) -> Callable:
        def wrapped(*args, **kwargs):
            t = self.now()
            out = fn(*args, **kwargs)
            self.seconds += self.now() - t
            self.products += columns(*args, **kwargs)
            return out

        return wrapped


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip()


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def gradient_seconds(model, x, y, dev, repeats: int = 10) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    clock = Clock(dev)

    def g():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    for _ in range(2):
        g()
    times = []
    for _ in range(repeats):
        t = clock.now()
        g()
        times.append(clock.now() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------------- methods
#
# Each method: fn(model, x, y, dev, clock, opts) -> (eigenvalues, extra dict). It builds its
# operator, warms up with one product (before ``clock`` starts counting), and then runs the timed
# solve, calling ``opts["start"]()`` right before it. ``clock`` counts the timed products only.


def _flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def m_hessfast(block_size, basis_dtype=None):
    def run(model, x, y, dev, clock, opts):
        P = sum(p.numel() for p in _flat_params(model))
        H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
        g = torch.Generator().manual_seed(0)
        H.matmat(torch.randn(P, 1, generator=g).to(dev))  # warm-up: capture
        opts["start"]()
        H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
        evals, evecs, info = hessfast.eigsh(
            H,
            k=K,
            which="LA",
            tol=1e-6,
            block_size=block_size,
            basis_dtype=basis_dtype,
            return_info=True,
            warn=False,
        )
        clock.products, clock.seconds = info.products, info.seconds_in_products
        extra = {
            "settings": f"k={K}, which=LA, tol=1e-6, block_size={info.block_size}"
            + (f", basis_dtype={basis_dtype}" if basis_dtype else ""),
            "iterations": info.iterations,
            "restarts": info.restarts,
            "converged": info.converged,
            "eigsh_seconds_total": info.seconds_total,
            "eigsh_seconds_elsewhere": info.seconds_elsewhere,
            "max_residual": float(info.residuals.max()),
            "note": f"b={info.block_size}, {info.iterations} steps, {info.restarts} restarts, "
            + ("converged" if info.converged else "**not converged**"),
            "_vectors": (evals, evecs),  # for --check-vectors, not written out
        }
        return sorted((float(v) for v in evals), reverse=True), extra

    return run


def m_pyhessian(model, x, y, dev, clock, opts):
    import pyhessian  # noqa: F401  (registers the module)

    mod = sys.modules["pyhessian.hessian"]  # ``pyhessian.hessian`` is the class
    criterion = nn.CrossEntropyLoss()
    cuda = dev.type == "cuda"
    _clear_grads(model)
    hc = mod.hessian(model, criterion, data=(x, y), cuda=cuda)  # warm-up
    v = [torch.randn_like(p) for p in hc.params]
    mod.hessian_vector_product(hc.gradsH, hc.params, v)
    del hc, v
    _clear_grads(model)
    orig = mod.hessian_vector_product
    mod.hessian_vector_product = clock.wrap(orig)
    max_iter = opts["pyhessian_max_iter"]
    try:
        torch.manual_seed(0)
        opts["start"]()
        hc = mod.hessian(model, criterion, data=(x, y), cuda=cuda)
        evals, _ = hc.eigenvalues(maxIter=max_iter, tol=1e-3, top_n=K)
    finally:
        mod.hessian_vector_product = orig
        _clear_grads(model)  # PyHessian leaves graph-carrying .grad on the parameters
    negative = sum(1 for e in evals if e < 0)
    note = f"maxIter={max_iter}, tol=1e-3; finds the largest |λ|"
    if negative:
        note += f"; {negative} of its values are negative"
    return sorted(evals, reverse=True), {
        "settings": f"maxIter={max_iter}, tol=1e-3, top_n={K}",
        "returned_order": list(evals),
        "note": note,
    }


def m_curvlinops(model, x, y, dev, clock, opts):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    class Counted(HessianLinearOperator):
        hook = None  # (matmat, M) -> result; set once the timed solve starts

        def _matmat(self, M):
            f = super()._matmat
            return f(M) if Counted.hook is None else Counted.hook(f, M)

    params = _flat_params(model)
    data = [(x, y)]
    loss = nn.CrossEntropyLoss()
    warm = Counted(model, loss, params, data, check_deterministic=False)
    warm @ torch.randn(warm.shape[1], device=dev)  # warm-up, not counted
    del warm
    Counted.hook = clock.wrap(lambda f, M: f(M), lambda f, M: M[0].shape[-1])
    opts["start"]()
    op = Counted(model, loss, params, data)  # runs its determinism check
    check_products = clock.products
    evals, _ = eigsh(op.to_scipy(), k=K, which="LA", tol=1e-3)
    return sorted((float(e) for e in evals), reverse=True), {
        "settings": "HessianLinearOperator(check_deterministic=True).to_scipy(); scipy eigsh "
        f"k={K}, which=LA, tol=1e-3",
        "check_products": check_products,
        "note": f"tol=1e-3; {check_products} of the products in its determinism check",
    }


def m_eigenthings(steps):
    def run(model, x, y, dev, clock, opts):
        from hessian_eigenthings import HessianOperator, lanczos, supervised_loss

        data = [(x, y)]
        op = HessianOperator(model, data, supervised_loss(F.cross_entropy))
        op.matvec(torch.randn(op.size, device=dev))  # warm-up
        opts["start"]()
        op = HessianOperator(model, data, supervised_loss(F.cross_entropy))
        op.matvec = clock.wrap(op.matvec)
        kw = {} if steps is None else {"max_iter": steps}
        res = lanczos(op, k=K, which="LA", seed=0, **kw)
        n_conv = int(res.converged.sum())
        return sorted((float(e) for e in res.eigenvalues), reverse=True), {
            "settings": f"lanczos(k={K}, which=LA, seed=0"
            + (f", max_iter={steps})" if steps else "), defaults otherwise"),
            "iterations": res.iterations,
            "converged": n_conv == K,
            "note": f"{res.iterations} steps, {n_conv}/{K} flagged converged (its tol 1e-4)",
        }

    return run


def _functional_hvp(model: nn.Module, x, y, dtype: torch.dtype | None = None):
    """``(P, hvp(flat) -> flat)``: forward-over-reverse ``torch.func`` HVP of the batch loss."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grad = torch.func.grad(loss)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(v, sizes)
        tang = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        _, out = torch.func.jvp(grad, (params,), (tang,))
        return torch.cat([out[n].reshape(-1) for n in names])

    return sum(sizes), hvp


def _scipy_operator(P: int, hvp: Callable, dev, dtype):
    from scipy.sparse.linalg import LinearOperator

    def mv(v):
        t = torch.as_tensor(np.asarray(v).reshape(-1)).to(dev, dtype)
        return hvp(t).to("cpu", torch.float64).numpy()

    return LinearOperator((P, P), matvec=mv, rmatvec=mv, dtype=np.float64)


def m_func_arpack(model, x, y, dev, clock, opts):
    from scipy.sparse.linalg import eigsh

    P, hvp = _functional_hvp(model, x, y)
    hvp(torch.randn(P, device=dev))  # warm-up
    opts["start"]()
    P, hvp = _functional_hvp(model, x, y)
    A = _scipy_operator(P, clock.wrap(hvp), dev, torch.float32)
    evals, _ = eigsh(A, k=K, which="LA", tol=1e-3)
    return sorted((float(e) for e in evals), reverse=True), {
        "settings": f"torch.func jvp(grad) HVP, scipy eigsh k={K}, which=LA, tol=1e-3",
        "note": "tol=1e-3",
    }


RUNNERS = {
    "hessfast": m_hessfast(None),
    "hessfast-b1": m_hessfast(1),
    "pyhessian": m_pyhessian,
    "curvlinops": m_curvlinops,
    "eigenthings": m_eigenthings(None),
    "eigenthings-50": m_eigenthings(50),
    "func-arpack": m_func_arpack,
    "hessfast-f64basis": m_hessfast(None, torch.float64),
}
#: opt-in rows (``--extra``), not run by default
EXTRA = ("hessfast-f64basis",)
LABELS = {
    "hessfast": "hessfast eigsh, default block size",
    "hessfast-b1": "hessfast eigsh, block_size=1",
    "pyhessian": "PyHessian (power iteration + deflation)",
    "curvlinops": "curvlinops + SciPy eigsh",
    "eigenthings": "hessian-eigenthings Lanczos, default 20 steps",
    "eigenthings-50": "hessian-eigenthings Lanczos, 50 steps",
    "func-arpack": "torch.func HVP + SciPy eigsh (ARPACK), tol 1e-3",
    "hessfast-f64basis": "hessfast eigsh, default block size, float64 basis",
}


# ------------------------------------------------------------------------------- reference


def reference(model, x, y, dev, tol: float) -> dict:
    """Top-K by ARPACK at ``tol`` on a float64 double-backward HVP of a float64 copy."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    m64 = copy.deepcopy(model).to(torch.float64)
    x64 = x.to(torch.float64)
    params = [p for p in m64.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    P = sum(sizes)
    clock = Clock(dev)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        g = torch.autograd.grad(F.cross_entropy(m64(x64), y), params, create_graph=True)
        vs = [c.view_as(p) for c, p in zip(torch.split(v, sizes), params)]
        hv = torch.autograd.grad(g, params, grad_outputs=vs)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    timed = clock.wrap(hvp)

    def mv(v):
        return timed(torch.as_tensor(np.asarray(v).reshape(-1)).to(dev)).cpu().numpy()

    A = LinearOperator((P, P), matvec=mv, rmatvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(P)
    t = clock.now()
    evals, evecs = eigsh(A, k=K, which="LA", tol=tol, v0=v0)
    seconds = clock.now() - t
    products = clock.products
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    rel_res = []
    for i in range(K):
        v = evecs[:, i]
        r = mv(v) - evals[i] * v
        rel_res.append(float(np.linalg.norm(r) / abs(evals[i])))
    return {
        "_hvp": hvp,  # float64 products for --check-vectors, not written out
        "eigenvalues": [float(e) for e in evals],
        "products": products,
        "seconds": seconds,
        "seconds_in_products": clock.seconds,
        "max_relative_residual": max(rel_res),
        "relative_residuals": rel_res,
        "how": f"scipy eigsh k={K}, which=LA, tol={tol:g}, fixed v0; float64 double-backward HVP "
        "of a float64 copy of the model",
    }


# ---------------------------------------------------------------------------------- runner


def run_method(key, model, x, y, dev, grad_s, ref, opts) -> dict:
    clock = Clock(dev)
    t0 = [None]

    def start():
        t0[0] = clock.now()

    row = {"method": key, "label": LABELS[key], "status": "ok", "error": None}
    o = dict(opts, start=start)
    torch.manual_seed(0)
    try:
        evals, extra = RUNNERS[key](model, x, y, dev, clock, o)
        wall = clock.now() - t0[0]
        row.update(extra)
    except Exception as e:  # a failing tool is a result
        wall = clock.now() - t0[0] if t0[0] is not None else None
        row.update(status="failed", error=_error(e), traceback=traceback.format_exc())
        evals = None
    finally:
        _clear_grads(model)
    row.update(products=clock.products, wall_s=wall, seconds_in_products=clock.seconds)
    if wall is not None:
        row["seconds_elsewhere"] = wall - clock.seconds
        row["share_elsewhere"] = (wall - clock.seconds) / wall if wall > 0 else None
    if clock.products:
        row["product_s"] = clock.seconds / clock.products
        row["grad_eq"] = row["product_s"] / grad_s
    if evals is not None:
        row["eigenvalues"] = evals
        if ref is not None:
            r = ref["eigenvalues"]
            errs = [abs(a - b) / abs(b) for a, b in zip(evals, r)]
            row["relative_errors"] = errs
            row["max_rel_error"] = max(errs)
            row["within"] = {f"{t:g}": sum(1 for e in errs if e <= t) for t in THRESHOLDS}
    vectors = row.pop("_vectors", None)
    if vectors is not None and ref is not None and opts.get("check_vectors"):
        row.update(check_vectors(*vectors, ref))
        row["note"] += (
            f"; true residual ≤ {row['true_max_rel_residual']:.1e}, "
            f"float64 Rayleigh quotients' error {row['rayleigh_max_rel_error']:.1e}"
        )
    return row


def check_vectors(evals, evecs, ref) -> dict:
    """hessfast's returned pairs against the float64 Hessian (``--check-vectors``, after the
    timed solve, not counted): true relative residuals ``‖H y − θ y‖ / |θ|`` and the error of
    the float64 Rayleigh quotients ``yᵀ H y / yᵀ y`` of its vectors."""
    Y = evecs.to(torch.float64)
    Y = Y / Y.norm(dim=0)
    HY = torch.stack([ref["_hvp"](Y[:, i]) for i in range(Y.shape[1])], 1)
    theta = evals.to(Y.device, torch.float64)
    res = ((HY - Y * theta).norm(dim=0) / theta.abs()).tolist()
    rq = sorted((Y * HY).sum(0).tolist(), reverse=True)
    errs = [abs(a - b) / abs(b) for a, b in zip(rq, ref["eigenvalues"])]
    return {
        "true_rel_residuals": res,
        "true_max_rel_residual": max(res),
        "rayleigh_quotients": rq,
        "rayleigh_max_rel_error": max(errs),
    }


# -------------------------------------------------------------------------------- rendering


def _s(x) -> str:
    if x is None:
        return "—"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def _e(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def render_table(res: dict) -> str:
    lines = [
        "| method | HVPs | wall | in products / elsewhere (share elsewhere) | one HVP / one "
        "gradient | max rel. error | within 1e-2 / 1e-4 / 1e-6 | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["methods"]:
        if r["status"] == "skipped":
            lines.append(f"| {r['label']} | — | — | — | — | skipped | — | |")
            continue
        if r["status"] == "failed":
            ge = f"{r['grad_eq']:.1f}×" if r.get("grad_eq") else "—"
            lines.append(
                f"| {r['label']} | {r['products'] or '—'} | {_s(r['wall_s'])} (until it failed) "
                f"| — | {ge} | **fails**: {r['error']} | — | |"
            )
            continue
        w = r.get("within") or {}
        within = " / ".join(str(w.get(f"{t:g}", "—")) for t in THRESHOLDS)
        split = (
            f"{_s(r['seconds_in_products'])} / {_s(r['seconds_elsewhere'])} "
            f"({100 * r['share_elsewhere']:.0f}%)"
        )
        ge = f"{r['grad_eq']:.1f}×" if r.get("grad_eq") else "—"
        note = r.get("note", "").replace("|", "\\|")  # a table cell
        lines.append(
            f"| {r['label']} | {r['products']} | {_s(r['wall_s'])} | {split} | {ge} | "
            f"{_e(r.get('max_rel_error'))} | {within} | {note} |"
        )
    ref = res.get("reference")
    if ref:
        lines.append(
            f"| reference: SciPy eigsh tol 1e-10, float64 double backward | {ref['products']} | "
            f"{_s(ref['seconds'])} | — | — | (max rel. residual "
            f"{ref['max_relative_residual']:.1e}) | — | |"
        )
    return "\n".join(lines)


def _load(la) -> str:
    return ", ".join(f"{a:.1f}" for a in la) if la else "n/a"


def render(res: dict) -> str:
    p = res["provenance"]
    pr = res["problem"]
    out = [
        f"# Top-{K} Hessian eigenvalues, {pr['name']} problem, {p['device']} ({p['date']})",
        "",
        f"Command: `{p['command']}`",
        "",
        f"Machine: {p['device']} ({p['device_type']}, {p['cpu_threads']} torch threads), "
        f"load average {_load(p['load_average'])} at the start, {_load(res.get('load_average_end'))} "
        "at the end. "
        f"hessfast {p['hessfast']} (commit {p['commit']}), torch {p['torch']}, CUDA {p['cuda']}, "
        f"Python {p['python']}, SciPy {p['scipy']}, NumPy {p['numpy']}, PyHessian "
        f"{p['peers'].get('pyhessian')}, curvlinops-for-pytorch {p['peers'].get('curvlinops')}, "
        f"hessian-eigenthings {p['peers'].get('hessian_eigenthings')}; {p['dtype']}, TF32 off.",
        "",
        "<!-- reading -->",
        "",
        f"Problem: {pr['description']}, batch {pr['batch_size']}, {pr['parameters']:,} parameters, "
        f"mean cross-entropy, eval mode, random init (seed 0). One gradient: "
        f"{res['gradient_s'] * 1e3:.2f} ms (median of 10). Reference: {res['reference']['how']}"
        f" — {res['reference']['products']} products, {_s(res['reference']['seconds'])}; top "
        f"eigenvalue {res['reference']['eigenvalues'][0]:.6g}, 10th "
        f"{res['reference']['eigenvalues'][-1]:.6g}."
        if res.get("reference")
        else "No reference (skipped): no errors.",
        "",
        render_table(res),
    ]
    fails = [r for r in res["methods"] if r["status"] == "failed"]
    if fails:
        out += ["", "Failures:"]
        out += [f"- {r['label']}: `{r['error']}`" for r in fails]
    out += [
        "",
        "Wall: one solve after a warm-up product, operator construction included. HVPs: products "
        "the solve made (columns, for hessfast's blocks), checks included. Elsewhere: wall minus "
        "the time in products. One HVP / one gradient: mean product time over the gradient's "
        "time. Errors: |λ_i − λ_i^ref| / |λ_i^ref|, both lists sorted descending.",
    ]
    return "\n".join(out) + "\n"


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for mod, dist in (
        ("pyhessian", "pyhessian"),
        ("curvlinops", "curvlinops-for-pytorch"),
        ("hessian_eigenthings", "hessian-eigenthings"),
    ):
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[mod] = None
    return out


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _provenance(dev, args) -> dict:
    import scipy

    p = provenance(dev, "float32")
    p.update(
        tf32=False,
        scipy=scipy.__version__,
        numpy=np.__version__,
        peers=_versions(),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        argv=sys.argv[1:],
    )
    return p


# ---------------------------------------------------------------------------------- problems


def run_problem(args, dev) -> dict:
    builder, size, batch, desc = PROBLEMS[args.problem]
    batch = args.batch_size or batch
    model, _, inputs, y = builder(size=size, device=dev, batch_size=batch, seed=0)
    x = inputs[0]
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log = print if args.verbose else (lambda *a, **k: None)
    log(f"{args.problem}: {desc}, batch {batch}, P={P:,}", file=sys.stderr)
    res = {
        "problem": {
            "name": args.problem,
            "description": desc,
            "batch_size": batch,
            "parameters": P,
        },
        "k": K,
    }
    grad_s = gradient_seconds(model, x, y, dev)
    res["gradient_s"] = grad_s
    log(f"  gradient {grad_s * 1e3:.2f} ms", file=sys.stderr)
    ref = None
    if "reference" not in args.skip:
        t = time.perf_counter()
        ref = reference(model, x, y, dev, args.reference_tol)
        log(
            f"  reference: {ref['products']} products, {time.perf_counter() - t:.1f} s, "
            f"max rel. residual {ref['max_relative_residual']:.1e}",
            file=sys.stderr,
        )
    res["reference"] = ref
    opts = {"pyhessian_max_iter": args.pyhessian_max_iter, "check_vectors": args.check_vectors}
    rows = []
    for key in METHODS + tuple(e for e in EXTRA if e in args.extra):
        if key in args.skip:
            rows.append({"method": key, "label": LABELS[key], "status": "skipped"})
            continue
        row = run_method(key, model, x, y, dev, grad_s, ref, opts)
        rows.append(row)
        log(
            f"  {key}: {row['status']}, {row['products']} products, {_s(row['wall_s'])}, "
            f"max rel. error {_e(row.get('max_rel_error'))}"
            + (f" — {row['error']}" if row["error"] else ""),
            file=sys.stderr,
        )
    res["methods"] = rows
    return res


def run_overhead(args, dev) -> dict:
    batches = [int(b) for b in str(args.overhead_batch).split(",")]
    out = [_overhead_one(args, dev, batch) for batch in batches]
    return {"overhead": out[0], "overheads": out}


#: ``--overhead-blocks 1-floor``: block size 1 with the older basis never read (a lower bound on
#: a step's work outside the product: the local projection, norms, the normalisation, ``T``'s
#: eigenpairs and the restarts; the eigenvalues it returns are not checked and do not matter)
FLOOR = "-floor"


@contextlib.contextmanager
def _older_basis_never_read(on: bool):
    if not on:
        yield
        return
    from hessfast.algorithms import lanczos

    estimate = lanczos._Omega.estimate

    def zero(self, *a):
        return estimate(self, *a).zero_()

    lanczos._Omega.estimate = zero
    try:
        yield
    finally:
        lanczos._Omega.estimate = estimate


def _overhead_one(args, dev, batch) -> dict:
    dims = [int(d) for d in args.overhead_dims.split(",")]
    torch.manual_seed(0)
    model = zoo.mlp_model(dims).to(dev).eval()
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(batch, dims[0], generator=g).to(dev)
    y = torch.randint(0, dims[-1], (batch,), generator=g).to(dev)
    P = sum(p.numel() for p in model.parameters())
    H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    blocks = [s.strip() for s in args.overhead_blocks.split(",")]
    for K_ in {1, 2, *(int(b.removesuffix(FLOOR)) for b in blocks)}:
        for _ in range(3):  # capture and trace every width the runs use
            H.matmat(torch.randn(P, K_, device=dev))
    grad_s = gradient_seconds(model, x, y, dev, repeats=5)
    rows = []
    for blk in blocks:
        b = int(blk.removesuffix(FLOOR))
        # the same product budget for every block size: steps x 8 columns
        max_iter = args.overhead_steps * 8 // b
        with _older_basis_never_read(blk.endswith(FLOOR)):
            _, _, info = hessfast.eigsh(
                H,
                k=K,
                which="LA",
                tol=0.0,
                block_size=b,
                max_iter=max_iter,
                return_info=True,
                warn=False,
            )
        rows.append(
            {
                "batch": batch,
                "block": blk,
                "block_size": info.block_size,
                "block_choice": info.block_choice,
                "ncv": info.ncv,
                "steps": info.iterations,
                "restarts": info.restarts,
                "products": info.products,
                "basis_bytes": info.basis_bytes,
                "seconds_total": info.seconds_total,
                "seconds_in_products": info.seconds_in_products,
                "seconds_elsewhere": info.seconds_elsewhere,
                "share_elsewhere": info.seconds_elsewhere / info.seconds_total,
                "product_s": info.seconds_in_products / info.products,
                "grad_eq": info.seconds_in_products / info.products / grad_s,
                "reorthogonalizations": info.reorthogonalizations,
                "partial_reorthogonalizations": info.partial_reorthogonalizations,
            }
        )
    return {
        "model": f"MLP {'-'.join(map(str, dims))}, GELU",
        "batch": batch,
        "parameters": P,
        "k": K,
        "gradient_s": grad_s,
        "rows": rows,
    }


def render_overhead(res: dict) -> str:
    p, o = res["provenance"], res["overhead"]
    rows = [r for ov in res.get("overheads", [o]) for r in ov["rows"]]
    lines = [
        f"# hessfast eigsh: time outside the products, {p['device']} ({p['date']})",
        "",
        f"Command: `{p['command']}`",
        "",
        f"Machine: {p['device']} ({p['device_type']}, {p['cpu_threads']} torch threads), load "
        f"average {_load(p['load_average'])} at the start; hessfast {p['hessfast']} (commit "
        f"{p['commit']}), torch {p['torch']}; float32.",
        "",
        "<!-- reading -->",
        "",
        f"{o['model']}, P = {o['parameters']:,}; eigsh k={o['k']}, which=LA, tol=0 (never "
        "converges: a fixed budget of products), every width captured and traced beforehand.",
        "",
        "| batch | block size | products | steps | restarts | ncv | basis | total | in products "
        "| elsewhere | share elsewhere | one HVP / one gradient |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        how = f"{r['block_size']}" + (
            " (older basis never read)" if r["block"].endswith(FLOOR) else ""
        )
        lines.append(
            f"| {r['batch']} | {how} | {r['products']} | {r['steps']} | {r['restarts']} | {r['ncv']} | "
            f"{r['basis_bytes'] / 2**20:.0f} MiB | {_s(r['seconds_total'])} | "
            f"{_s(r['seconds_in_products'])} | {_s(r['seconds_elsewhere'])} | "
            f"{100 * r['share_elsewhere']:.1f}% | {r['grad_eq']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ race
#
# ``--race``: hessfast.eigsh against SciPy's ARPACK on ``H.to_scipy()`` of the *same* hessfast
# operator (and the peers that are installed), float64 models, the top 10 against a reference
# computed once (ARPACK, tol 1e-12, same operator). Every timed solve starts from a fresh operator
# whose product widths (1, 2, 8) were traced beforehand (hessfast traces a width on its second
# product; the one-time costs are reported apart); methods run in interleaved rounds and the
# median wall time is reported. ``--density`` adds the spectral-density race.


def _untuned_vgg(size, device, batch_size, seed):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from untuned_models import vgg_bn

    model, lf, inputs, y = vgg_bn(seed=seed)
    return model.to(device), lf, tuple(t.to(device) for t in inputs), y.to(device)


RACE_PROBLEMS = {
    "cnn": (bench_models.resnet18, "tiny", 8, "ResNet-18 layout, width 8, 32x32, eval BN"),
    "mlp": (bench_models.mlp, "small", 128, "MLP 784-256-256-10, GELU"),
    "vgg": (_untuned_vgg, None, 16, "untuned: VGG-style CNN with BatchNorm (eval), max pool"),
}
#: hessfast rows: (block_size, criterion, ncv)
RACE_HESSFAST = {
    "hessfast": (None, "residual", None),
    "hessfast-b1": (1, "residual", None),
    "hessfast-b8": (8, "residual", None),
    "hessfast-eig": (None, "eigenvalue", None),
    "hessfast-b1-eig": (1, "eigenvalue", None),
    "hessfast-b1-eig-ncv21": (1, "eigenvalue", 2 * K + 1),
    # no restart (a basis of 400 vectors): the fewest products a Krylov method of that block
    # size needs here, the floor under any restart strategy
    "hessfast-b1-eig-full": (1, "eigenvalue", 400),
    "hessfast-b8-eig-full": (8, "eigenvalue", 400),
}
RACE_METHODS = (*RACE_HESSFAST, "arpack", "arpack-1e-3", "pyhessian")
RACE_LABELS = {
    "hessfast": "hessfast.eigsh, block_size=None (measured), tol 1e-6",
    "hessfast-b1": "hessfast.eigsh, block_size=1, tol 1e-6",
    "hessfast-b8": "hessfast.eigsh, block_size=8, tol 1e-6",
    "hessfast-eig": "hessfast.eigsh, block_size=None (measured), criterion='eigenvalue', tol 1e-6",
    "hessfast-b1-eig": "hessfast.eigsh, block_size=1, criterion='eigenvalue', tol 1e-6",
    "hessfast-b1-eig-ncv21": "hessfast.eigsh, block_size=1, criterion='eigenvalue', tol 1e-6, "
    "ncv=21 (ARPACK's)",
    "hessfast-b1-eig-full": "hessfast.eigsh, block_size=1, criterion='eigenvalue', tol 1e-6, "
    "ncv=400 (no restart)",
    "hessfast-b8-eig-full": "hessfast.eigsh, block_size=8, criterion='eigenvalue', tol 1e-6, "
    "ncv=400 (no restart)",
    "arpack": "SciPy eigsh (ARPACK) on H.to_scipy(), tol 1e-6",
    "arpack-1e-3": "SciPy eigsh (ARPACK) on H.to_scipy(), tol 1e-3",
    "pyhessian": "PyHessian (power iteration + deflation), maxIter 100, tol 1e-3",
    "curvlinops": "curvlinops + SciPy eigsh",
    "eigenthings": "hessian-eigenthings Lanczos",
}


def _race_problem(key, dev):
    builder, size, batch, desc = RACE_PROBLEMS[key]
    model, _, inputs, y = builder(size=size, device=dev, batch_size=batch, seed=0)
    model = model.to(torch.float64).eval()
    x = inputs[0]
    x = x.to(torch.float64) if x.is_floating_point() else x
    return model, x, y, desc


def _race_operator(model, x, y):
    return hessfast.HessianOperator(model, F.cross_entropy, (x, y))


def _race_run(key, model, x, y, dev, v0):
    """One timed solve: ``(sorted eigenvalues, products, wall, seconds in products, note)``."""
    from scipy.sparse.linalg import eigsh as arpack

    clock = Clock(dev)
    t0 = clock.now()
    if key.startswith("hessfast"):
        b, criterion, ncv = RACE_HESSFAST[key]
        H = _race_operator(model, x, y)
        ev, _, info = hessfast.eigsh(
            H,
            k=K,
            which="LA",
            tol=1e-6,
            block_size=b,
            criterion=criterion,
            ncv=ncv,
            return_info=True,
            warn=False,
        )
        wall = clock.now() - t0
        ch = info.block_choice
        note = (
            f"b={info.block_size}, ncv={info.ncv}, {info.iterations} steps, "
            f"{info.restarts} restarts, {info.seconds_elsewhere:.2f} s outside products"
        )
        if ch.get("how") == "measured":
            curve = ", ".join(f"t({c})={v * 1e3:.0f} ms" for c, v in ch["curve"].items())
            note += f"; measured {curve}"
        note += "" if info.converged else ", **not converged**"
        vals = sorted((float(v) for v in ev), reverse=True)
        extra = {
            "block_size": info.block_size,
            "block_choice": ch,
            "seconds_total": info.seconds_total,
            "criterion": criterion,
            "ncv": info.ncv,
            "max_eigenvalue_bound": float(info.eigenvalue_bounds.max()),
        }
        return vals, info.products, wall, info.seconds_in_products, note, extra
    if key.startswith("arpack"):
        tol = 1e-6 if key == "arpack" else 1e-3
        H = _race_operator(model, x, y)
        H.matmat = clock.wrap(H.matmat, lambda V: V.shape[1])
        ev, _ = arpack(H.to_scipy(), k=K, which="LA", tol=tol, v0=v0)
        wall = clock.now() - t0
        vals = sorted((float(v) for v in ev), reverse=True)
        return vals, clock.products, wall, clock.seconds, f"tol={tol:g}, ncv default (2k+1)", {}
    if key == "pyhessian":
        import pyhessian  # noqa: F401

        mod = sys.modules["pyhessian.hessian"]
        orig = mod.hessian_vector_product
        mod.hessian_vector_product = clock.wrap(orig)
        try:
            torch.manual_seed(0)
            hc = mod.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
            ev, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=K)
        finally:
            mod.hessian_vector_product = orig
            _clear_grads(model)
        wall = clock.now() - t0
        neg = sum(1 for e in ev if e < 0)
        note = "finds the largest |λ|" + (f"; {neg} of its values negative" if neg else "")
        return sorted(ev, reverse=True), clock.products, wall, clock.seconds, note, {}
    raise KeyError(key)


def run_race(args, dev) -> dict:
    from scipy.sparse.linalg import eigsh as arpack

    log = print if args.verbose else (lambda *a, **k: None)
    out = {"problems": []}
    for pkey in [k_ for k_ in args.race_problems.split(",") if k_]:
        model, x, y, desc = _race_problem(pkey, dev)
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        v0 = np.random.default_rng(0).standard_normal(P)
        # one-time costs: capture and the traces of widths 1, 2 (the symmetry probe) and 8
        H = _race_operator(model, x, y)
        warm = {}
        for K_ in (1, 2, 8):
            V = torch.randn(P, K_, dtype=torch.float64, device=dev)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                H.matmat(V)
                times.append(time.perf_counter() - t)
            warm[K_] = times
        t = time.perf_counter()
        ref_ev = arpack(H.to_scipy(), k=K, which="LA", tol=1e-12, v0=v0)[0]
        ref = sorted((float(v) for v in ref_ev), reverse=True)
        ref_s = time.perf_counter() - t
        log(f"{pkey}: P={P:,}, reference {ref_s:.1f} s; warm-up {warm}", file=sys.stderr)
        methods = [m for m in args.race_methods if m not in args.skip]
        runs: dict[str, list] = {m: [] for m in methods}
        for r in range(args.race_rounds):
            for m in methods:
                if m == "pyhessian" and r > 0:
                    continue  # one PyHessian solve: it is slow and never the contender
                try:
                    res = _race_run(m, model, x, y, dev, v0)
                except ImportError as e:
                    runs[m].append(("failed", _error(e)))
                    continue
                runs[m].append(res)
                log(f"  {m}: {res[1]} products, {res[2]:.2f} s", file=sys.stderr)
        rows = []
        for m in methods:
            ok = [r for r in runs[m] if r[0] != "failed"]
            if not ok:
                rows.append(
                    {
                        "method": m,
                        "label": RACE_LABELS[m],
                        "status": "failed",
                        "error": runs[m][0][1] if runs[m] else "not run",
                    }
                )
                continue
            walls = [r[2] for r in ok]
            med = ok[int(np.argsort(walls)[len(walls) // 2])]
            vals, prods, wall, inprod, note, extra = med
            errs = [abs(a - b) / abs(b) for a, b in zip(vals, ref)]
            rows.append(
                {
                    "method": m,
                    "label": RACE_LABELS[m],
                    "status": "ok",
                    "products": prods,
                    "wall_s": wall,
                    "walls": walls,
                    "seconds_in_products": inprod,
                    "max_rel_error": max(errs),
                    "within_1e-6": sum(e <= 1e-6 for e in errs),
                    "note": note,
                    **{k: v for k, v in extra.items() if k != "seconds_total"},
                }
            )
        for peer in ("curvlinops", "eigenthings"):
            mod = "curvlinops" if peer == "curvlinops" else "hessian_eigenthings"
            try:
                __import__(mod)
            except ImportError:
                rows.append(
                    {
                        "method": peer,
                        "label": RACE_LABELS[peer],
                        "status": "skipped",
                        "error": f"{mod} is not installed",
                    }
                )
        base = next(
            (r["wall_s"] for r in rows if r["method"] == "arpack" and r["status"] == "ok"), None
        )
        for r in rows:
            if base and r.get("wall_s"):
                r["vs_arpack"] = r["wall_s"] / base
        out["problems"].append(
            {
                "name": pkey,
                "description": desc,
                "parameters": P,
                "batch": int(y.shape[0]),
                "reference": {
                    "eigenvalues": ref,
                    "seconds": ref_s,
                    "how": "ARPACK k=10, which=LA, tol=1e-12 on the same float64 operator",
                },
                "warmup_seconds": warm,
                "rows": rows,
            }
        )
    if args.density:
        out["density"] = run_density_race(args, dev)
    return out


def _density_model(dev):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 6)
    ).to(dev, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 24, generator=g, dtype=torch.float64).to(dev)
    y = torch.randint(0, 6, (256,), generator=g).to(dev)
    return model, x, y


def run_density_race(args, dev) -> dict:
    """SLQ (``spectral_density`` at its defaults) against the density of the exact eigenvalues
    (dense Hessian from P unit-vector products in blocks of 256, ``eigvalsh``), both broadened by
    the same Gaussian on the same grid; error: L1 distance of the two densities."""
    from hessfast.algorithms.slq import gaussians

    model, x, y = _density_model(dev)
    P = sum(p.numel() for p in model.parameters())
    H = _race_operator(model, x, y)
    for K_ in (2, 16, 256):  # traces: symmetry probe, SLQ probes, dense blocks
        for _ in range(2):
            H.matmat(torch.randn(P, K_, dtype=torch.float64, device=dev))
    rows = {"slq": [], "dense": []}
    dens = {}
    for _ in range(args.race_rounds):
        t = time.perf_counter()
        Hs = _race_operator(model, x, y)
        d = hessfast.spectral_density(Hs)
        rows["slq"].append(time.perf_counter() - t)
        dens["slq"] = d
        t = time.perf_counter()
        Hd = _race_operator(model, x, y)
        cols = []
        for a in range(0, P, 256):
            E = torch.zeros(P, min(256, P - a), dtype=torch.float64, device=dev)
            E[a + torch.arange(E.shape[1]), torch.arange(E.shape[1])] = 1
            cols.append(Hd.matmat(E))
        M = torch.cat(cols, 1)
        lam = torch.linalg.eigvalsh((M + M.T) / 2).cpu().numpy()
        rows["dense"].append(time.perf_counter() - t)
        dens["dense"] = lam
    d, lam = dens["slq"], dens["dense"]
    grid = d.grid
    exact = gaussians(grid, lam, np.full(lam.size, 1.0 / lam.size), d.sigma)
    exact = exact / np.trapezoid(exact, grid)
    l1 = float(np.trapezoid(np.abs(d.values - exact), grid))
    top_err = abs(d.lambda_max - lam.max()) / abs(lam.max())
    slq_s, dense_s = statistics.median(rows["slq"]), statistics.median(rows["dense"])
    return {
        "model": "MLP 24-48-48-6, tanh, batch 256, float64",
        "parameters": P,
        "slq": {
            "settings": "spectral_density defaults: 16 probes x 80 steps",
            "wall_s": slq_s,
            "walls": rows["slq"],
            "products": 16 * 80,
        },
        "dense": {"wall_s": dense_s, "walls": rows["dense"], "products": P},
        "ratio": slq_s / dense_s,
        "l1_distance": l1,
        "lambda_max_rel_error": top_err,
        "sigma": d.sigma,
    }


def render_race(res: dict) -> str:
    p = res["provenance"]
    out = [
        f"# hessfast.eigsh race: top-{K} Hessian eigenvalues, {p['device']} ({p['date']})",
        "",
        f"Command: `{p['command']}`",
        "",
        f"Machine: {p['device']} ({p['device_type']}, {p['cpu_threads']} torch threads), "
        f"load average {_load(p['load_average'])} at the start, "
        f"{_load(res.get('load_average_end'))} at the end. hessfast {p['hessfast']} (commit "
        f"{p['commit']}), torch {p['torch']}, Python {p['python']}, SciPy {p['scipy']}, NumPy "
        f"{p['numpy']}, PyHessian {p['peers'].get('pyhessian')}, curvlinops "
        f"{p['peers'].get('curvlinops')}, hessian-eigenthings "
        f"{p['peers'].get('hessian_eigenthings')}; float64 models and products.",
        "",
        "<!-- reading -->",
    ]
    for pr in res["problems"]:
        w = pr["warmup_seconds"]
        out += [
            "",
            f"## {pr['name']}: {pr['description']}, batch {pr['batch']}, P = {pr['parameters']:,}",
            "",
            f"Reference: {pr['reference']['how']} ({pr['reference']['seconds']:.1f} s); top "
            f"{pr['reference']['eigenvalues'][0]:.6g}, 10th {pr['reference']['eigenvalues'][-1]:.6g}. "
            "One-time costs before the race (first / second / third product of each width: "
            "capture, trace, traced): "
            + "; ".join(f"K={k_}: " + " / ".join(f"{t:.2f} s" for t in v) for k_, v in w.items())
            + ".",
            "",
            "| method | products | wall (median) | in products | vs ARPACK tol 1e-6 | max rel. "
            "error | within 1e-6 | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in pr["rows"]:
            if r["status"] != "ok":
                out.append(f"| {r['label']} | — | — | — | — | {r['status']}: {r['error']} | — | |")
                continue
            vs = f"{r['vs_arpack']:.2f}×" if r.get("vs_arpack") else "—"
            note = r["note"].replace("|", "\\|")
            out.append(
                f"| {r['label']} | {r['products']} | {_s(r['wall_s'])} | "
                f"{_s(r['seconds_in_products'])} | {vs} | {r['max_rel_error']:.1e} | "
                f"{r['within_1e-6']}/10 | {note} |"
            )
    d = res.get("density")
    if d:
        out += [
            "",
            f"## spectral density: {d['model']}, P = {d['parameters']:,}",
            "",
            "| method | products | wall (median) | vs dense | L1 distance to the exact density "
            "| λ_max rel. error |",
            "|---|---|---|---|---|---|",
            f"| hessfast.spectral_density ({d['slq']['settings']}) | {d['slq']['products']} | "
            f"{_s(d['slq']['wall_s'])} | {d['ratio']:.2f}× | {d['l1_distance']:.3f} | "
            f"{d['lambda_max_rel_error']:.1e} |",
            f"| dense Hessian (P products, 256 a call) + eigvalsh | {d['dense']['products']} | "
            f"{_s(d['dense']['wall_s'])} | 1× | 0 | 0 |",
            "",
            f"Both densities broadened by the same Gaussian (σ = {d['sigma']:.3g}, SLQ's default) "
            "on SLQ's grid.",
        ]
    out += [
        "",
        "Wall: one solve from a fresh operator, its construction and checks (symmetry probe, "
        "hessfast's block-size measurement) included; median of the interleaved rounds "
        "(PyHessian: one round). Errors: |λ_i − λ_i^ref| / |λ_i^ref|, sorted descending.",
    ]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="mlp")
    p.add_argument("--batch-size", type=int, default=None, help="override the problem's batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--skip",
        default="",
        help=f"comma-separated methods to skip: {', '.join(METHODS)}, reference",
    )
    p.add_argument(
        "--extra",
        default="",
        help=f"comma-separated opt-in methods: {', '.join(EXTRA)} (hessfast with a float64 "
        "Lanczos basis, float32 products)",
    )
    p.add_argument(
        "--check-vectors",
        action="store_true",
        help="also check hessfast's eigenvectors against the float64 Hessian (true residuals, "
        "float64 Rayleigh quotients; 10 float64 products per hessfast row, not timed)",
    )
    p.add_argument("--reference-tol", type=float, default=1e-10)
    p.add_argument(
        "--pyhessian-max-iter",
        type=int,
        default=100,
        help="PyHessian's maxIter per eigenvalue (its default, 100; lower it on slow devices)",
    )
    p.add_argument("--json", default=None, help="write the results with provenance here")
    p.add_argument("--markdown", default=None, help="write the markdown report here")
    p.add_argument("--verbose", action="store_true", help="log progress to stderr")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="instead: hessfast eigsh's share of time outside the products on a wide MLP",
    )
    p.add_argument("--overhead-dims", default="784,1280,1280,10", help="MLP widths (P = 2.66 M)")
    p.add_argument("--overhead-batch", default="256", help="comma-separated batch sizes")
    p.add_argument("--overhead-block", type=int, default=8)
    p.add_argument("--overhead-steps", type=int, default=60)
    p.add_argument(
        "--overhead-blocks",
        default="8",
        help="comma-separated block sizes for --overhead (each at the same product budget); "
        "'1-floor': block size 1 with the older basis never read, the floor of a step",
    )
    p.add_argument(
        "--race",
        action="store_true",
        help="instead: hessfast.eigsh against ARPACK on H.to_scipy() and the installed peers",
    )
    p.add_argument("--race-problems", default="cnn,mlp,vgg")
    p.add_argument("--race-rounds", type=int, default=3)
    p.add_argument(
        "--race-methods",
        default=",".join(m for m in RACE_METHODS if not m.endswith("-full")),
        help=f"comma-separated --race rows, in this order (of {', '.join(RACE_METHODS)}; "
        "default: all but the -full rows)",
    )
    p.add_argument("--density", action="store_true", help="--race: add the spectral-density race")
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(METHODS) - set(RACE_METHODS) - {"reference"}
    if unknown:
        p.error(f"--skip: unknown method(s) {', '.join(sorted(unknown))}")
    args.race_methods = [s.strip() for s in args.race_methods.split(",") if s.strip()]
    if set(args.race_methods) - set(RACE_METHODS):
        bad = ", ".join(sorted(set(args.race_methods) - set(RACE_METHODS)))
        p.error(f"--race-methods: unknown method(s) {bad}")
    args.extra = {s.strip() for s in args.extra.split(",") if s.strip()}
    if args.extra - set(EXTRA):
        p.error(f"--extra: unknown method(s) {', '.join(sorted(args.extra - set(EXTRA)))}")
    if args.check_vectors and "reference" in args.skip:
        p.error("--check-vectors needs the reference")
    dev = resolve_device(args.device)
    with threads(args.threads), tf32(False):
        prov = _provenance(dev, args)
        if args.race:
            res = run_race(args, dev)
            res["provenance"] = prov
            res["load_average_end"] = list(os.getloadavg())
            text = render_race(res)
        elif args.overhead:
            res = run_overhead(args, dev)
            res["provenance"] = prov
            text = render_overhead(res)
        else:
            res = run_problem(args, dev)
            res["provenance"] = prov
            res["load_average_end"] = list(os.getloadavg())
            text = render(res)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_finite(res), indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
