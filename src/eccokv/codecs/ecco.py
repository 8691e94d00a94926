"""Ecco fixed-rate block codec: `ecco4` (64 bytes / 128 values), `ecco3` (48), `ecco2` (32).

Each group of 128 values along the codec axis becomes one fixed-size block that holds all
its metadata, so bits/value is exactly 8*block_bytes/128 plus a per-tensor header, and
every block decodes independently. Per group: a log-domain scale of the group's abs-max
(the max itself is the last level, exact up to the scale step), the shared pattern of
sorted levels with the smallest error after patching (S patterns learned offline), the
shortest of H canonical Huffman codebooks, the codes, then exact 8-bit "patches" for the
largest remaining errors in the bits Huffman saved. A group whose codes cannot fit uses
an always-fits fixed-width mode, flagged in the block and counted in `stats()`.
Byte-exact layout and the measurements behind the constants: docs/format.md.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch

from eccokv.codecs import register
from eccokv.codecs.base import (
    Codec,
    CodecError,
    Compressed,
    Layout,
    decode_blocks_into,
    make_compressed,
    to_rows,
)
from eccokv.codecs.ecco_profile import (
    MAX_CODE_LEN,
    SHIPPED_PROFILES,
    Profile,
    VariantTables,
    is_shipped,
    lookup_tables,
    register_tables,
    resolve_profile,
)
from eccokv.entropy.huffman import decode_table, encode_table, multi_decode_table
from eccokv.kernels.ecco_core import MULTI_BITS, EccoTables

# Per-variant block constants (see docs/format.md for the measurements behind them).
VARIANTS: dict[str, dict[str, int]] = {
    "ecco4": {"block_bytes": 64, "scale_bits": 12, "scale_steps": 128, "low_bits": 10},
    "ecco3": {"block_bytes": 48, "scale_bits": 10, "scale_steps": 32, "low_bits": 8},
    "ecco2": {"block_bytes": 32, "scale_bits": 8, "scale_steps": 8, "low_bits": 6},
}
GROUP_SIZE = 128
POS_BITS = 7
PATCH_BITS = POS_BITS + 8
N_BUCKETS = 128


def _log2_int(n: int) -> int:
    return max(0, int(n).bit_length() - 1)


class _Tables:
    """Kernel-ready arrays derived from one VariantTables."""

    def __init__(self, t: VariantTables) -> None:
        self.levels = np.ascontiguousarray(t.levels, dtype=np.float32)
        S, NL = self.levels.shape
        self.S, self.NL, self.H = S, NL, t.n_codebooks
        self.levels_flat = self.levels.reshape(-1).copy()
        lv = self.levels.astype(np.float64)
        self.mids = np.ascontiguousarray((lv[:, 1:] + lv[:, :-1]) * 0.5)
        self.levels64 = np.ascontiguousarray(lv)
        self.lengths = np.ascontiguousarray(t.lengths.astype(np.int64))
        self.codes = np.stack([encode_table(t.lengths[h]) for h in range(self.H)]).astype(
            np.int64)
        self.dtab = np.concatenate(
            [decode_table(t.lengths[h], MAX_CODE_LEN) for h in range(self.H)])
        # bucket error proxy: mean squared error to the nearest level over each bucket
        sub = 8
        edges = -1.0 + (np.arange(N_BUCKETS * sub) + 0.5) * (2.0 / (N_BUCKETS * sub))
        d = (edges[None, :, None] - lv[:, None, :]) ** 2  # (S, B*sub, NL)
        err = d.min(axis=2).reshape(S, N_BUCKETS, sub).mean(axis=2)
        self.errtab = np.ascontiguousarray(err.T, dtype=np.float32)  # (B, S)
        low = -1.0 + np.arange(N_BUCKETS) * (2.0 / N_BUCKETS) - 1e-9  # bucket lower edges
        # levels below index kstart cannot be nearest to any value >= the lower edge
        self.kstart = np.ascontiguousarray(
            (self.mids[:, None, :] < low[None, :, None]).sum(axis=2).astype(np.int64))
        self.pattern_bits = _log2_int(S)
        self.codebook_bits = _log2_int(self.H)


_PTAB = (np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64) / 127.0).astype(
    np.float32)


@register
class EccoCodec(Codec):
    """The Ecco block codec (see module docstring). Config keys:

    variant: "ecco4" | "ecco3" | "ecco2"; profile: "default", a profile file path, or a
    Profile; candidates: patterns tried exactly per group (ranked by a histogram proxy);
    patch_order: "error" (largest remaining error first) or "magnitude" (paper).
    """

    codec_id = "ecco"
    group_size = GROUP_SIZE

    def __init__(self, variant: str = "ecco4", profile: str | Profile | None = "default",
                 candidates: int = 2, patch_order: str = "error",
                 profile_hash: str | None = None, group_size: int = GROUP_SIZE,
                 trim_passes: int = 16, tables: VariantTables | None = None,
                 **block: Any) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown Ecco variant {variant!r}; choose from {sorted(VARIANTS)}")
        if group_size != GROUP_SIZE:
            raise ValueError(f"Ecco blocks hold exactly {GROUP_SIZE} values, got {group_size}")
        params = dict(VARIANTS[variant])
        for k, v in block.items():
            if k not in params:
                raise TypeError(f"unknown Ecco option {k!r}")
            if v != params[k]:
                raise ValueError(f"{variant} has {k}={params[k]}, not {v}")
        if not isinstance(candidates, int) or not 1 <= candidates <= 256:
            raise ValueError(f"candidates must be an int in 1..256, got {candidates!r}")
        if not isinstance(trim_passes, int) or not 0 <= trim_passes <= 128:
            raise ValueError(f"trim_passes must be an int in 0..128, got {trim_passes!r}")
        self.trim_passes = trim_passes
        if patch_order not in ("error", "magnitude"):
            raise ValueError(f"patch_order must be 'error' or 'magnitude', got {patch_order!r}")
        self.variant = variant
        self.block_bytes = params["block_bytes"]
        self.scale_bits = params["scale_bits"]
        self.scale_steps = params["scale_steps"]
        self.low_bits = params["low_bits"]
        qmax = (1 << self.low_bits) - 1
        ulo = 1.0 - 2.0 * np.arange(qmax + 1) / qmax  # the low end, in units of the max
        self.ctab = ((1.0 + ulo) * 0.5).astype(np.float32)
        self.htab = ((1.0 - ulo) * 0.5).astype(np.float32)
        self.candidates = candidates
        self.patch_order = patch_order
        if profile is None:
            self.profile_source: str | None = None
            if tables is None:
                if profile_hash is None:
                    raise ValueError("give a profile (or a profile_hash of registered tables)")
                tables = lookup_tables(profile_hash)
            elif not isinstance(tables, VariantTables):
                raise TypeError(f"tables must be VariantTables, got {type(tables).__name__}")
            if profile_hash is not None and tables.hash != profile_hash:
                raise CodecError(f"wrong Ecco profile: expected tables {profile_hash}, "
                                 f"got {tables.hash}")
        else:
            if tables is not None:
                raise ValueError("give a profile or tables, not both")
            prof = resolve_profile(profile)
            self.profile_source = prof.source
            tables = prof.tables(variant)
            if profile_hash is not None and tables.hash != profile_hash:
                raise CodecError(
                    f"wrong Ecco profile: expected {variant} tables {profile_hash}, "
                    f"{prof.source or 'the given profile'} has {tables.hash}"
                )
        self.tables = tables
        self.profile_hash = tables.hash
        self.t = _Tables(tables)
        self.block_bits = 8 * self.block_bytes
        self.words = self.block_bytes // 8
        self.header_bits = (2 + self.scale_bits + self.low_bits + self.t.pattern_bits
                            + self.t.codebook_bits)
        # always-fits mode: fixed-width codes into a subset of the pattern's levels
        self.fallback_bits = max(1, min((self.block_bits - self.header_bits) // GROUP_SIZE,
                                        _log2_int(self.t.NL)))
        self._lock = threading.Lock()
        self._stats = {"blocks": 0, "fallback_blocks": 0, "zero_blocks": 0}
        self._kt: EccoTables | None = None

    def kernel_tables(self) -> EccoTables:
        """The frozen tables object every Ecco kernel decodes with (built once)."""
        if self._kt is None:
            t = self.t
            lv16 = np.zeros((t.S, 16), np.float32)
            lv16[:, :t.NL] = t.levels
            smax = (1 << self.scale_bits) - 1
            s = np.arange(smax + 1, dtype=np.float64)
            mtab = np.concatenate([multi_decode_table(self.tables.lengths[h], MULTI_BITS)
                                   for h in range(t.H)])
            lens = np.zeros((t.H, 16), np.uint8)
            lens[:, :t.NL] = self.tables.lengths
            kt = EccoTables(
                self.block_bits, self.scale_bits, self.low_bits, t.pattern_bits,
                t.codebook_bits, self.fallback_bits, POS_BITS, t.NL,
                np.ascontiguousarray(lv16.reshape(-1)), np.ascontiguousarray(lens.reshape(-1)),
                np.ascontiguousarray(mtab), np.ascontiguousarray(np.exp2((s - smax)
                                                                          / self.scale_steps)),
                np.ascontiguousarray(self.ctab), np.ascontiguousarray(self.htab),
                np.ascontiguousarray(_PTAB))
            # every index the core can form from a block's bits stays inside these tables
            if (kt.levels.size < 16 << kt.pb or kt.lens.size < 16 << kt.cb
                    or kt.mtab.size < (1 << kt.cb) << MULTI_BITS or not 2 <= kt.NL <= 16
                    or kt.sbase.size != 1 << kt.sb or kt.ctab.size != 1 << kt.lb):
                raise CodecError("Ecco tables do not fit the decode core")
            for a in kt[8:]:
                a.setflags(write=False)
            self._kt = kt
        return self._kt

    # -- config -------------------------------------------------------------------------
    @property
    def _embed_profile(self) -> bool:
        """Tables travel with the data unless they are a shipped profile's."""
        return not is_shipped(self.profile_hash)

    def get_config(self) -> dict[str, Any]:
        src = self.profile_source
        return {
            "id": self.codec_id,
            "variant": self.variant,
            "group_size": GROUP_SIZE,
            "profile": src if src is not None else None,
            "profile_hash": self.profile_hash,
            "candidates": self.candidates,
            "patch_order": self.patch_order,
            "trim_passes": self.trim_passes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EccoCodec:
        """Build from a JSON config, e.g. one read from untrusted bytes: never opens a file.

        A config names its tables only by `profile_hash` (tables already registered in this
        process: the shipped default, a profile user code loaded, or tables embedded in the
        data) or as "default". A path in "profile" is kept only as a label; to load tables
        from a file, pass the path to the constructor (`EccoCodec(profile=PATH)`).
        """
        cfg = dict(config)
        cfg.pop("id", None)
        h = cfg.get("profile_hash")
        ref = cfg.get("profile", "default")
        if h is not None and not isinstance(h, str):
            raise ValueError(f"Ecco profile_hash must be a string, got {h!r}")
        if not (ref is None or isinstance(ref, str)):
            raise ValueError(f"Ecco config 'profile' must be 'default', null or a label "
                             f"string, got {type(ref).__name__}")
        if ref is None or ref in SHIPPED_PROFILES:  # package resources, never a user path
            return cls(**cfg)
        if h is None:
            raise ValueError(
                f"Ecco config names profile {ref!r} without a profile_hash: a config never "
                "opens a profile file; give EccoCodec(profile=PATH) to load one")
        cfg["profile"] = None
        codec = cls(**cfg)
        codec.profile_source = ref  # the label the data carries, so get_config round-trips
        return codec

    @staticmethod
    def prepare(c: Compressed) -> None:
        """Check and register a profile embedded in `c` (non-default profiles travel with
        the data). The tables are validated as a profile file's are (shapes, dtypes, sorted
        finite levels in [-1, 1], code lengths 1..8 forming complete prefix codes) and must
        fit the variant's block before they are registered (bounded registry, LRU)."""
        has_lv, has_ln = "profile_levels" in c.arrays, "profile_lengths" in c.arrays
        if not (has_lv or has_ln):
            return
        if not (has_lv and has_ln):
            raise CodecError("embedded Ecco profile needs both profile_levels and "
                             "profile_lengths")
        h = c.codec_config.get("profile_hash")
        if not isinstance(h, str):
            raise CodecError("data with an embedded Ecco profile must name its profile_hash")
        try:
            t = VariantTables(np.ascontiguousarray(c.arrays["profile_levels"]),
                              np.ascontiguousarray(c.arrays["profile_lengths"]))
        except ValueError as e:
            raise CodecError(f"embedded Ecco profile is invalid: {e}") from None
        if t.hash != h:
            raise CodecError("embedded Ecco profile does not match the data's profile hash")
        if lookup_tables(h, missing_ok=True) is not None:
            return
        variant = c.codec_config.get("variant")
        if variant not in VARIANTS:
            raise CodecError(f"unknown Ecco variant {variant!r} in the data")
        try:  # the tables must fit the block format: a codec builds and its kernel tables
            EccoCodec(variant, profile=None, tables=t).kernel_tables()  # pass the core's
        except ValueError as e:
            raise CodecError(f"embedded Ecco profile does not fit {variant}: {e}") from None
        register_tables(t, embedded=True)

    def check_compatible(self, c: Compressed) -> None:
        cfg = c.codec_config
        if cfg.get("id") != self.codec_id or cfg.get("variant") != self.variant:
            raise CodecError(f"data is {cfg.get('id')}/{cfg.get('variant')}, codec is "
                             f"{self.codec_id}/{self.variant}")
        if cfg.get("profile_hash") != self.profile_hash:
            raise CodecError(
                f"wrong Ecco profile: data was encoded with profile {cfg.get('profile_hash')}, "
                f"this codec uses {self.profile_hash}"
            )

    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        s["fallback_rate"] = s["fallback_blocks"] / max(1, s["blocks"])
        return s

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0

    # -- arrays -------------------------------------------------------------------------
    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        lay = Layout(c.shape, c.axis, GROUP_SIZE)
        exp: dict[str, tuple[Any, tuple[int, ...]]] = {
            "blocks": (np.uint64, (lay.nblocks * self.words + 1,)),
            "tscale": (np.float32, (1,)),
        }
        if "profile_levels" in c.arrays:
            exp["profile_levels"] = (np.float32, (self.t.S, self.t.NL))
            exp["profile_lengths"] = (np.uint8, (self.t.H, self.t.NL))
        return exp

    def validate(self, c: Compressed) -> None:
        super().validate(c)
        ts = float(c.arrays["tscale"][0])
        if not (math.isfinite(ts) and ts >= 0.0):
            raise CodecError(f"invalid per-tensor scale {ts}")

    def scale_table(self, tscale: float) -> np.ndarray:
        """float32 group scales for every scale code; code 0 is the all-zero group."""
        tab = (float(tscale) * self.kernel_tables().sbase).astype(np.float32)
        tab[0] = 0.0
        return tab

    # -- encode -------------------------------------------------------------------------
    supports_importance = True

    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int,
                importance: np.ndarray | None = None) -> Compressed:
        """`importance` (the axis length, mean 1, from `Codec.encode`) weights the error of
        every position in each choice the encoder makes (pattern, trimming, patches): E[x_j^2]
        of the input channels for activation-aware weights. The format is unchanged."""
        from eccokv.kernels.ecco_numba import encode_blocks

        lay = Layout(shape, axis, GROUP_SIZE)
        tscale = float(x.abs().max()) if x.numel() else 0.0
        words = np.zeros(lay.nblocks * self.words + 1, dtype=np.uint64)
        fallback = np.zeros(lay.nblocks, dtype=np.uint8)
        if lay.nblocks:
            groups = to_rows(x, lay)
            nvalid_last = lay.length - (lay.ngroups - 1) * GROUP_SIZE
            pos_w = np.ones(lay.ngroups * GROUP_SIZE, np.float64)
            if importance is not None:
                pos_w[:lay.length] = importance
            t = self.t
            encode_blocks(
                groups, nvalid_last, lay.ngroups, t.levels64, t.mids, t.kstart, t.lengths, t.codes,
                t.errtab, N_BUCKETS, self.scale_table(tscale), np.float64(tscale),
                np.float64(self.scale_steps), self.scale_bits, self.low_bits, self.ctab,
                self.htab, t.pattern_bits, t.codebook_bits, self.fallback_bits, POS_BITS,
                self.block_bits,
                self.candidates, self.patch_order == "error", self.trim_passes, pos_w, words,
                fallback,
            )
            with self._lock:
                self._stats["blocks"] += lay.nblocks
                self._stats["fallback_blocks"] += int(fallback.sum())
                self._stats["zero_blocks"] += int(
                    np.count_nonzero((words[:-1].reshape(-1, self.words)[:, 0] >> 2)
                                     & ((1 << self.scale_bits) - 1) == 0))
        arrays = {"blocks": words, "tscale": np.array([tscale], dtype=np.float32)}
        if self._embed_profile:
            arrays["profile_levels"] = self.tables.levels
            arrays["profile_lengths"] = self.tables.lengths
        return make_compressed(self, shape, x.dtype, axis, arrays)

    # -- decode -------------------------------------------------------------------------
    def _decode(self, c: Compressed, out: torch.Tensor) -> None:
        from eccokv.kernels.ecco_numba import decode_blocks

        lay = Layout(c.shape, c.axis, GROUP_SIZE)
        tables, tscale = self.kernel_tables(), np.float64(c.arrays["tscale"][0])
        decode_blocks_into(
            out, lay.nblocks,
            lambda arr, kind, bad: decode_blocks(c.arrays["blocks"], lay.nblocks, tables,
                                                 tscale, lay.length, lay.ngroups, lay.suffix,
                                                 arr, kind, bad),
            "Ecco blocks are corrupt: a code stream overruns its block")

    # -- reference ----------------------------------------------------------------------
    def decode_reference(self, c: Compressed) -> torch.Tensor:
        """Readable numpy decoder (float32); the fast decoder must equal it bit for bit."""
        from eccokv.kernels.ecco_reference import reference_decode

        self.check_compatible(c)
        self.validate(c)
        return reference_decode(self, c)
