"""Readable numpy reference decoder for Ecco blocks (vectorised over blocks, not fast).

It follows docs/format.md literally: unpack every block to bits (LSB-first), read the
header fields, walk the Huffman codes symbol by symbol with a canonical-code table, then
apply the patches. The numba decoder must produce bit-identical float32 output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from eccokv.codecs.base import CodecError, Compressed, Layout, from_rows

if TYPE_CHECKING:
    from eccokv.codecs.ecco import EccoCodec


def _field(bits: np.ndarray, pos: np.ndarray, n: int) -> np.ndarray:
    """Read an n-bit little-endian field at per-block bit offsets `pos` -> int64 (nb,)."""
    rows = np.arange(bits.shape[0])
    out = np.zeros(bits.shape[0], dtype=np.int64)
    for k in range(n):
        out |= bits[rows, np.minimum(pos + k, bits.shape[1] - 1)].astype(np.int64) << k
    return out


def reference_decode(codec: EccoCodec, c: Compressed) -> torch.Tensor:
    """Decode `c` to a float32 tensor of c.shape."""
    from eccokv.codecs.ecco import _PTAB, GROUP_SIZE, POS_BITS

    lay = Layout(c.shape, c.axis, GROUP_SIZE)
    nb, g, W = lay.nblocks, GROUP_SIZE, codec.words
    words = c.arrays["blocks"][: nb * W].reshape(nb, W)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # (nb, block_bits)
    t = codec.t
    sb, lb, pb, cb = codec.scale_bits, codec.low_bits, t.pattern_bits, t.codebook_bits
    mode = _field(bits, np.zeros(nb, np.int64), 1)
    neg = _field(bits, np.ones(nb, np.int64), 1)
    scode = _field(bits, np.full(nb, 2), sb)
    low = _field(bits, np.full(nb, 2 + sb), lb)
    pattern = _field(bits, np.full(nb, 2 + sb + lb), pb)
    book = _field(bits, np.full(nb, 2 + sb + lb + pb), cb)
    table = codec.scale_table(float(c.arrays["tscale"][0]))
    # signed group max; a level l decodes to l * A + B
    sg = table[scode] * np.where(neg == 1, np.float32(-1), np.float32(1))
    A = sg * codec.htab[low]
    B = sg * codec.ctab[low]
    out = np.zeros((nb, g), dtype=np.float32)
    pos = np.full(nb, codec.header_bits, dtype=np.int64)
    huff = mode == 0
    # Huffman mode: a max-length peek indexes the (symbol | length << 4) table.
    for j in range(g):
        peek = _field(bits, pos, 8)
        entry = t.dtab[book * 256 + peek].astype(np.int64)
        sym, ln = entry & 15, entry >> 4
        val = t.levels_flat[pattern * t.NL + sym] * A + B
        out[huff, j] = val[huff]
        pos[huff] += ln[huff]
    # Always-fits mode: fixed-width codes q index an evenly spaced subset of the
    # pattern's levels: level ((q + 1) * NL >> fb) - 1.
    fb = codec.fallback_bits
    for j in range(g):
        q = _field(bits, pos, fb)
        lv = t.levels_flat[pattern * t.NL + (((q + 1) * t.NL) >> fb) - 1]
        out[~huff, j] = (lv * A + B)[~huff]
        pos[~huff] += fb
    overrun = (pos > codec.block_bits) & (scode != 0)
    if overrun.any():
        raise CodecError(f"{int(overrun.sum())} Ecco blocks are corrupt (code stream overruns)")
    # Patches: (position, int8 value) pairs in the remaining bits.
    pbits = POS_BITS + 8
    while True:
        has = (pos + pbits <= codec.block_bits) & (scode != 0)
        if not has.any():
            break
        jp = _field(bits, pos, POS_BITS)
        q = _field(bits, pos + POS_BITS, 8)
        rows = np.flatnonzero(has)
        out[rows, jp[rows]] = _PTAB[q[rows]] * A[rows] + B[rows]
        pos[has] += pbits
    out[scode == 0] = 0.0
    return from_rows(out, lay).contiguous()
