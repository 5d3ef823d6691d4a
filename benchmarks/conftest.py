"""Options of the pytest-benchmark runs of ``benchmarks/`` (``pytest benchmarks/ --benchmark-only``).

The main test suite never collects this folder (``testpaths`` in ``pyproject.toml``)."""

import sys
from pathlib import Path

import torch

# the bench_<op>.py files and their harness import by name (pytest runs with --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    group = parser.getgroup("hessfast rule benchmarks")
    group.addoption(
        "--bench-device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the rule benchmarks (default: cuda if available, else cpu)",
    )
    group.addoption(
        "--bench-size",
        choices=["small", "large"],
        default=None,
        help="case shapes: small (CPU-friendly) or large (realistic GPU shapes); "
        "default large on CUDA, small on the CPU",
    )
    group.addoption(
        "--bench-dtype",
        choices=["float32", "bfloat16", "float64"],
        default="float32",
        help="dtype of the rule benchmarks (default float32)",
    )
    group.addoption("--bench-k", type=int, default=8, help="tangent vectors per call (default 8)")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs carry hessfast's provenance: device, torch / CUDA / Triton versions, threads,
    TF32, commit (``hessfast.bench.environment.provenance``)."""
    from hessfast.bench.environment import provenance

    dev = torch.device(config.getoption("--bench-device"))
    machine_info["hessfast"] = provenance(dev, config.getoption("--bench-dtype"))
