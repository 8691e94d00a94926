"""Ecco profiles: the shared quantisation patterns and Huffman codebooks learned offline.

A profile holds, per variant (e.g. "ecco4"), `levels` (S, NL) float32 - S shared patterns of
NL sorted levels in [-1, 1] whose last level is exactly 1 (the group max, "symbol 15") - and
`lengths` (H, NL) uint8 - H complete, length-limited Huffman codebooks over the NL symbols.
Saved as safetensors with metadata (format name, version, provenance). A profile is
identified by a content hash, which codec configs record so data is never decoded with the
wrong tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from eccokv.codecs.base import CodecError
from eccokv.entropy.huffman import kraft_sum

PROFILE_FORMAT = "eccokv-ecco-profile"
PROFILE_VERSION = 1
MAX_CODE_LEN = 8


@dataclass(frozen=True)
class VariantTables:
    """Tables for one block variant: levels (S, NL) float32, lengths (H, NL) uint8."""

    levels: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        validate_tables(self.levels, self.lengths)

    @property
    def n_patterns(self) -> int:
        return int(self.levels.shape[0])

    @property
    def n_levels(self) -> int:
        return int(self.levels.shape[1])

    @property
    def n_codebooks(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def hash(self) -> str:
        """Content hash of these tables: what codec configs and compressed data record."""
        h = hashlib.sha256(f"{PROFILE_FORMAT}:{PROFILE_VERSION}".encode())
        for a in (self.levels, self.lengths):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def validate_tables(levels: np.ndarray, lengths: np.ndarray) -> None:
    """Raise ValueError unless the tables can be used safely by the kernels."""
    if not isinstance(levels, np.ndarray) or levels.dtype != np.float32 or levels.ndim != 2:
        raise ValueError("profile levels must be a 2-D float32 array (patterns, levels)")
    if not isinstance(lengths, np.ndarray) or lengths.dtype != np.uint8 or lengths.ndim != 2:
        raise ValueError("profile lengths must be a 2-D uint8 array (codebooks, levels)")
    S, NL = levels.shape
    H, NL2 = lengths.shape
    if NL2 != NL:
        raise ValueError(f"levels have {NL} symbols but codebooks have {NL2}")
    if not 2 <= NL <= 16:
        raise ValueError(f"number of levels must be 2..16, got {NL}")
    for n, what in ((S, "patterns"), (H, "codebooks")):
        if n < 1 or n > 256 or n & (n - 1):
            raise ValueError(f"number of {what} must be a power of two in 1..256, got {n}")
    if not np.all(np.isfinite(levels)) or np.any(np.abs(levels) > 1.0):
        raise ValueError("profile levels must be finite and inside [-1, 1]")
    if np.any(np.diff(levels, axis=1) < 0):
        raise ValueError("profile levels must be sorted within each pattern")
    if np.any(levels[:, -1] != 1.0) or np.any(levels[:, 0] != -1.0):
        raise ValueError("every pattern must start at exactly -1 (the group's other "
                         "extreme) and end at exactly 1 (the group max)")
    if np.any(lengths < 1) or np.any(lengths > MAX_CODE_LEN):
        raise ValueError(f"code lengths must be in 1..{MAX_CODE_LEN}")
    for h in range(H):
        if kraft_sum(lengths[h]) != 1.0:
            raise ValueError(f"codebook {h} is not a complete prefix code")


@dataclass
class Profile:
    """Shared patterns and codebooks for each Ecco variant, plus provenance `info`."""

    variants: dict[str, VariantTables]
    info: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # "default", a file path, or None (in memory)

    @property
    def hash(self) -> str:
        h = hashlib.sha256(f"{PROFILE_FORMAT}:{PROFILE_VERSION}".encode())
        for name in sorted(self.variants):
            h.update(f"{name}={self.variants[name].hash};".encode())
        return h.hexdigest()[:16]

    def tables(self, variant: str) -> VariantTables:
        if variant not in self.variants:
            raise ValueError(
                f"profile {self.source or self.hash} has no tables for {variant!r} "
                f"(it has {sorted(self.variants)})"
            )
        return self.variants[variant]

    def save(self, path: str | os.PathLike[str]) -> None:
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        for name, t in self.variants.items():
            tensors[f"{name}.levels"] = np.ascontiguousarray(t.levels)
            tensors[f"{name}.lengths"] = np.ascontiguousarray(t.lengths)
        meta = {"format": PROFILE_FORMAT, "version": str(PROFILE_VERSION),
                "info": json.dumps(self.info, sort_keys=True), "hash": self.hash}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Load and validate a profile file; raises ValueError saying what is wrong."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"profile file not found: {p}")
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises several exception types
            raise ValueError(f"{p} is not a readable profile file: {e}") from None
        if meta.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{p} is not an eccokv profile (format {meta.get('format')!r})")
        if meta.get("version") != str(PROFILE_VERSION):
            raise ValueError(
                f"profile version mismatch: {p} is version {meta.get('version')}, "
                f"this eccokv reads version {PROFILE_VERSION}"
            )
        names = sorted({k.rsplit(".", 1)[0] for k in arrays})
        variants = {}
        for n in names:
            if f"{n}.levels" not in arrays or f"{n}.lengths" not in arrays:
                raise ValueError(f"profile {p}: variant {n!r} lacks levels or lengths")
            variants[n] = VariantTables(arrays[f"{n}.levels"], arrays[f"{n}.lengths"])
        try:
            info = json.loads(meta.get("info", "{}"))
        except json.JSONDecodeError:
            info = {}
        prof = cls(variants, info, source=str(p))
        if meta.get("hash") and meta["hash"] != prof.hash:
            raise ValueError(f"profile {p} is corrupt: content hash does not match its header")
        return prof


DEFAULT_PROFILE_FILE = "default.ecprof"  # safetensors format; a tiny table file, not weights
# Tables resolvable by hash in this process. Two tiers: tables user code loaded (the shipped
# default, profile files, Profile objects) stay for the process; tables registered from
# untrusted data (embedded in compressed bytes) live in a bounded LRU of
# MAX_EMBEDDED_TABLES entries, so a stream of blobs with distinct profiles cannot grow
# memory without bound. A codec built from evicted tables keeps its own reference.
MAX_EMBEDDED_TABLES = 64
_TABLES: dict[str, VariantTables] = {}
_EMBEDDED: OrderedDict[str, VariantTables] = OrderedDict()
_LOCK = threading.Lock()
_DEFAULT: list[Profile] = []


def register_tables(t: VariantTables, embedded: bool = False) -> str:
    """Make variant tables resolvable by their hash in this process; returns the hash.

    embedded=True: tables read from data (already validated by the caller), kept in the
    bounded LRU (least recently used evicted beyond MAX_EMBEDDED_TABLES)."""
    h = t.hash
    with _LOCK:
        if h in _TABLES:
            return h
        if not embedded:
            _TABLES[h] = _EMBEDDED.pop(h, t)
            return h
        _EMBEDDED[h] = _EMBEDDED.pop(h, t)
        while len(_EMBEDDED) > MAX_EMBEDDED_TABLES:
            _EMBEDDED.popitem(last=False)
    return h


def lookup_tables(h: str, missing_ok: bool = False) -> VariantTables | None:
    """Registered tables with hash `h`; CodecError if unknown (None with missing_ok)."""
    with _LOCK:
        t = _TABLES.get(h) if isinstance(h, str) else None
        if t is None and isinstance(h, str) and h in _EMBEDDED:
            _EMBEDDED.move_to_end(h)
            t = _EMBEDDED[h]
    if t is None and not missing_ok:
        raise CodecError(
            f"Ecco profile tables {h} are not available: load the profile file they were "
            "made with (EccoCodec(profile=PATH)) or decode the self-contained bytes"
        )
    return t


def registered_tables() -> dict[str, int]:
    """How many tables are registered: {"loaded": n, "embedded": n, "embedded_max": n}."""
    with _LOCK:
        return {"loaded": len(_TABLES), "embedded": len(_EMBEDDED),
                "embedded_max": MAX_EMBEDDED_TABLES}


def default_profile() -> Profile:
    """The generic profile shipped inside the package."""
    if _DEFAULT:
        return _DEFAULT[0]
    ref = resources.files("eccokv.profiles").joinpath(DEFAULT_PROFILE_FILE)
    with resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                "the default Ecco profile is missing from the installed package "
                f"({DEFAULT_PROFILE_FILE}); reinstall eccokv or run `eccokv calibrate`"
            )
        prof = Profile.load(path)
    prof.source = "default"
    for t in prof.variants.values():
        register_tables(t)
    _DEFAULT.append(prof)
    return prof


# Profiles shipped inside the package, by name: "default" (learned from K/V) and
# "weights" (learned from model weights; the default of `eccokv.weights`).
SHIPPED_PROFILES = {"default": DEFAULT_PROFILE_FILE, "weights": "weights.ecprof"}
_SHIPPED: dict[str, Profile] = {}


def shipped_profile(name: str) -> Profile:
    """A profile shipped inside the package ("default" or "weights"); its tables are
    registered, and data encoded with them does not embed them."""
    if name == "default":
        return default_profile()
    if name not in SHIPPED_PROFILES:
        raise ValueError(f"unknown shipped profile {name!r}; shipped: {sorted(SHIPPED_PROFILES)}")
    with _LOCK:
        if name in _SHIPPED:
            return _SHIPPED[name]
    fname = SHIPPED_PROFILES[name]
    ref = resources.files("eccokv.profiles").joinpath(fname)
    with resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"the shipped Ecco profile {fname} is missing from the "
                                    "installed package; reinstall eccokv")
        prof = Profile.load(path)
    prof.source = name
    for t in prof.variants.values():
        register_tables(t)
    with _LOCK:
        _SHIPPED[name] = prof
    return prof


def is_shipped(h: str) -> bool:
    """Whether variant tables with hash h belong to a shipped profile (not embedded)."""
    return any(t.hash == h for n in SHIPPED_PROFILES for t in shipped_profile(n).variants.values())


def resolve_profile(ref: str | os.PathLike[str] | Profile | None) -> Profile:
    """Profile from a Profile object, "default" (or None), a shipped profile's name
    ("weights") or a profile file path."""
    if isinstance(ref, Profile):
        prof = ref
    elif ref is None or ref == "default":
        return default_profile()
    elif isinstance(ref, str) and ref in SHIPPED_PROFILES:
        return shipped_profile(ref)
    elif isinstance(ref, (str, os.PathLike)):
        try:
            prof = Profile.load(ref)
        except (OSError, ValueError) as e:
            raise CodecError(f"cannot load Ecco profile {str(ref)!r}: {e}") from None
    else:
        raise TypeError(f"profile must be 'default', a path or a Profile, got {ref!r}")
    for t in prof.variants.values():
        register_tables(t)
    return prof
