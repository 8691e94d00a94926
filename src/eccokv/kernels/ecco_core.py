"""The one decode core of the Ecco block format (docs/format.md, section 2).

Every consumer of Ecco blocks -- the plain decoder (`ecco_numba.decode_blocks`) and the
fused attention kernels (`attention_numba`) -- decodes through the functions here; the
format is stated nowhere else in the kernels (the numpy reference decoder,
`ecco_reference.py`, restates it on purpose, as the independent oracle of the tests).

Blocks are decoded in *code space*: a block gives its 128 levels l (the pattern's
normalised values, patches included) and two float32 numbers A, B; the value is
``l * A + B``. Consumers apply A and B once per block (a dot product over levels, then
one multiply-add), not per value.

Decoding a Huffman block has two phases, as in zstd's fast loops:

1. Symbols: a serial pass over the bit stream. An L-bit peek indexes a multi-symbol
   table (`EccoTables.mtab`, entries of up to 3 symbols, see
   `eccokv.entropy.huffman.multi_decode_table`); one unaligned 32-bit store writes the
   entry's symbols as bytes. Four blocks are decoded side by side so their serial chains
   overlap; one unaligned 64-bit load feeds up to five lookups.
2. Levels: symbols -> float32 levels through the block's pattern, then the patches.

Bounds: blocks arrays hold ``nblocks * W + 1`` words (the extra zero word lets a load
start anywhere in the last block). The hot loop is unchecked; the bit position is checked
once per peek (a segment end): a stream that reaches its block's end before its 128th
symbol is corrupt and is flagged, never read past. Loads therefore never start beyond
the block's last byte. Callers validate array sizes before entering (numba does not
bounds-check).
"""

from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as _llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["EccoTables", "MULTI_BITS", "SYM_STRIDE", "symbols4_at", "tail_at"]

G = 128  # values per block
MULTI_BITS = 11  # peek width of the multi-symbol table (4 codebooks x 8 KB: fits L1)
SYM_STRIDE = 152  # bytes per block in a symbol buffer (128 + 14 overrun + a 4-byte store)

_ONE = np.uint64(1)
_U3 = np.uint64(3)
_U7 = np.uint64(7)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


class EccoTables(NamedTuple):
    """Everything a kernel needs to decode one Ecco variant + profile (frozen, built once
    per codec by `EccoCodec.kernel_tables`). Block fields: mode(1) | sign(1) | scale(sb) |
    low end(lb) | pattern(pb) | codebook(cb); fb: always-fits code width; ps: patch
    position bits; NL levels per pattern."""

    block_bits: int
    sb: int
    lb: int
    pb: int
    cb: int
    fb: int
    ps: int
    NL: int
    levels: np.ndarray  # float32 (S * 16,): pattern p's level k at p * 16 + k
    lens: np.ndarray  # uint8 (H * 16,): code length of symbol k in codebook h at h * 16 + k
    mtab: np.ndarray  # uint32 (H << MULTI_BITS,): multi-symbol entries
    sbase: np.ndarray  # float64 (2**sb,): 2**((s - smax) / R); group scale = tscale * it
    ctab: np.ndarray  # float32 (2**lb,): B / signed max per low-end code
    htab: np.ndarray  # float32 (2**lb,): A / signed max per low-end code
    ptab: np.ndarray  # float32 (256,): patch level of int8 code q (q / 127)


# ----------------------------------------------------------------------------- intrinsics


@intrinsic
def load_u64(typingctx, arr, byte):
    """8 bytes of a C-contiguous array starting at byte offset `byte` (unaligned)."""
    if not isinstance(arr, types.Array) or not isinstance(byte, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        p = builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [off])
        return builder.load(builder.bitcast(p, ir.IntType(64).as_pointer()), align=1)

    return types.uint64(arr, byte), codegen


@intrinsic
def store_u32(typingctx, arr, byte, val):
    """Store the uint32 `val` at byte offset `byte` of a C-contiguous array (unaligned)."""
    if (not isinstance(arr, types.Array) or not isinstance(byte, types.Integer)
            or not isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        v = context.cast(builder, args[2], sig.args[2], types.uint32)
        p = builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [off])
        builder.store(v, builder.bitcast(p, ir.IntType(32).as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(arr, byte, val), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The bits of a float32 as a uint32."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


# AVX-512F: a 16-entry float32 table is one register and `vpermps` looks up 16 symbols
# at once. Compiled kernels are cached per host CPU, so the choice is fixed per machine.
HAVE_AVX512 = bool(_llvm.get_host_cpu_features().get("avx512f", False))


@intrinsic
def lut16(typingctx, table, tofs, syms, sofs, out, oofs):
    """out[oofs : oofs+16] = table[tofs + (syms[sofs : sofs+16] & 15)] with one AVX-512
    permute (table: float32, 16 entries from tofs; syms: uint8; out: float32)."""
    if not all(isinstance(a, types.Array) for a in (table, syms, out)):
        return None

    def codegen(context, builder, sig, args):
        f16 = ir.VectorType(ir.FloatType(), 16)
        i16 = ir.VectorType(ir.IntType(32), 16)
        b16 = ir.VectorType(ir.IntType(8), 16)

        def ptr(k, ty):
            ary = context.make_array(sig.args[k])(context, builder, args[k])
            off = context.cast(builder, args[k + 1], sig.args[k + 1], types.intp)
            return builder.bitcast(builder.gep(ary.data, [off]), ty.as_pointer())

        tv = builder.load(ptr(0, f16), align=4)
        idx = builder.zext(builder.load(ptr(2, b16), align=1), i16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, i16]),
                                            "llvm.x86.avx512.permvar.sf.512")
        r = builder.call(fn, [tv, idx])
        # two 256-bit stores: the consumers' vectorised loops read 256-bit vectors, which
        # store forwarding serves from a store of the same width (a 512-bit store stalled)
        f8 = ir.VectorType(ir.FloatType(), 8)
        lo = builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                     list(range(8))))
        hi = builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                     list(range(8, 16))))
        p8 = ptr(4, f8)
        builder.store(lo, p8, align=4)
        builder.store(hi, builder.gep(p8, [ir.Constant(ir.IntType(64), 1)]), align=4)
        return context.get_dummy_value()

    return types.void(table, tofs, syms, sofs, out, oofs), codegen


@njit(inline="always", cache=True)
def peek(words, base_byte, pos):
    """>= 57 valid stream bits starting at bit `pos` of the block at byte `base_byte`."""
    p = np.uint64(pos)
    return load_u64(words, np.uint64(base_byte) + (p >> _U3)) >> (p & _U7)


# ----------------------------------------------------------------------------- header


@njit(inline="always", cache=True)
def header(words, b, t, tsc):
    """(mode, scale code, pattern, codebook, A, B) of block b: a code-space level l
    decodes to l * A + B. The group scale is float32(tscale * sbase[s]); s == 0 marks an
    all-zero block (A = B = 0)."""
    W = t.block_bits >> 6
    w0 = words[b * W]
    mode = np.int64(w0 & _ONE)
    s = np.int64((w0 >> np.uint64(2)) & ((_ONE << np.uint64(t.sb)) - _ONE))
    o = 2 + t.sb
    q = np.int64((w0 >> np.uint64(o)) & ((_ONE << np.uint64(t.lb)) - _ONE))
    o += t.lb
    p = np.int64((w0 >> np.uint64(o)) & ((_ONE << np.uint64(t.pb)) - _ONE))
    o += t.pb
    h = np.int64((w0 >> np.uint64(o)) & ((_ONE << np.uint64(t.cb)) - _ONE))
    sg = np.float32(tsc * t.sbase[s])
    if s == 0:
        sg = _F0
    if (w0 >> _ONE) & _ONE:
        sg = -sg
    return mode, s, p, h, sg * t.htab[q], sg * t.ctab[q]


@njit(inline="always", cache=True)
def header_bits(t):
    return 2 + t.sb + t.lb + t.pb + t.cb


# ----------------------------------------------------------------------------- phase 1


@njit(inline="always", cache=True)
def _look5(m, toff, x, c, j, sy):
    """Five multi-symbol lookups from the peeked bits x (5 x 11 bits <= 57): symbols
    -> sy[j ...]. Returns (c, j) advanced."""
    M = np.uint64(2047)
    for _ in range(5):
        e = m[toff + (x & M)]
        store_u32(sy, j, e)
        j += np.int64((e >> np.uint32(24)) & np.uint32(3))
        n = np.uint64(e >> np.uint32(26))
        x >>= n
        c += np.int64(n)
    return c, j


@njit(inline="always", cache=True)
def _tail(words, bb, c, j, jend, sy, t, toff, h):
    """Finish one stream: lookups until symbol jend is reached, then give back the bits
    of the symbols decoded past it (they were patch bits) using the code lengths.
    Returns the bit position after the block's last code (> block_bits: corrupt)."""
    BB = t.block_bits
    while j < jend:
        if c >= BB:
            return BB + 1
        c, j = _look5(t.mtab, toff, peek(words, bb, c), c, j, sy)
    lo = h * 16
    while j > jend:
        j -= 1
        c -= np.int64(t.lens[lo + np.int64(sy[j] & np.uint8(15))])
    return c


@njit(inline="always", cache=True)
def symbols1(words, b, h, t, sy, so):
    """Phase 1 for one mode-0 block b (codebook h): its 128 symbols -> sy[so : so+128]
    (sy needs SYM_STRIDE bytes from so). Returns the bit position after the last code
    (> block_bits: corrupt)."""
    W = t.block_bits >> 6
    return _tail(words, b * W * 8, header_bits(t), so, so + G, sy, t,
                 np.uint64(h << MULTI_BITS), h)


@njit(inline="always", cache=True)
def symbols4(words, b0, b1, b2, b3, h0, h1, h2, h3, t, sy):
    """Phase 1 for four mode-0 blocks side by side -> sy[i * SYM_STRIDE ...]. Lookups
    run on past symbol 128 (at most 14 more, into SYM_STRIDE's slack) and `_tail` gives
    their bits back. Four streams ran 1.5x faster than two here, despite some register
    spills. Returns the four end positions (> block_bits: corrupt)."""
    W = t.block_bits >> 6
    BB = t.block_bits
    m = t.mtab
    bb0 = b0 * W * 8
    bb1 = b1 * W * 8
    bb2 = b2 * W * 8
    bb3 = b3 * W * 8
    t0 = np.uint64(h0 << MULTI_BITS)
    t1 = np.uint64(h1 << MULTI_BITS)
    t2 = np.uint64(h2 << MULTI_BITS)
    t3 = np.uint64(h3 << MULTI_BITS)
    hb = header_bits(t)
    c0 = hb
    c1 = hb
    c2 = hb
    c3 = hb
    j0 = 0
    j1 = SYM_STRIDE
    j2 = 2 * SYM_STRIDE
    j3 = 3 * SYM_STRIDE
    E0 = G
    E1 = SYM_STRIDE + G
    E2 = 2 * SYM_STRIDE + G
    E3 = 3 * SYM_STRIDE + G
    M = np.uint64(2047)
    while (j0 < E0 and j1 < E1 and j2 < E2 and j3 < E3 and c0 < BB and c1 < BB and c2 < BB
           and c3 < BB):
        x0 = peek(words, bb0, c0)
        x1 = peek(words, bb1, c1)
        x2 = peek(words, bb2, c2)
        x3 = peek(words, bb3, c3)
        for _ in range(4):
            e0 = m[t0 + (x0 & M)]
            e1 = m[t1 + (x1 & M)]
            e2 = m[t2 + (x2 & M)]
            e3 = m[t3 + (x3 & M)]
            store_u32(sy, j0, e0)
            store_u32(sy, j1, e1)
            store_u32(sy, j2, e2)
            store_u32(sy, j3, e3)
            j0 += np.int64((e0 >> np.uint32(24)) & np.uint32(3))
            j1 += np.int64((e1 >> np.uint32(24)) & np.uint32(3))
            j2 += np.int64((e2 >> np.uint32(24)) & np.uint32(3))
            j3 += np.int64((e3 >> np.uint32(24)) & np.uint32(3))
            n0 = np.uint64(e0 >> np.uint32(26))
            n1 = np.uint64(e1 >> np.uint32(26))
            n2 = np.uint64(e2 >> np.uint32(26))
            n3 = np.uint64(e3 >> np.uint32(26))
            x0 >>= n0
            x1 >>= n1
            x2 >>= n2
            x3 >>= n3
            c0 += np.int64(n0)
            c1 += np.int64(n1)
            c2 += np.int64(n2)
            c3 += np.int64(n3)
    e0 = _tail(words, bb0, c0, j0, E0, sy, t, t0, h0)
    e1 = _tail(words, bb1, c1, j1, E1, sy, t, t1, h1)
    e2 = _tail(words, bb2, c2, j2, E2, sy, t, t2, h2)
    e3 = _tail(words, bb3, c3, j3, E3, sy, t, t3, h3)
    return e0, e1, e2, e3


@njit(inline="always", cache=True)
def tail_at(words, bb, c, j, jend, sy, BB, mtab, toff, lens, lo, smask):
    """Finish one stream of a block that starts at byte bb and ends at bit BB (relative to
    bb): lookups in mtab (from entry toff) until symbol jend is reached, then give back
    the bits of the symbols decoded past it using the code lengths lens[lo + symbol]
    (symbols masked by smask). Returns the bit position after the stream's last code
    (> BB: corrupt). `_tail` for blocks of variable size (ecco-eb)."""
    while j < jend:
        if c >= BB:
            return BB + 1
        c, j = _look5(mtab, toff, peek(words, bb, c), c, j, sy)
    while j > jend:
        j -= 1
        c -= np.int64(lens[lo + np.int64(sy[j] & smask)])
    return c


@njit(inline="always", cache=True)
def symbols4_at(words, bb0, bb1, bb2, bb3, c0, c1, c2, c3, BB0, BB1, BB2, BB3, t0, t1, t2,
                t3, lo0, lo1, lo2, lo3, m, lens, smask, n, sy):
    """Phase 1 for four Huffman streams of n (<= 128) symbols each, side by side ->
    sy[i * SYM_STRIDE ...]. Stream i starts at bit ci of the block at byte bbi, ends by
    bit BBi (relative to bbi), and is decoded with the multi-symbol table m from entry ti
    (code lengths lens[loi + symbol]). Lookups run on past symbol n (at most 14 more,
    into SYM_STRIDE's slack) and `tail_at` gives their bits back. Returns the four end
    positions (> BBi: corrupt). This is `symbols4` for blocks of variable size and
    length (ecco-eb); Ecco's fixed-size blocks keep their own copy: routing them through
    this general form slowed the fused ecco4 step by 6-10% here (llama3-8b layer, 4K).
    Sharing only the refill loop and the tail as inlined helpers cost the fused ecco4
    step 10-30% (2026-12-02, smollm2 and llama3-8b layers at 4K and 32K, 1 and 2
    threads; plain decoding did not change), so the copy stays: a change to the
    multi-symbol entries must be made in both."""
    j0 = 0
    j1 = SYM_STRIDE
    j2 = 2 * SYM_STRIDE
    j3 = 3 * SYM_STRIDE
    E0 = n
    E1 = SYM_STRIDE + n
    E2 = 2 * SYM_STRIDE + n
    E3 = 3 * SYM_STRIDE + n
    M = np.uint64(2047)
    while (j0 < E0 and j1 < E1 and j2 < E2 and j3 < E3 and c0 < BB0 and c1 < BB1
           and c2 < BB2 and c3 < BB3):
        x0 = peek(words, bb0, c0)
        x1 = peek(words, bb1, c1)
        x2 = peek(words, bb2, c2)
        x3 = peek(words, bb3, c3)
        for _ in range(4):
            e0 = m[t0 + (x0 & M)]
            e1 = m[t1 + (x1 & M)]
            e2 = m[t2 + (x2 & M)]
            e3 = m[t3 + (x3 & M)]
            store_u32(sy, j0, e0)
            store_u32(sy, j1, e1)
            store_u32(sy, j2, e2)
            store_u32(sy, j3, e3)
            j0 += np.int64((e0 >> np.uint32(24)) & np.uint32(3))
            j1 += np.int64((e1 >> np.uint32(24)) & np.uint32(3))
            j2 += np.int64((e2 >> np.uint32(24)) & np.uint32(3))
            j3 += np.int64((e3 >> np.uint32(24)) & np.uint32(3))
            n0 = np.uint64(e0 >> np.uint32(26))
            n1 = np.uint64(e1 >> np.uint32(26))
            n2 = np.uint64(e2 >> np.uint32(26))
            n3 = np.uint64(e3 >> np.uint32(26))
            x0 >>= n0
            x1 >>= n1
            x2 >>= n2
            x3 >>= n3
            c0 += np.int64(n0)
            c1 += np.int64(n1)
            c2 += np.int64(n2)
            c3 += np.int64(n3)
    e0 = tail_at(words, bb0, c0, j0, E0, sy, BB0, m, t0, lens, lo0, smask)
    e1 = tail_at(words, bb1, c1, j1, E1, sy, BB1, m, t1, lens, lo1, smask)
    e2 = tail_at(words, bb2, c2, j2, E2, sy, BB2, m, t2, lens, lo2, smask)
    e3 = tail_at(words, bb3, c3, j3, E3, sy, BB3, m, t3, lens, lo3, smask)
    return e0, e1, e2, e3


# ----------------------------------------------------------------------------- phase 2


@njit(inline="always", cache=True)
def levels_of(sy, so, t, p, lv, lo):
    """Phase 2: lv[lo + j] = level of symbol sy[so + j] in pattern p (j < 128)."""
    if HAVE_AVX512:
        for k in range(0, G, 16):
            lut16(t.levels, p * 16, sy, so + k, lv, lo + k)
    else:
        lt = t.levels[p * 16:p * 16 + 16]
        s = sy[so:so + G]
        out = lv[lo:lo + G]
        for j in range(G):
            out[j] = lt[s[j] & np.uint8(15)]


@njit(inline="always", cache=True)
def patches(words, b, pos, t, lv, lo):
    """Apply block b's patches (from bit `pos` to the block's end) to lv[lo : lo+128]:
    position (ps bits) then int8 code -> level ptab[code]. Spare slots repeat the last
    patch (idempotent)."""
    W = t.block_bits >> 6
    bb = b * W * 8
    pbits = t.ps + 8
    pmask = (_ONE << np.uint64(t.ps)) - _ONE
    while pos + pbits <= t.block_bits:
        x = peek(words, bb, pos)
        jp = np.int64(x & pmask)
        if jp < G:
            lv[lo + jp] = t.ptab[np.int64((x >> np.uint64(t.ps)) & np.uint64(255))]
        pos += pbits


@njit(inline="always", cache=True)
def fixed_levels(words, b, p, t, lv, lo):
    """Mode 1 (always fits): 128 fixed-width codes q -> level ((q+1) * NL >> fb) - 1.
    Returns the bit position after the codes."""
    W = t.block_bits >> 6
    bb = b * W * 8
    pos = header_bits(t)
    fmask = (_ONE << np.uint64(t.fb)) - _ONE
    for j in range(G):
        q = np.int64(peek(words, bb, pos) & fmask)
        lv[lo + j] = t.levels[p * 16 + (((q + 1) * t.NL) >> t.fb) - 1]
        pos += t.fb
    return pos


# ----------------------------------------------------------------------------- blocks


@njit(cache=True, error_model="numpy")
def decode1(words, b, t, tsc, sy, lv, lo, AB, i):
    """Decode block b (any mode) in code space: levels -> lv[lo : lo+128], A -> AB[2i],
    B -> AB[2i+1] (both 0 for an all-zero block). Returns 1 if its code stream overruns
    the block (corrupt data), else 0."""
    mode, s, p, h, A, B = header(words, b, t, tsc)
    AB[2 * i] = A
    AB[2 * i + 1] = B
    if s == 0:
        for j in range(G):
            lv[lo + j] = _F0
        return 0
    if mode == 0:
        pos = symbols1(words, b, h, t, sy, 0)
        if pos > t.block_bits:
            return 1
        levels_of(sy, 0, t, p, lv, lo)
    else:
        pos = fixed_levels(words, b, p, t, lv, lo)
    patches(words, b, pos, t, lv, lo)
    return 0


@njit(cache=True, error_model="numpy")
def decode4_slow(words, b0, b1, b2, b3, t, tsc, sy, lv, lo, AB, i0):
    """`decode4` one block at a time (a quad with an all-zero or always-fits block; kept
    out of line so the fast path's registers stay free)."""
    return (decode1(words, b0, t, tsc, sy, lv, lo, AB, i0)
            + decode1(words, b1, t, tsc, sy, lv, lo + G, AB, i0 + 1)
            + decode1(words, b2, t, tsc, sy, lv, lo + 2 * G, AB, i0 + 2)
            + decode1(words, b3, t, tsc, sy, lv, lo + 3 * G, AB, i0 + 3))


@njit(inline="always", cache=True)
def decode4(words, b0, b1, b2, b3, t, tsc, sy, lv, lo, AB, i0):
    """Decode blocks b0..b3 in code space: block k's levels -> lv[lo + 128 k ...], its A, B
    -> AB[2 (i0 + k)], AB[2 (i0 + k) + 1] (offsets, not slices: passing array slices into
    this inlined core made it ~1.7x slower here). Four Huffman blocks run side by side.
    sy: uint8 scratch of 4 * SYM_STRIDE. Returns the number of corrupt (overrunning)
    blocks, or -1 (results unusable) for a quad with an all-zero or always-fits block:
    the caller then runs
    `decode4_slow` (a call inside this function slowed its hot loop ~1.5x here)."""
    m0, s0, p0, h0, A0, B0 = header(words, b0, t, tsc)
    m1, s1, p1, h1, A1, B1 = header(words, b1, t, tsc)
    m2, s2, p2, h2, A2, B2 = header(words, b2, t, tsc)
    m3, s3, p3, h3, A3, B3 = header(words, b3, t, tsc)
    AB[2 * i0 + 0] = A0
    AB[2 * i0 + 1] = B0
    AB[2 * i0 + 2] = A1
    AB[2 * i0 + 3] = B1
    AB[2 * i0 + 4] = A2
    AB[2 * i0 + 5] = B2
    AB[2 * i0 + 6] = A3
    AB[2 * i0 + 7] = B3
    e0, e1, e2, e3 = symbols4(words, b0, b1, b2, b3, h0, h1, h2, h3, t, sy)
    # a corrupt block's symbols are still table entries (in range) and its patch loop
    # does not run (pos > block_bits): no branches needed here
    levels_of(sy, 0, t, p0, lv, lo)
    levels_of(sy, SYM_STRIDE, t, p1, lv, lo + G)
    levels_of(sy, 2 * SYM_STRIDE, t, p2, lv, lo + 2 * G)
    levels_of(sy, 3 * SYM_STRIDE, t, p3, lv, lo + 3 * G)
    patches(words, b0, e0, t, lv, lo)
    patches(words, b1, e1, t, lv, lo + G)
    patches(words, b2, e2, t, lv, lo + 2 * G)
    patches(words, b3, e3, t, lv, lo + 3 * G)
    BB = t.block_bits
    nbad = np.int64(e0 > BB) + np.int64(e1 > BB) + np.int64(e2 > BB) + np.int64(e3 > BB)
    # checked last (decoding any block as Huffman is safe): a quad with an all-zero or
    # always-fits block is redone by the caller
    if (m0 | m1 | m2 | m3) != 0 or s0 == 0 or s1 == 0 or s2 == 0 or s3 == 0:
        return -1
    return nbad
