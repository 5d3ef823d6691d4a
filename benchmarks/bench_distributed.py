"""Data-parallel products: one K-batched Hessian product on 1, 2, 3, ... processes at a fixed
global batch, and the share of it spent in the all-reduce.

Each configuration spawns its processes (``torch.multiprocessing``, a ``tcp://`` rendezvous on
a free local port), every rank holds the same model and its shard of one global batch
(``hessfast.distributed.shard``), and rank 0 reports:

- ``product``: the median over repeats of one ``H @ V`` (``V`` ``[P, K]``), timed from a barrier
  to the slowest rank's return (the maximum over ranks);
- ``all-reduce``: the median of the product's collective alone — an all-reduce of a buffer of the
  same size (``K·P`` numbers plus ``2 + 165·W`` slots of status, fingerprints and messages),
  from a barrier, slowest rank: the communication cost without the wait for a slower rank;
- ``in-product all-reduce``: the time spent inside ``torch.distributed.all_reduce`` during the
  timed products (communication plus waiting for the slowest rank: load imbalance);
- ``CPU time``: the process CPU time of one product on the busiest rank (all its threads, gloo's
  included): the work per rank, less sensitive than wall time to other jobs on the machine;
- ``local``: for reference, the same product by a local operator (``process_group=False``) over
  the whole global batch in one process.

Threads: one per process by default (``--threads``; ``0`` gives each process
``cpu_count // W``, so that every configuration uses all cores), so ``W`` processes use ``W``
cores; on a 2-core machine 3 processes oversubscribe them and nothing scales beyond 2.

    python benchmarks/bench_distributed.py                       # CPU, gloo, 1 2 3 processes
    python benchmarks/bench_distributed.py --device cuda --backend nccl --procs 1   # one GPU

Writes ``benchmarks/results/<cpu|gpu>-distributed-<date>.md`` and ``.json`` (``--out`` for
another folder, ``--no-write`` for none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hessfast  # noqa: E402
from hessfast import distributed as hd  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(width: int, depth: int, d_in: int, classes: int) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(t: float, device: torch.device) -> float:
    x = torch.tensor([t], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def _rank_main(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        cfg["backend"],
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    model = _model(cfg["width"], cfg["depth"], cfg["d_in"], cfg["classes"]).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["d_in"], generator=g).to(device, dtype)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g).to(device)
    mine = hd.shard((x, y))
    H = hessfast.HessianOperator(model, F.cross_entropy, mine)
    P, K = H.shape[0], cfg["k"]
    V = torch.randn(P, K, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    inside = [0.0]
    real_all_reduce = dist.all_reduce

    def timed_all_reduce(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        r = real_all_reduce(*args, **kwargs)
        _sync(device)
        inside[0] += time.perf_counter() - t0
        return r

    for _ in range(cfg["warmup"]):
        H @ V
    products, in_product, cpu = [], [], []
    dist.all_reduce = timed_all_reduce
    try:
        for _ in range(cfg["repeats"]):
            inside[0] = 0.0
            dist.barrier()
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            H @ V
            _sync(device)
            t = time.perf_counter() - t0
            cpu.append(time.process_time() - c0)
            in_product.append(inside[0])
            products.append(t)
    finally:
        dist.all_reduce = real_all_reduce
    products = [_slowest(t, device) for t in products]
    in_product = [_slowest(t, device) for t in in_product]
    cpu = [_slowest(t, device) for t in cpu]

    acc = torch.promote_types(dtype, torch.float32)
    buf = torch.zeros(K * P + 2 + 165 * world, dtype=acc, device=device)
    for _ in range(cfg["warmup"]):
        dist.all_reduce(buf)
    comm = []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        _sync(device)
        comm.append(time.perf_counter() - t0)
    comm = [_slowest(t, device) for t in comm]

    local = None
    if world == 1:
        L = hessfast.HessianOperator(model, F.cross_entropy, (x, y), process_group=False)
        for _ in range(cfg["warmup"]):
            L @ V
        ts = []
        for _ in range(cfg["repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            L @ V
            _sync(device)
            ts.append(time.perf_counter() - t0)
        local = statistics.median(ts)
    if rank == 0:
        res = {
            "processes": world,
            "threads_per_process": threads,
            "samples_per_rank": [len(range(r, cfg["batch"], world)) for r in range(world)],
            "P": P,
            "K": K,
            "product_s": statistics.median(products),
            "product_min_s": min(products),
            "allreduce_s": statistics.median(comm),
            "in_product_allreduce_s": statistics.median(in_product),
            "product_cpu_s": statistics.median(cpu),
            "allreduce_bytes": buf.numel() * buf.element_size(),
            "local_product_s": local,
        }
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def run(cfg: dict) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in cfg["procs"]:
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_rank_main, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
            row = json.loads(Path(out).read_text())
            rows.append(row)
            print(
                f"{world} process(es): product {row['product_s'] * 1e3:.2f} ms, all-reduce "
                f"{row['allreduce_s'] * 1e3:.3f} ms "
                f"({100 * row['allreduce_s'] / row['product_s']:.1f} %)",
                flush=True,
            )
    return rows


def _provenance(cfg: dict) -> dict:
    commit = None
    try:
        import subprocess

        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if cfg["device"] == "cuda" else None
    return {
        "hessfast": hessfast.__version__,
        "commit": commit or None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(os.getloadavg()),
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
    }


def markdown(cfg: dict, prov: dict, rows: list[dict]) -> str:
    dev = prov["gpu"] or f"{prov['machine']}, {prov['cpu_count']} CPU cores"
    base = rows[0]["product_s"] if rows and rows[0]["processes"] == 1 else None
    lines = [
        f"hessfast {prov['hessfast']} (commit {prov['commit']}) on {dev}, torch {prov['torch']}, "
        f"{prov['date']}; {cfg['backend']}, {cfg['dtype']}; MLP {cfg['d_in']}-"
        + "-".join([str(cfg["width"])] * cfg["depth"])
        + f"-{cfg['classes']} (GELU), P = {rows[0]['P']:,}, global batch {cfg['batch']}, "
        f"K = {cfg['k']}; median of {cfg['repeats']}; load average before the run "
        f"{prov['load_average_before'][0]:.2f}",
        "",
        "| processes | threads each | samples per rank | product (best) | × 1 process "
        "| all-reduce alone "
        "| share of the product | all-reduce inside the product (incl. waiting) "
        "| CPU time of the busiest rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{base / r['product_s']:.2f}×" if base else "n/a"
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | "
            f"{'/'.join(str(n) for n in r['samples_per_rank'])} | "
            f"{r['product_s'] * 1e3:.2f} ms ({r['product_min_s'] * 1e3:.2f} ms) | {speed} | "
            f"{r['allreduce_s'] * 1e3:.3f} ms "
            f"({r['allreduce_bytes'] / 2**20:.2f} MiB) | "
            f"{100 * r['allreduce_s'] / r['product_s']:.1f} % | "
            f"{r['in_product_allreduce_s'] * 1e3:.3f} ms | {r['product_cpu_s'] * 1e3:.2f} ms |"
        )
    local = next((r["local_product_s"] for r in rows if r["local_product_s"]), None)
    if local:
        lines += [
            "",
            f"Local operator (`process_group=False`, whole batch, one process): "
            f"{local * 1e3:.2f} ms per product.",
        ]
    load, cores = prov["load_average_before"][0], prov["cpu_count"] or 1
    if cfg["device"] == "cpu" and load > 0.5 * cores:
        lines += [
            "",
            f"The machine was shared with other jobs (load average {load:.2f} on {cores} cores "
            "before the run): wall times are inflated and the speed-ups unreliable; the CPU time "
            "of the busiest rank shows how the work per rank shrinks.",
        ]
    if cfg["device"] == "cpu" and cores < max(cfg["procs"]):
        lines += [
            "",
            f"{prov['cpu_count']} cores: more processes than cores share them, so the product "
            "cannot get faster beyond that many processes.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--backend", default=None, help="gloo (CPU default) or nccl (CUDA default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=3072, help="global batch (samples)")
    ap.add_argument("--k", type=int, default=8, help="columns per product")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--d-in", type=int, default=784)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="per process (0: cores / processes)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    cfg = {
        "procs": a.procs,
        "backend": a.backend or ("nccl" if a.device == "cuda" else "gloo"),
        "device": a.device,
        "batch": a.batch,
        "k": a.k,
        "width": a.width,
        "depth": a.depth,
        "d_in": a.d_in,
        "classes": a.classes,
        "dtype": a.dtype,
        "threads": a.threads,
        "repeats": a.repeats,
        "warmup": a.warmup,
    }
    if a.device == "cuda" and max(a.procs) > torch.cuda.device_count():
        ap.error(f"--procs {max(a.procs)} needs as many GPUs; {torch.cuda.device_count()} visible")
    prov = _provenance(cfg)
    rows = run(cfg)
    md = markdown(cfg, prov, rows)
    print(md)
    if not a.no_write:
        stem = Path(a.out) / f"{'gpu' if a.device == 'cuda' else 'cpu'}-distributed-{prov['date']}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(
            json.dumps({"provenance": prov, "config": cfg, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
