"""`int`: asymmetric min/max integer quantisation in groups along the codec axis.

Grouping follows `Layout`: each row along `axis` is cut into groups of `group_size`
consecutive values; the last group of a row may be partial. Its min/max are taken over
the valid values only (the padding is filled with the row's last valid value).

Per group, with ``L = 2**bits - 1``:

* ``zero`` = the group min rounded *down* to the storage dtype,
* ``scale`` = ``(max - zero) / L`` rounded *up* to the storage dtype, so that
  ``[zero, zero + L * scale]`` covers ``[min, max]`` after rounding,
* ``code = clamp(rint((x - zero) / scale), 0, L)``; a group whose ``scale`` is 0 (constant,
  exactly representable) has every code 0 and decodes to ``zero``.

Decoding is ``zero + code * scale``. The error per value is at most ``scale / 2`` (up to
float rounding).

Storage dtype of ``scale``/``zero`` (recorded per tensor in ``meta["sdtype"]``): float16
normally, so bits/value = bits + 32 / group_size + a fixed header. float32 when the
tensor's abs-max exceeds 60000 (float16 would overflow) or is below 2**-6 (float16
subnormals would be too coarse).

Arrays:

* ``codes``: uint8, shape (ceil(rows * length * bits / 8),) — the codes of the *valid*
  values only (no padding), in row order (row m, then position t along the axis), packed
  as one dense little-endian bit stream: value i occupies bits [i*bits, (i+1)*bits) with
  bit 0 the least significant bit of byte 0. (bits=4: two per byte, low nibble first;
  bits=2: four per byte; bits=3: eight values in three bytes; bits=8: one per byte.)
* ``scale``, ``zero``: ``meta["sdtype"]``, shape (nblocks,), block b = m * ngroups + g.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eccokv.codecs import register
from eccokv.codecs.base import Codec, CodecError, Compressed, Layout, make_compressed, to_rows

ALLOWED_BITS = (2, 3, 4, 8)
MAX_GROUP = 65536
F16_LIMIT = 60000.0
F16_TINY = 2.0**-6
SDTYPES = {"float16": np.float16, "float32": np.float32}


def packed_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (< 2**bits) into a dense little-endian bit stream."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    n = codes.size
    if bits == 8:
        return codes.copy()
    if bits in (2, 4):
        k = 8 // bits
        c = np.zeros(-(-n // k) * k, dtype=np.uint8)
        c[:n] = codes
        c = c.reshape(-1, k)
        out = c[:, 0].copy()
        for i in range(1, k):
            out |= c[:, i] << np.uint8(bits * i)
        return out
    # generic (bits=3): 8 values -> `bits` bytes through a uint32 word
    nchunk = -(-n // 8)
    c = np.zeros(nchunk * 8, dtype=np.uint32)
    c[:n] = codes
    c = c.reshape(nchunk, 8)
    v = c[:, 0].copy()
    for i in range(1, 8):
        v |= c[:, i] << np.uint32(bits * i)
    out = np.empty((nchunk, bits), dtype=np.uint8)
    for j in range(bits):
        out[:, j] = v >> np.uint32(8 * j)
    return out.reshape(-1)[: packed_nbytes(n, bits)].copy()


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first `n` codes as uint8 (packed must be long enough)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_nbytes(n, bits):
        raise CodecError(f"int codec: {packed.size} code bytes cannot hold {n} codes")
    if bits == 8:
        return packed[:n]
    mask = (1 << bits) - 1
    if bits in (2, 4):
        k = 8 // bits
        out = np.empty((packed.size, k), dtype=np.uint8)
        for i in range(k):
            np.bitwise_and(packed >> np.uint8(bits * i), np.uint8(mask), out=out[:, i])
        return out.reshape(-1)[:n]
    nchunk = -(-n // 8)
    b = np.zeros(nchunk * bits, dtype=np.uint32)
    b[: packed.size] = packed[: nchunk * bits]
    b = b.reshape(nchunk, bits)
    v = b[:, 0].copy()
    for j in range(1, bits):
        v |= b[:, j] << np.uint32(8 * j)
    out = np.empty((nchunk, 8), dtype=np.uint8)
    for i in range(8):
        np.bitwise_and(v >> np.uint32(bits * i), np.uint32(mask), out=out[:, i], casting="unsafe")
    return out.reshape(-1)[:n]


def _check_int(name: str, v: Any) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ValueError(f"int codec: {name} must be an integer, got {v!r}")
    return int(v)


@register
class IntCodec(Codec):
    """Asymmetric per-group integer quantisation (KIVI-style when grouped along tokens)."""

    codec_id = "int"

    def __init__(self, bits: int = 4, group_size: int = 128) -> None:
        bits = _check_int("bits", bits)
        group_size = _check_int("group_size", group_size)
        if bits not in ALLOWED_BITS:
            raise ValueError(
                f"int codec: bits must be one of {', '.join(map(str, ALLOWED_BITS))}; "
                f"got {bits}"
            )
        if not 2 <= group_size <= MAX_GROUP:
            raise ValueError(
                f"int codec: group_size must be between 2 and {MAX_GROUP}; got {group_size}"
            )
        self.bits = bits
        self.group_size = group_size

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "bits": self.bits, "group_size": self.group_size}

    # -- structure ------------------------------------------------------------------------
    def _sdtype(self, c: Compressed) -> type:
        meta = c.meta
        if not isinstance(meta, dict) or set(meta) != {"sdtype"}:
            raise CodecError(f"int codec: meta must be {{'sdtype': ...}}, got {meta!r}")
        sd = meta["sdtype"]
        if not isinstance(sd, str) or sd not in SDTYPES:
            raise CodecError(
                f"int codec: meta sdtype must be one of {', '.join(SDTYPES)}; got {sd!r}"
            )
        return SDTYPES[sd]

    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        sd = self._sdtype(c)
        lay = Layout(c.shape, c.axis, self.group_size)
        return {
            "codes": (np.uint8, (packed_nbytes(lay.rows * lay.length, self.bits),)),
            "scale": (sd, (lay.nblocks,)),
            "zero": (sd, (lay.nblocks,)),
        }

    def validate(self, c: Compressed) -> None:
        super().validate(c)
        s, z = c.arrays["scale"], c.arrays["zero"]
        if s.size:
            if not (np.isfinite(s).all() and np.isfinite(z).all()):
                raise CodecError("int codec: non-finite group scale or zero-point")
            if (s < 0).any():
                raise CodecError("int codec: negative group scale")

    # -- encode ---------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int) -> Compressed:
        lay = Layout(shape, axis, self.group_size)
        if lay.numel == 0:
            empty = np.zeros(0, dtype=np.float16)
            return make_compressed(self, shape, x.dtype, axis,
                                   {"codes": np.zeros(0, np.uint8), "scale": empty,
                                    "zero": empty}, {"sdtype": "float16"})
        g = self.group_size
        groups = to_rows(x, lay)  # (nblocks, g) float32, zero-padded
        pad = lay.ngroups * g - lay.length
        if pad:  # fill the padding with the row's last valid value: min/max stay exact
            # (with padding, to_rows returned a fresh array, so this never writes into x)
            g3 = groups.reshape(lay.rows, lay.ngroups, g)
            nvalid = g - pad
            g3[:, -1, nvalid:] = g3[:, -1, nvalid - 1 : nvalid]
        mn = groups.min(axis=1)
        mx = groups.max(axis=1)
        absmax = max(float(np.abs(mn).max()), float(np.abs(mx).max()))
        use32 = absmax > F16_LIMIT or 0.0 < absmax < F16_TINY
        sd = np.float32 if use32 else np.float16
        cdt = np.float64 if use32 else np.float32  # compute dtype
        L = self.levels

        mn64, mx64 = mn.astype(np.float64), mx.astype(np.float64)
        zero = mn64.astype(sd)
        up = zero.astype(np.float64) > mn64
        zero[up] = np.nextafter(zero[up], sd(-np.inf))
        z64 = zero.astype(np.float64)
        scale = ((mx64 - z64) / L).astype(sd)
        low = z64 + L * scale.astype(np.float64) < mx64
        scale[low] = np.nextafter(scale[low], sd(np.inf))

        sc = scale.astype(cdt)
        safe = np.where(sc == 0, cdt(1), sc)
        q = (groups.astype(cdt, copy=False) - zero.astype(cdt)[:, None]) / safe[:, None]
        np.rint(q, out=q)
        np.clip(q, 0, L, out=q)
        codes = q.astype(np.uint8).reshape(lay.rows, lay.ngroups * g)[:, : lay.length]
        packed = pack_codes(codes, self.bits)
        return make_compressed(self, shape, x.dtype, axis,
                               {"codes": packed, "scale": scale, "zero": zero},
                               {"sdtype": "float32" if use32 else "float16"})

    # -- decode ---------------------------------------------------------------------------
    def _decode(self, c: Compressed, out: torch.Tensor) -> None:
        lay = Layout(c.shape, c.axis, self.group_size)
        g = self.group_size
        scale, zero = c.arrays["scale"], c.arrays["zero"]
        use32 = scale.dtype == np.float32
        cdt = np.float64 if use32 else np.float32
        codes = unpack_codes(c.arrays["codes"], lay.rows * lay.length, self.bits)
        codes = codes.reshape(lay.rows, lay.length)
        width = lay.ngroups * g
        if width != lay.length:
            full = np.zeros((lay.rows, width), dtype=np.uint8)
            full[:, : lay.length] = codes
            codes = full
        vals = codes.reshape(lay.nblocks, g).astype(cdt)
        vals *= scale.astype(cdt)[:, None]
        vals += zero.astype(cdt)[:, None]
        if use32:
            lim = float(torch.finfo(c.dtype).max)
            np.clip(vals, -lim, lim, out=vals)
            vals = vals.astype(np.float32)
        t = torch.from_numpy(vals).reshape(lay.rows, width)[:, : lay.length]
        t = t.reshape(lay.prefix, lay.suffix, lay.length).permute(0, 2, 1)
        out.copy_(t.reshape(out.shape))
