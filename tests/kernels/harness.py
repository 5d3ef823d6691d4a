"""Check an accelerated (Triton or CUDA) implementation of a rule against the float64 oracle.

The oracle (:func:`oracle`) is autograd in float64 on the CPU: ``y = op(*args)``, its tangents by
``torch.func.jvp`` vmapped over K, the cotangents by one VJP and their tangents by double backward
(``ġ_x = Jᵀ ġ + ∇_x⟨ḡ, J ẋ⟩``), in every engine mode:

- ``hvp``: ``ḡ`` and ``ġ`` present; ``ggn``: ``ḡ`` absent; ``grad``: K = 0, no tangents;
- ``hvp-second-order-only``: ``ġ`` absent (a loss with a zero Hessian).

:func:`check_impl` casts the float64 case to ``dtype`` on ``device``, runs the implementation, and
compares every output with the oracle at the implementation's declared ``tolerances[dtype]``;
for bfloat16 and float16 it also requires the error to be at most ``ratio`` times that of the
plain-torch reference rule run on the same low-precision inputs (the issue's "within 2× plain
torch" criterion), measured as the max abs error relative to the oracle's max abs value.

Cases are data: ``(op, args, active)`` with float64 CPU tensors, as in ``tests/rules/harness.py``.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from torch.func import jvp, vmap

from hessfast.rules import registered_rule
from hessfast.rules.base import Call, invoke

MODES = ("hvp", "hvp-second-order-only", "ggn", "grad")

#: Seed of the tangents and cotangents: not 0, which the tests' autouse fixture uses for the
#: primal inputs — the same draw would make ``ẋ = x``, a degenerate direction (e.g. a zero
#: tangent for scale-invariant norms).
SEED = 20261128


def _floats(y):
    if isinstance(y, (tuple, list)):
        return [t if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in y]
    return [y]


def _slots(active):
    return [i for i, a in enumerate(active) if a]


def make_inputs(op, args, active, k, seed=SEED):
    """Random float64 tangents ``[K, *x]``, output cotangents ``ḡ`` and their tangents ``ġ``."""
    gen = torch.Generator().manual_seed(seed)
    outs = _floats(invoke(op, args))

    def rnd(shape):
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)

    tans = {i: rnd((k, *args[i].shape)) for i in _slots(active)}
    gbar = [rnd(o.shape) if o is not None else None for o in outs]
    gdot = [rnd((k, *o.shape)) if o is not None else None for o in outs]
    return tans, gbar, gdot


def oracle(op, args, active, tans, gbar, gdot, mode):
    """``(ys, ydots, gx, gdx)``: lists over outputs (``ys``, ``ydots``) and over argument slots
    (``gx[i]``, ``gdx[i]`` for active ``i``; ``None`` for zero), in float64."""
    return oracle_modes(op, args, active, tans, gbar, gdot, (mode,))[mode]


def oracle_modes(op, args, active, tans, gbar, gdot, modes=MODES):
    """:func:`oracle` for each of ``modes`` (``{mode: (ys, ydots, gx, gdx)}``), the parts they
    share computed once: the tangents ``J ẋ``, the cotangents ``Jᵀ ḡ``, and per tangent ``Jᵀ ġ_k``
    and the second-order term ``∇_x⟨Jᵀ ḡ, ẋ_k⟩`` (hvp: both; hvp-second-order-only: the second;
    ggn: the first; grad: no tangents)."""
    slots = _slots(active)
    k = next(iter(tans.values())).shape[0] if tans else 0

    def f(*zs):
        new = list(args)
        for i, z in zip(slots, zs):
            new[i] = z
        return invoke(op, new)

    xs = [args[i] for i in slots]
    ys = _floats(f(*xs))
    keep = [j for j, y in enumerate(ys) if y is not None]
    ydots = None
    if any(m != "grad" for m in modes):
        tv = [tans[i] for i in slots]
        ydots = vmap(
            lambda *ts: jvp(lambda *zs: tuple(_floats(f(*zs))[j] for j in keep), tuple(xs), ts)[1]
        )(*tv)
        ydots = list(ydots)
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    firsts, seconds = [], []
    with torch.enable_grad():
        yo = [_floats(f(*xr))[j] for j in keep]
        gb = [gbar[j] for j in keep]
        vj = torch.autograd.grad(yo, xr, gb, create_graph=True, allow_unused=True)
        for kk in range(k):
            first = [None] * len(xr)
            if "hvp" in modes or "ggn" in modes:
                first = torch.autograd.grad(
                    yo, xr, [gdot[j][kk] for j in keep], retain_graph=True, allow_unused=True
                )
            second = [None] * len(xr)
            if any(m.startswith("hvp") for m in modes):
                terms = [
                    (v * tans[i][kk]).sum()
                    for v, i in zip(vj, slots)
                    if v is not None and v.requires_grad
                ]
                if terms:
                    second = torch.autograd.grad(
                        sum(terms), xr, retain_graph=True, allow_unused=True
                    )
            firsts.append([None if t is None else t.detach() for t in first])
            seconds.append([None if t is None else t.detach() for t in second])
    out = {}
    for mode in modes:
        gx = {i: None if mode == "ggn" or v is None else v.detach() for v, i in zip(vj, slots)}
        if mode == "grad":
            out[mode] = ([ys[j] for j in keep], None, gx, None)
            continue
        gdx = {}
        for idx, i in enumerate(slots):
            per_k = []
            for kk in range(k):
                want = torch.zeros_like(xs[idx])
                parts = []
                if mode in ("hvp", "ggn"):
                    parts.append(firsts[kk][idx])
                if mode.startswith("hvp"):
                    parts.append(seconds[kk][idx])
                for part in parts:
                    if part is not None:
                        want = want + part
                per_k.append(want)
            gdx[i] = torch.stack(per_k)
        out[mode] = ([ys[j] for j in keep], ydots, gx, gdx)
    return out


def run_impl(impl, op, args, active, tans, gbar, gdot, mode, dtype, device):
    """Run ``impl`` (any Rule) on the case cast to ``dtype`` on ``device``; same structure as
    :func:`oracle`, results moved back to float64 on the CPU."""

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        if isinstance(t, torch.Tensor):
            return t.to(device)
        return t

    k = 0 if mode == "grad" else next(iter(tans.values())).shape[0]
    cargs = tuple(cast(a) for a in args)
    ctans = tuple(cast(tans[i]) if (i in tans and k) else None for i in range(len(args)))
    call = Call(op, cargs, tuple(active), ctans, k)
    why = impl.not_supported_reasons(call)
    assert not why, f"{impl.name} [{impl.backend}] declines: {why}"
    y, ydot, res = impl.fwd_jvp(call)
    outs = _floats(y)
    keep = [j for j, o in enumerate(outs) if o is not None]
    multi = isinstance(y, (tuple, list))
    g_in = None if mode == "ggn" else _pack([cast(g) for g in gbar], multi)
    gd_in = (
        None if mode in ("grad", "hvp-second-order-only") else _pack([cast(g) for g in gdot], multi)
    )
    gx, gdx = impl.bwd_jvp(res, g_in, gd_in)

    def back(t):
        return None if t is None else t.detach().to("cpu", torch.float64)

    ydots = None
    if k:
        yd = list(ydot) if multi else [ydot]
        ydots = [back(yd[j]) for j in keep]
    return (
        [back(outs[j]) for j in keep],
        ydots,
        {i: back(gx[i]) for i in _slots(active)},
        None if mode == "grad" else {i: back(gdx[i]) for i in _slots(active)},
    )


def _pack(xs, multi):
    return tuple(xs) if multi else xs[0]


def _pairs(got, want):
    ys, yd, gx, gdx = got
    ys0, yd0, gx0, gdx0 = want
    out = [(f"output {j}", a, b) for j, (a, b) in enumerate(zip(ys, ys0))]
    if yd0 is not None:
        out += [(f"output tangent {j}", a, b) for j, (a, b) in enumerate(zip(yd, yd0))]
    out += [(f"cotangent of arg {i}", gx[i], gx0[i]) for i in gx0]
    if gdx0 is not None:
        out += [(f"cotangent tangent of arg {i}", gdx[i], gdx0[i]) for i in gdx0]
    return out


def rel_error(a, b) -> float:
    """max |a − b| / max |b| (zeros for ``None``)."""
    if b is None and a is None:
        return 0.0
    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


def check_impl(
    impl,
    op,
    args,
    active,
    *,
    dtype,
    device,
    k=3,
    modes=MODES,
    seed=SEED,
    ratio=2.0,
    reference=None,
):
    """Compare ``impl`` with the float64 oracle in each mode (see the module docstring).

    ``reference`` is the plain-torch rule used for the low-precision ratio (default: the rule
    registered for ``op``). Returns ``{mode: {what: relative error}}`` for reporting.
    """
    reference = reference or registered_rule(op)
    tans, gbar, gdot = make_inputs(op, args, active, k, seed)
    rtol, atol = impl.tolerances[dtype]
    report = {}
    wants = oracle_modes(op, args, active, tans, gbar, gdot, modes)
    for mode in modes:
        want = wants[mode]
        got = run_impl(impl, op, args, active, tans, gbar, gdot, mode, dtype, device)
        errs = {}
        low = dtype in (torch.bfloat16, torch.float16)
        if low:
            ref = run_impl(reference, op, args, active, tans, gbar, gdot, mode, dtype, device)
            ref_pairs = {what: rel_error(a, b) for what, a, b in _pairs(ref, want)}
        for what, a, b in _pairs(got, want):
            label = f"{impl.name} [{impl.backend}] {mode}: {what}"
            if b is None:
                assert a is None or torch.count_nonzero(a) == 0, f"{label}: expected zero"
                continue
            assert a is not None or torch.count_nonzero(b) == 0, f"{label}: got None, want nonzero"
            a = torch.zeros_like(b) if a is None else a
            assert a.shape == b.shape, f"{label}: shape {list(a.shape)} != {list(b.shape)}"
            errs[what] = rel_error(a, b)
            if low:
                limit = max(ratio * ref_pairs[what], atol)
                assert errs[what] <= limit, (
                    f"{label}: relative error {errs[what]:.2e} > {ratio}× plain torch's "
                    f"{ref_pairs[what]:.2e} in {dtype}"
                )
            else:
                torch.testing.assert_close(
                    a, b, rtol=rtol, atol=atol, msg=lambda m, label=label: f"{label}: {m}"
                )
        report[mode] = errs
    return report


def count_calls(monkeypatch, impls) -> collections.Counter:
    """Count ``(impl.name, "fwd_jvp" | "bwd_jvp")`` calls of ``impls`` from now on (a spy that
    proves which implementation a product ran)."""
    ran: collections.Counter = collections.Counter()

    def counting(key, f):
        def wrapper(*args):
            ran[key] += 1
            return f(*args)

        return wrapper

    for impl in impls:
        for phase in ("fwd_jvp", "bwd_jvp"):
            monkeypatch.setattr(impl, phase, counting((impl.name, phase), getattr(impl, phase)))
    return ran


def compile_for_gpu_in_subprocess(script: str) -> None:
    """Run ``script`` (which compiles Triton kernels for a GPU target with ``triton.compile`` and
    prints ``compiled``) in a fresh interpreter without ``TRITON_INTERPRET``: catches kernel code
    that the interpreter accepts but a GPU build rejects, on a machine without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def check_rows(run, impl, args, *, dtype, device, ratio=2.0, tolerance=None):
    """Check a ``hessfast::cross_entropy_rows`` implementation on one case of
    ``tests/cases/cross_entropy.py`` (float64 CPU ``args`` in the op's order): ``run(*args)``
    returns ``(loss_rows, gz, gdz)``.

    float32 / float64: every output against the autograd oracle on the same rounded inputs, at
    ``tolerance`` (default: ``impl.tolerances[dtype]``), with the oracle's ``None``-ness, the output dtypes (loss rows in
    float32, float64 for float64; the others in ``dtype``) and exact zeros on ignored rows.
    bfloat16 / float16: each output's error relative to the float64 oracle at most ``ratio`` times
    that of the plain-torch reference ``cross_entropy_rows_ref`` on the same low-precision inputs
    (or the declared ``atol``)."""
    from cases.cross_entropy import cast, oracle

    from hessfast.rules.cross_entropy import cross_entropy_rows_ref

    got = [None if t is None else t.detach().to("cpu") for t in run(*cast(args, dtype, device))]
    whats = ("loss rows", "gz", "gdz")
    rtol, atol = tolerance or impl.tolerances[dtype]
    if dtype in (torch.bfloat16, torch.float16):
        want = oracle(*args)
        ref = cross_entropy_rows_ref(*cast(args, dtype, "cpu"))
        for what, a, r, b in zip(whats, got, ref, want, strict=True):
            assert (a is None) == (b is None), what
            if b is not None:
                err, ref_err = rel_error(a.double(), b), rel_error(r.double(), b)
                assert err <= max(ratio * ref_err, atol), (
                    f"{impl.name} [{impl.backend}] {what}: relative error {err:.2e} > {ratio}× "
                    f"plain torch's {ref_err:.2e} in {dtype}"
                )
        return got
    want = oracle(*cast(cast(args, dtype, "cpu"), torch.float64, "cpu"))
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for what, a, b in zip(whats, got, want, strict=True):
        assert (a is None) == (b is None), what
        if b is None:
            continue
        if what != "loss rows":
            assert a.dtype == dtype, f"{what}: dtype {a.dtype}"
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}"
        )
    ignored = args[2] == args[4]
    for t in got:
        if t is not None and ignored.any():
            assert (t[..., ignored, :] == 0).all() if t.dim() > 1 else (t[ignored] == 0).all()
    return got
