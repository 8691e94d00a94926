"""The one decode core of the ecco-eb (error-bounded, variable-rate) block format.

Format (docs/format.md, section 4): a tensor is cut into groups of 128 values as Ecco's
are (`Layout`); block b = m * ngroups + g is a bit string of variable length in the `data`
words (bits LSB-first in little-endian uint64 words, one extra zero word at the end). The
offset index holds the bit offset of every 8th block (`index[b >> 3]`, uint32, plus the
total as a last entry); a block starts with its own length, so block b is found by
walking the lengths of at most 7 blocks before it. Block fields, LSB-first:

    len (13 bits: the block's length in bits, header included) | cb (4 bits) | ...
    cb 0..13  Huffman, codebook cb:  k (KB) | z (ZB, two's complement) | ew (5) |
                                     n codes | one ew-bit e per escape, in order
    cb 14     fixed width:           k (KB) | z (ZB) | w - 1 (5) | n codes of w bits
    cb 15     exact:                 sub (1): 0 = constant: one float32 value follows;
                                     1 = raw: n float32 values follow

n is the group's number of values: 128, or fewer in the last group of a row (no padding
is coded: variable-size blocks do not need it).

KB and ZB are per-tensor field widths. The step is A = float32(d0 * 2 ** (-k / 16)) with
d0 the per-tensor float32 step; the offset is B = float32(z * A). A Huffman symbol s is
the zigzag code of e = q - z (s = 2e for e >= 0, -2e - 1 below) for |e| <= 31; symbol 63 is
an escape whose e (two's complement, ew bits) follows the codes, as Ecco's patches
follow its codes. A fixed-width code is e itself, and the value is
``float32(e * A) + B``: the same code-space form (level,
A, B) as Ecco's, so attention applies A and B once per block. Exact blocks decode as
(value, 1, 0) per value or (0, 0, value) for a constant.

The Huffman symbol pass is the shared stream decoder of `ecco_core` (`symbols4_at`,
`tail_at`: multi-symbol table lookups, four streams side by side); only the header and
the symbol -> level step are stated here. Callers validate the index and every block's
length field once (`eb_numba.check_blocks`) before any of these functions run: after
that, a block never extends past the data, and a Huffman stream that does not end
exactly at its block's end is flagged corrupt, never read past.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eccokv.kernels.ecco_core import MULTI_BITS, SYM_STRIDE, peek, symbols4_at, tail_at

__all__ = ["G", "LEN_BITS", "CB_BITS", "NSYM", "ESC", "EMAX", "NCODEBOOKS", "MAX_LEN",
           "STEP_RES", "SB_BLOCKS"]

G = 128
LEN_BITS = 13
CB_BITS = 4
W_BITS = 5
NSYM = 64  # Huffman alphabet: e in [-31, 31] zigzag coded (0..62), 63 = escape
ESC = NSYM - 1
EMAX = 31  # largest |e| coded as a symbol
NCODEBOOKS = 14  # cb 0..13; 14 = fixed width, 15 = exact
CB_FIXED = 14
CB_EXACT = 15
MAX_LEN = 10  # longest Huffman code (the 11-bit multi-symbol peek holds one)
MAX_WIDTH = 24  # widest fixed-width code
STEP_RES = 16  # step codes per octave: A = d0 * 2 ** (-k / STEP_RES)
SB_BLOCKS = 8  # blocks per index entry
SB_SHIFT = 3

_ONE = np.uint64(1)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


@njit(inline="always", cache=True)
def field(words, pos, n):
    """n (<= 32) bits of the stream at absolute bit `pos`."""
    return np.int64(peek(words, np.int64(pos >> 3), np.int64(pos & 7))
                    & ((_ONE << np.uint64(n)) - _ONE))


@njit(inline="always", cache=True)
def locate(words, index, b):
    """(start bit, length in bits) of block b: from its index entry, over the length
    fields of the blocks before it in its group of 8."""
    pos = np.int64(index[b >> SB_SHIFT])
    for _ in range(b & (SB_BLOCKS - 1)):
        pos += field(words, pos, LEN_BITS)
    return pos, field(words, pos, LEN_BITS)


@njit(inline="always", cache=True)
def header(words, pos, KB, ZB, d0, sbase):
    """(cb, A, B, bit position of the codes, fixed width or exact sub-mode) of the block
    starting at bit `pos`."""
    o = pos + LEN_BITS
    cb = field(words, o, CB_BITS)
    o += CB_BITS
    if cb == CB_EXACT:
        return cb, _F1, _F0, o + 1, field(words, o, 1)
    k = field(words, o, KB) if KB > 0 else np.int64(0)
    o += KB
    z = field(words, o, ZB) if ZB > 0 else np.int64(0)
    if ZB > 0 and (z >> (ZB - 1)) & 1:
        z -= np.int64(1) << ZB
    o += ZB
    A = np.float32(d0 * sbase[k])
    B = np.float32(np.float64(z) * np.float64(A))
    w = field(words, o, W_BITS)  # fixed: width - 1; Huffman: escape width (0: none)
    o += W_BITS
    if cb == CB_FIXED:
        w += 1
    return cb, A, B, o, w


@njit(inline="always", cache=True)
def zigzag_levels(sy, so, n, lv, lo):
    """lv[lo + j] = e of zigzag symbol sy[so + j] (j < n), as float32; returns how many
    are escapes (one pass)."""
    ne = np.int32(0)
    src = sy[so:so + n]
    dst = lv[lo:lo + n]
    for j in range(n):  # 32-bit integer ops: vectorised 16 wide with AVX-512
        s = np.int32(src[j])
        dst[j] = np.float32((s >> np.int32(1)) ^ -(s & np.int32(1)))
        ne += np.int32(s == np.int32(ESC))
    return np.int64(ne)


@njit(inline="always", cache=True)
def escapes(words, bb, pos, BB, ew, sy, so, n, ne, lv, lo):
    """Apply the ne escapes of a Huffman block whose codes end at bit pos (relative to
    byte bb) and whose block ends at BB: every symbol ESC takes the next ew-bit e.
    Returns 1 if the escapes do not fill the block exactly (or a stream overran):
    corrupt."""
    if pos > BB:
        return np.int64(1)
    if ne == 0:
        return np.int64(pos != BB or ew != 0)
    if ew == 0 or pos + ne * ew != BB:
        return np.int64(1)
    sh = np.int64(64 - ew)
    for j in range(n):
        if sy[so + j] == ESC:
            v = np.int64(np.uint64(peek(words, bb, pos)) << np.uint64(sh)) >> sh
            lv[lo + j] = np.float32(v)
            pos += ew
    return np.int64(0)


@njit(inline="always", cache=True)
def other_block(words, pos, cb, A, B, o, w, n, lv, lo, AB, i):
    """Decode a fixed-width or exact block of n values (codes from bit o) into
    lv[lo : lo+n] and AB[2i], AB[2i+1]."""
    if cb == CB_EXACT:
        if w == 0:  # constant
            v = np.uint32(field(words, o, 32))
            AB[2 * i] = _F0
            AB[2 * i + 1] = np.array([v], np.uint32).view(np.float32)[0]
            for j in range(G):
                lv[lo + j] = _F0
            return
        raw = np.empty(G, np.uint32)
        for j in range(n):
            raw[j] = np.uint32(field(words, o + 32 * j, 32))
        vals = raw.view(np.float32)
        for j in range(n):
            lv[lo + j] = vals[j]
        AB[2 * i] = _F1
        AB[2 * i + 1] = _F0
        return
    AB[2 * i] = A
    AB[2 * i + 1] = B
    for j in range(n):
        lv[lo + j] = np.float32(field(words, o + w * j, w))


@njit(cache=True, error_model="numpy")
def decode1(words, index, b, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo, AB, i):
    """Decode block b of n valid values in code space: levels -> lv[lo : lo+n], A ->
    AB[2i], B -> AB[2i+1]. Returns 1 if its codes do not end exactly at the block's end."""
    pos, ln = locate(words, index, b)
    return decode1_at(words, pos, ln, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo, AB, i)


@njit(cache=True, error_model="numpy")
def decode1_at(words, pos, ln, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo, AB, i):
    """`decode1` for the block at bit pos of length ln (from `locate`, or the previous
    block of the row plus its length)."""
    cb, A, B, o, w = header(words, pos, KB, ZB, d0, sbase)
    if cb >= CB_FIXED:
        other_block(words, pos, cb, A, B, o, w, n, lv, lo, AB, i)
        return 0
    AB[2 * i] = A
    AB[2 * i + 1] = B
    bb = pos >> 3
    BB = pos + ln - (bb << 3)
    e = tail_at(words, bb, o - (bb << 3), 0, n, sy, BB, mtab,
                np.uint64(cb << MULTI_BITS), lens, cb * NSYM, np.uint8(NSYM - 1))
    ne = zigzag_levels(sy, 0, n, lv, lo)
    return escapes(words, bb, e, BB, w, sy, 0, n, ne, lv, lo)


@njit(inline="always", cache=True)
def decode4(words, index, b0, b1, b2, b3, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo, AB,
            i0):
    """Decode blocks b0..b3 of n valid values each (blocks of one group index) in code
    space (block k's levels -> lv[lo + 128 k ...], its A, B -> AB[2 (i0 + k)],
    AB[2 (i0 + k) + 1]); four Huffman streams run side by side through the shared
    stream decoder. Returns the number of corrupt blocks."""
    p0, n0 = locate(words, index, b0)
    p1, n1 = locate(words, index, b1)
    p2, n2 = locate(words, index, b2)
    p3, n3 = locate(words, index, b3)
    return decode4_at(words, p0, n0, p1, n1, p2, n2, p3, n3, n, KB, ZB, d0, sbase, mtab, lens,
                      sy, lv, lo, AB, i0)


@njit(inline="always", cache=True)
def decode4_at(words, p0, n0, p1, n1, p2, n2, p3, n3, n, KB, ZB, d0, sbase, mtab, lens, sy,
               lv, lo, AB, i0):
    """`decode4` for blocks at bit positions p0..p3 of lengths n0..n3 (consumers that walk
    a row's blocks in order pass the previous block's position plus its length, so no
    index walk is needed)."""
    c0, A0, B0, o0, w0 = header(words, p0, KB, ZB, d0, sbase)
    c1, A1, B1, o1, w1 = header(words, p1, KB, ZB, d0, sbase)
    c2, A2, B2, o2, w2 = header(words, p2, KB, ZB, d0, sbase)
    c3, A3, B3, o3, w3 = header(words, p3, KB, ZB, d0, sbase)
    if c0 >= CB_FIXED or c1 >= CB_FIXED or c2 >= CB_FIXED or c3 >= CB_FIXED:
        return (decode1_at(words, p0, n0, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo, AB,
                           i0)
                + decode1_at(words, p1, n1, n, KB, ZB, d0, sbase, mtab, lens, sy, lv, lo + G,
                             AB, i0 + 1)
                + decode1_at(words, p2, n2, n, KB, ZB, d0, sbase, mtab, lens, sy, lv,
                             lo + 2 * G, AB, i0 + 2)
                + decode1_at(words, p3, n3, n, KB, ZB, d0, sbase, mtab, lens, sy, lv,
                             lo + 3 * G, AB, i0 + 3))
    AB[2 * i0 + 0] = A0
    AB[2 * i0 + 1] = B0
    AB[2 * i0 + 2] = A1
    AB[2 * i0 + 3] = B1
    AB[2 * i0 + 4] = A2
    AB[2 * i0 + 5] = B2
    AB[2 * i0 + 6] = A3
    AB[2 * i0 + 7] = B3
    bb0 = p0 >> 3
    bb1 = p1 >> 3
    bb2 = p2 >> 3
    bb3 = p3 >> 3
    E0 = p0 + n0 - (bb0 << 3)
    E1 = p1 + n1 - (bb1 << 3)
    E2 = p2 + n2 - (bb2 << 3)
    E3 = p3 + n3 - (bb3 << 3)
    e0, e1, e2, e3 = symbols4_at(
        words, bb0, bb1, bb2, bb3, o0 - (bb0 << 3), o1 - (bb1 << 3), o2 - (bb2 << 3),
        o3 - (bb3 << 3), E0, E1, E2, E3, np.uint64(c0 << MULTI_BITS),
        np.uint64(c1 << MULTI_BITS), np.uint64(c2 << MULTI_BITS), np.uint64(c3 << MULTI_BITS),
        c0 * NSYM, c1 * NSYM, c2 * NSYM, c3 * NSYM, mtab, lens, np.uint8(NSYM - 1), n, sy)
    x0 = zigzag_levels(sy, 0, n, lv, lo)
    x1 = zigzag_levels(sy, SYM_STRIDE, n, lv, lo + G)
    x2 = zigzag_levels(sy, 2 * SYM_STRIDE, n, lv, lo + 2 * G)
    x3 = zigzag_levels(sy, 3 * SYM_STRIDE, n, lv, lo + 3 * G)
    return (escapes(words, bb0, e0, E0, w0, sy, 0, n, x0, lv, lo)
            + escapes(words, bb1, e1, E1, w1, sy, SYM_STRIDE, n, x1, lv, lo + G)
            + escapes(words, bb2, e2, E2, w2, sy, 2 * SYM_STRIDE, n, x2, lv, lo + 2 * G)
            + escapes(words, bb3, e3, E3, w3, sy, 3 * SYM_STRIDE, n, x3, lv, lo + 3 * G))
