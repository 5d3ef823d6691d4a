"""Provenance: where and with what a number was measured (device, versions, commit, load)."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

from .methods import available_backends


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the repository holding ``start`` (default: this package), read
    from ``.git`` without running git; ``None`` outside a repository."""
    for base in (start or Path(__file__).resolve().parent, Path.cwd()):
        for d in (base, *base.parents):
            git = d / ".git"
            if git.is_file():  # a worktree: "gitdir: <path>"
                m = re.match(r"gitdir:\s*(.+)", git.read_text().strip())
                git = (d / m.group(1)).resolve() if m else git
            if not git.is_dir():
                continue
            try:
                head = (git / "HEAD").read_text().strip()
                if not head.startswith("ref:"):
                    return head[:12]
                ref = head[4:].strip()
                common = git
                if (git / "commondir").exists():
                    common = (git / (git / "commondir").read_text().strip()).resolve()
                for root in (git, common):
                    if (root / ref).exists():
                        return (root / ref).read_text().strip()[:12]
                    packed = root / "packed-refs"
                    if packed.exists():
                        for line in packed.read_text().splitlines():
                            if line.endswith(" " + ref):
                                return line.split()[0][:12]
            except OSError:
                return None
            return None
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(dev: torch.device, dtype: str = "float32") -> dict:
    """Where and with what a number was measured."""
    import hessfast

    dev = torch.device(dev)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = dev.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
        "device_type": dev.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "dtype": dtype,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hessfast": hessfast.__version__,
        "backends": available_backends(dev),
    }
