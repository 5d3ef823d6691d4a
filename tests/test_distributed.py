"""Data-parallel operators on torch.distributed (gloo, CPU): one job of 3 real processes.

The multi-process test carries the ``slow`` marker (``pytest -m "not slow"`` skips it). It
launches this file as a script once per rank (``python test_distributed.py SCENARIO
RANK WORLD PORT OUTDIR``, a free port, ``tcp://`` rendezvous, one thread each); every rank runs
all the checks in one process group and writes what it saw to ``OUTDIR/rank<r>.json``, which the
test then asserts on. Ranks compare the distributed operator with a local one
(``process_group=False``) over the whole data set, in float64, in the same process, and the test
compares the ranks with each other bit for bit. The failures come last, in the same job (a process
costs seconds of imports): a rank that raises inside an algorithm, then one that hangs in a group
of its own with a 3-second timeout (killed once the others have exited).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int, out: Path, wait: float = 600.0, kill_rank=None):
    """Run ``world`` ranks; return ``(exit codes, stderr texts, json results)``. ``kill_rank``:
    a rank expected to hang, killed once the others have exited. ``wait`` only guards against a
    job that hangs (it is no time limit: ranks on a loaded 2-core machine take minutes)."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), scenario, str(r), str(world), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + wait
    codes, errs = [None] * world, [""] * world
    try:
        for r, p in enumerate(procs):
            if r == kill_rank:
                continue
            _, errs[r] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            codes[r] = p.returncode
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                _, errs[r] = p.communicate()
                codes[r] = codes[r] if r != kill_rank else "killed"
    results = []
    for r in range(world):
        f = out / f"rank{r}.json"
        results.append(json.loads(f.read_text()) if f.exists() else None)
    return codes, errs, results


def _same_on_every_rank(results, key):
    values = [res[key] for res in results]
    assert all(v == values[0] for v in values), f"{key} differs between ranks: {values}"


@pytest.mark.slow
def test_distributed_operator_equals_single_process(tmp_path):
    world = 3
    # rank 1 hangs at the end (below) and is killed once the others have exited; a job that
    # hangs anywhere else runs into _launch's deadline and fails the test there
    codes, errs, results = _launch("check", world, tmp_path, kill_rank=1)
    assert codes == [0, "killed", 0], "\n".join(errs)
    for r, res in enumerate(results):
        assert res is not None, errs[r]
        assert res["world_size"] == world and res["rank"] == r
        # products over ragged shards (ranks with different numbers of samples, one rank with no
        # batch at all, a DataLoader split by shard()) equal the single-process products over all
        # the data; so do the gradient, the loss and an empirical Fisher product
        for key in (
            "hessian",
            "ggn",
            "sum_reduction",
            "block",
            "dict",
            "shard_single_batch",
            "loader",
            "gradient",
            "loss",
            "empirical_fisher",
        ):
            assert res[key] < 1e-12, (key, r, res[key])
        # and the gradient and loss of torch.func on the concatenated data
        assert res["gradient_oracle"] < 1e-12 and res["loss_oracle"] < 1e-12
        for key in ("eigsh", "trace", "density", "layerwise", "newton"):
            assert res[key] < 1e-10, (key, r, res[key])
        # a rank that raises inside a product: it gets its own error, the others a clear one,
        # and the group stays usable
        if r == 1:
            assert res["failure"].startswith("ValueError: boom on rank 1"), res["failure"]
        else:
            assert res["failure"].startswith("DistributedError: rank 1 failed inside a Hessian")
            assert "ValueError: boom on rank 1" in res["failure"]
        assert res["after_failure"] < 1e-12
        # out of memory on one rank is out of memory on all of them: trace halves its blocks
        # everywhere and still gets the same estimate
        assert res["oom_trace"] < 1e-10 and res["oom_calls"] > res["plain_calls"]
        assert res["mismatch"].startswith("DistributedError: the ranks multiplied different")
        assert res["models_differ"].startswith("DistributedError: the ranks' models differ")
        assert res["after_mismatch"] < 1e-12
        # a rank that raises inside eigsh's fourth product fails eigsh on every rank
        failed = res["eigsh_failure"]
        if r == 1:
            assert failed.startswith("ValueError: boom on rank 1"), failed
        else:
            assert "rank 1 failed inside a Hessian product" in failed, failed
            assert "boom on rank 1" in failed
    for key in ("product_hash", "eigsh_values", "trace_value", "density_hash", "newton_hash"):
        _same_on_every_rank(results, key)
    # rank 1 hangs in the second product of a group of ranks 0 and 1 with a 3 s timeout: rank 0
    # times out with a clear error (rank 1 is killed by the test); rank 2 is not in the group
    hang = results[0]["hang"]
    assert hang.startswith("DistributedError: rank 0 of 2: the all-reduce"), hang
    assert "timed out" in hang.lower() and "timeout" in hang
    assert "hang" not in results[1] and results[2]["hang"] == "not in the group"


def test_helpers_outside_a_distributed_job():
    import torch
    import torch.nn.functional as F

    import hessfast
    from hessfast import distributed as hd

    assert hd.resolve_group(None) is None and hd.resolve_group(False) is None
    assert (hd.rank(), hd.world_size(), hd.is_main_process()) == (0, 1, True)
    with pytest.raises(TypeError, match="process_group"):
        hd.resolve_group("gloo")
    with pytest.raises(ValueError, match="not initialised"):
        hd.resolve_group(object())
    assert hd.init_from_env() is False or "RANK" in os.environ
    data = [(torch.randn(3, 2), torch.randint(0, 2, (3,))) for _ in range(5)]
    assert hd.shard(data) is data
    assert hd.shard(data, rank=1, world_size=2) == data[1::2]
    lazy = hd.shard(iter(data), rank=0, world_size=2)
    assert len(list(lazy)) == 3
    ds = torch.utils.data.TensorDataset(torch.arange(7.0)[:, None], torch.arange(7))
    seen = []
    for r in range(3):
        sub = hd.shard(ds, rank=r, world_size=3)
        seen += [int(sub[i][1]) for i in range(len(sub))]
        loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)
        shards = hd.shard(loader, rank=r, world_size=3)
        assert [b[1].tolist() for b in shards] == [list(range(7))[r::3][i : i + 2] for i in (0, 2)][
            : len(shards)
        ]
    assert sorted(seen) == list(range(7))
    assert hd.shard((torch.zeros(2, 1), torch.zeros(2)), rank=2, world_size=3) == []
    with pytest.raises(ValueError, match="rank"):
        hd.shard(data, rank=2, world_size=2)
    # a failing rank's message travels as character codes in the product's buffer
    assert hd._decode(hd._encode("ValueError: bad é")) == "ValueError: bad ?"
    long = hd._decode(hd._encode("x" * 500))
    assert len(long) == hd._MSG and long.endswith("...")
    model = torch.nn.Linear(2, 2)
    H = hessfast.HessianOperator(model, F.cross_entropy, data)
    assert H.process_group is None and H.world_size == 1 and H.rank == 0
    assert H.block("bias").process_group is None


# ----------------------------------------------------------------------------------------------
# the ranks (this file run as a script)


def _digest(t) -> str:
    return hashlib.sha256(t.detach().double().contiguous().numpy().tobytes()).hexdigest()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class _Flaky:
    """Batches that raise ``error`` (or sleep) when iterated ``after`` more times."""

    def __init__(self, batches):
        self.batches, self.error, self.after, self.sleep = batches, None, 0, 0.0

    def __iter__(self):
        if self.error is not None or self.sleep:
            if self.after == 0:
                if self.sleep:
                    time.sleep(self.sleep)
                err, self.error = self.error, None
                if err is not None:
                    raise err
            self.after -= 1
        return iter(self.batches)


def _setup(rank: int, world: int, port: int, timeout: float):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # the ranks interpret every product: tracing (which the rest of the suite runs on every
    # product) would double their time and is not what these tests are about
    from hessfast import traced

    traced.TRACE_AFTER = 10**9
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(14, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    return model, x, y


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _worker_check(rank: int, world: int, port: int, out: Path) -> dict:
    import datetime
    import functools

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import hessfast
    from hessfast import distributed as hd

    model, x, y = _setup(rank, world, port, timeout=60)
    lf = F.cross_entropy
    res = {"rank": hd.rank(), "world_size": hd.world_size()}
    assert world == 3
    # explicit ragged shards: 5 + 3 samples, 4 + 2 samples, and no batch at all on rank 2
    sizes, off, batches = [5, 3, 4, 2], 0, []
    for s in sizes:
        batches.append((x[off : off + s], y[off : off + s]))
        off += s
    full, mine = batches, [batches[:2], batches[2:], []][rank]
    flaky = _Flaky(mine)
    H = hessfast.HessianOperator(model, lf, flaky)  # process_group=None: the default group
    R = hessfast.HessianOperator(model, lf, full, process_group=False)
    assert H.world_size == world and R.world_size == 1
    P = H.shape[0]
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    HV = H @ V
    res["hessian"] = _rel(HV, R @ V)
    res["product_hash"] = _digest(HV)
    G = hessfast.GGNOperator(model, lf, mine)
    res["ggn"] = _rel(G @ V, hessfast.GGNOperator(model, lf, full, process_group=False) @ V)
    lsum = functools.partial(F.cross_entropy, reduction="sum")
    S = hessfast.HessianOperator(model, lsum, mine)
    res["sum_reduction"] = _rel(
        S @ V, hessfast.HessianOperator(model, lsum, full, process_group=False) @ V
    )
    B, RB = H.block("2.*"), R.block("2.*")
    assert B.world_size == world and RB.world_size == 1
    vb = V[: B.shape[0], 0]
    res["block"] = _rel(B @ vb, RB @ vb)
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    hd_, rd = H @ d, R @ d
    res["dict"] = max(_rel(hd_[n], rd[n]) for n in d)
    one = (x[:2], y[:2])  # a single batch of 2 samples: rank 2 of 3 gets no sample
    H1 = hessfast.HessianOperator(model, lf, hd.shard(one))
    res["shard_single_batch"] = _rel(
        H1 @ V, hessfast.HessianOperator(model, lf, one, process_group=False) @ V
    )
    # a DataLoader split by shard(): 13 samples dealt out, 5 on rank 0 (batches 4 + 1), 4 on ranks
    # 1 and 2
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:13], y[:13]), batch_size=4
    )
    HL = hessfast.HessianOperator(model, lf, hd.shard(loader))
    res["loader"] = _rel(
        HL @ V, hessfast.HessianOperator(model, lf, loader, process_group=False) @ V
    )
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = R.gradient_and_loss()
    res["gradient"] = _rel(g, g_ref)
    res["loss"] = abs(float(loss - loss_ref)) / abs(float(loss_ref))
    xs, ys = torch.cat([b[0] for b in full]), torch.cat([b[1] for b in full])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def full_loss(p):
        return lf(torch.func.functional_call(model, p, (xs,)), ys)

    og = torch.func.grad(full_loss)(params)
    res["gradient_oracle"] = _rel(g, torch.cat([og[n].reshape(-1) for n in params]))
    res["loss_oracle"] = abs(float(loss - full_loss(params))) / abs(float(loss_ref))
    E = hessfast.EmpiricalFisherOperator(model, lf, mine)
    ER = hessfast.EmpiricalFisherOperator(model, lf, full, process_group=False)
    res["empirical_fisher"] = _rel(E @ V, ER @ V)

    ev, _ = hessfast.eigsh(H, k=3, seed=0)
    ev_ref, _ = hessfast.eigsh(R, k=3, seed=0)
    res["eigsh"] = _rel(ev, ev_ref)
    res["eigsh_values"] = ev.tolist()
    tr = hessfast.trace(H, num_matvecs=12, seed=0)
    tr_ref = hessfast.trace(R, num_matvecs=12, seed=0)
    res["trace"] = abs(tr.estimate - tr_ref.estimate) / abs(tr_ref.estimate)
    res["trace_value"] = tr.estimate
    dens = hessfast.spectral_density(H, num_probes=2, lanczos_steps=8, seed=0)
    dens_ref = hessfast.spectral_density(R, num_probes=2, lanczos_steps=8, seed=0)
    res["density"] = _rel(torch.as_tensor(dens.nodes), torch.as_tensor(dens_ref.nodes))
    res["density_hash"] = _digest(torch.as_tensor(dens.nodes))
    lw = hessfast.layerwise(H, lanczos_steps=4, num_trace_probes=4, seed=0)
    lw_ref = hessfast.layerwise(R, lanczos_steps=4, num_trace_probes=4, seed=0)
    a = torch.tensor([[b.lambda_max, b.lambda_min, b.trace] for b in lw.values()])
    b = torch.tensor([[b.lambda_max, b.lambda_min, b.trace] for b in lw_ref.values()])
    res["layerwise"] = _rel(a, b)
    gvec = V[:, 0]
    st = hessfast.newton_step(H, gvec, damping=1.0, tol=1e-12)
    st_ref = hessfast.newton_step(R, gvec, damping=1.0, tol=1e-12)
    res["newton"] = _rel(st.step, st_ref.step)
    res["newton_hash"] = _digest(st.step)

    # rank 1 raises inside a product
    if rank == 1:
        flaky.error = ValueError("boom on rank 1")
    try:
        H @ V
        res["failure"] = "no error"
    except Exception as e:
        res["failure"] = _error(e)
    res["after_failure"] = _rel(H @ V, R @ V)
    # rank 1 runs out of memory in trace's first product: every rank halves its block
    from hessfast.algorithms.krylov import Products

    calls = []
    orig = Products.__call__

    def counting(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls.append(self.calls)
        return out

    Products.__call__ = counting
    try:
        plain = hessfast.trace(H, num_matvecs=12, method="hutchinson", seed=3)
        res["plain_calls"] = calls[-1]
        if rank == 1:
            flaky.error = torch.OutOfMemoryError("CUDA out of memory (simulated on rank 1)")
        oom = hessfast.trace(H, num_matvecs=12, method="hutchinson", seed=3)
        res["oom_calls"] = calls[-1]
        res["oom_trace"] = abs(oom.estimate - plain.estimate) / abs(plain.estimate)
    finally:
        Products.__call__ = orig
    # ranks that multiply different vectors
    try:
        H @ (V + rank)
        res["mismatch"] = "no error"
    except Exception as e:
        res["mismatch"] = _error(e)
    # ranks whose models differ
    p = next(model.parameters())
    with torch.no_grad():
        p[0, 0] += 0.5 * rank
    try:
        H @ V
        res["models_differ"] = "no error"
    except Exception as e:
        res["models_differ"] = _error(e)
    with torch.no_grad():
        p[0, 0] -= 0.5 * rank
    res["after_mismatch"] = _rel(H @ V, R @ V)
    # rank 1 raises inside eigsh's fourth product
    if rank == 1:
        flaky.error, flaky.after = ValueError("boom on rank 1"), 3
    try:
        hessfast.eigsh(H, k=2, block_size=1, seed=0, tol=1e-14, max_iter=50)
        res["eigsh_failure"] = "no error"
    except Exception as e:
        res["eigsh_failure"] = _error(e)
    # last: rank 1 hangs in the second product of a group of ranks 0 and 1 whose timeout is 3 s
    # (every rank creates the group); it writes its results first, the test kills it
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    if rank == 2:
        res["hang"] = "not in the group"
        return res
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    if rank == 1:
        flaky.sleep, flaky.after = 120.0, 1
    try:
        hessfast.eigsh(
            hessfast.HessianOperator(model, lf, flaky, process_group=group),
            k=2,
            block_size=1,
            seed=0,
            max_iter=50,
        )
        res["hang"] = "no error"
    except Exception as e:
        res["hang"] = _error(e)
    return res  # no destroy_process_group: a timed-out group may hang it (the process exits)


def _main(argv: list[str]) -> None:
    scenario, rank, world, port, out = argv
    rank, world, port, out = int(rank), int(world), int(port), Path(out)
    fn = {"check": _worker_check}[scenario]
    code = 0
    try:
        res = fn(rank, world, port, out)
        (out / f"rank{rank}.json").write_text(json.dumps(res))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown of torch and gloo (seconds)


if __name__ == "__main__":
    _main(sys.argv[1:])
