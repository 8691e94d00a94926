"""numba kernels: attention for one query tile straight from compressed K and V.

Nothing is decoded to memory: each compressed block is decoded once per query tile into
a small per-thread buffer (in "code space": Ecco levels / integer codes before the group
scale and offset) and immediately used by every query row that shares its KV head.

Conventions (all arrays flat; float32 unless stated):

* ``qf`` [Hkv, R, D]: the tile's queries times the softmax scaling; row ``r = rep * Lt + i``
  serves query head ``h * n_rep + rep`` and the tile's query ``i`` (``R = n_rep * Lt``).
* ``S`` [Hkv, R, T]: scores; the softmax loop turns them into unnormalised weights p.
* ``lsum`` [Hkv, R]: softmax denominators (0 for a row with no allowed token).
* ``out`` [Hkv, R, D]: normalised attention output.

A stream (K or V) is ``nch`` compressed chunks (all of one kind) followed by an exact
float32 tail ``[Hkv, Te, D]``. Chunk c is row c of the int64 table ``ch``:
``[addr0, addr1, addr2, Tc, t0, flag, n0, n1, addr8, addr9, addr10, fields]`` (t0: first
token of the chunk):

* Ecco (kind 0, groups of 128 tokens of one channel): addr0 = blocks (uint64, n0 words),
  ``tsc[c]`` = the chunk's per-tensor scale.
* ecco-eb (kind 3, the same grouping, variable-size blocks): addr0 = data (uint64, n0
  words), addr1 = offset index (uint32, n1 entries), addr8 / addr9 / addr10 = the
  format's step table (float64, EB_STEPS), multi-symbol tables (uint32, EB_MTAB) and
  code lengths (uint8, EB_LENS); fields = KB | ZB << 8; ``tsc[c]`` = the step d0. Its
  item loops mirror Ecco's, with blocks through `eb_core` (one generic loop for both
  formats slowed the fused ecco4 step by ~12% here, so each format has its own).
* int (kind 1: groups of G tokens of one channel; kind 2: groups of G channels of one
  token): addr0 = packed codes (uint8, n0 bytes), addr1 / addr2 = scale / zero
  (n1 entries, float32 if flag == 1 else float16 bits).

Work split (numba prange; no two items write the same output): `k_phase` runs items
(chunk, KV head, token range) -- for Ecco up to 8 groups of 128 tokens, each channel
quad's blocks read in order -- then one softmax per (head, row). `v_phase` runs items
(KV head, slab of dw channels) over all chunks, or for int chunks grouped over channels
token ranges with per-item partial sums and a reduction. Hot loops index views from 0
(numba then drops its negative-index checks and vectorises; signed offsets ran ~5x
slower here).

The chunks' arrays are reached through their addresses so that a whole stream is one
kernel launch; the Python caller (`eccokv.kernels.attention`) validates every array
(names, dtypes, sizes, contiguity) and keeps them alive for the call. numba does not
bounds-check: every index below stays inside those validated sizes, and Ecco blocks
whose code stream overruns are flagged in ``bad`` (per chunk) exactly as the decoder
flags them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from eccokv.kernels import eb_core
from eccokv.kernels import signatures as sig
from eccokv.kernels.ecco_core import SYM_STRIDE, decode1, decode4, decode4_slow

_ONE = np.uint64(1)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_NEG = np.float32(np.finfo(np.float32).min)
_G = 128  # Ecco group size

# ----------------------------------------------------------------------------- intrinsics


def _ptr_intrinsic(nbtype):
    @intrinsic
    def ptr(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None
        ptrty = types.CPointer(nbtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptrty))

        return ptrty(addr), codegen

    return ptr


_ptr_u64 = _ptr_intrinsic(types.uint64)
_ptr_u8 = _ptr_intrinsic(types.uint8)
_ptr_u16 = _ptr_intrinsic(types.uint16)
_ptr_f32 = _ptr_intrinsic(types.float32)
_ptr_u32 = _ptr_intrinsic(types.uint32)
_ptr_f64 = _ptr_intrinsic(types.float64)

# sizes of the ecco-eb tables a kind-3 chunk row points to (checked by the caller)
EB_STEPS = 256
EB_MTAB = eb_core.NCODEBOOKS << 11
EB_LENS = eb_core.NCODEBOOKS * eb_core.NSYM


@intrinsic
def _bits_f32(typingctx, x):
    """Reinterpret the bits of an int32 / uint32 as a float32."""
    if not isinstance(x, types.Integer) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(x), codegen


# ----------------------------------------------------------------------------- scalar helpers

_LOG2E = np.float32(1.44269504088896341)
_C1 = np.float32(0.693359375)
_C2 = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_HALF = np.float32(0.5)
_XMIN = np.float32(-87.0)
# Softmax weights below exp(-60) (relative to the row's largest, 1) are set to 0: they
# cannot change a float32 result, while products of such weights with small levels are
# subnormal numbers, which this CPU handles by microcode assists (the V pass ran 1.7x
# slower on real softmax rows than on the same data with normal weights).
_CUT = np.float32(-60.0)


@njit(inline="always", cache=True)
def _expf(x):
    """exp(x) for float32 x in [-87, 0] (Cephes expf polynomial, ~1e-7 relative); plain
    arithmetic so that loops over it vectorise (numba has no vector exp here)."""
    fx = np.floor(x * _LOG2E + _HALF)
    r = x - fx * _C1
    r = r - fx * _C2
    z = r * r
    y = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * z + r + _F1
    e = (np.int32(fx) + np.int32(127)) << np.int32(23)
    return y * _bits_f32(np.int32(e))


@njit(inline="always", cache=True)
def _h2f(h):
    """float16 bits (uint16) -> float32 (finite inputs; validated by the codec)."""
    u = np.uint32(h)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    e = (u >> np.uint32(10)) & np.uint32(0x1F)
    m = u & np.uint32(0x3FF)
    if e == 0:
        v = np.float32(m) * np.float32(5.960464477539063e-08)  # m * 2**-24 (subnormal)
        return -v if sign else v
    return _bits_f32(np.uint32(sign | ((e + np.uint32(112)) << np.uint32(23))
                               | (m << np.uint32(13))))


@njit(inline="always", cache=True)
def _ld(s16, s32, is32, i):
    """Entry i of a scale/zero array stored as float16 bits (s16) or float32 (s32)."""
    if is32:
        return s32[i]
    return _h2f(s16[i])


@njit(cache=True, fastmath=True, error_model="numpy")
def _unpack(codes, i0, n, bits, out):
    """Integer codes of values i0 .. i0+n-1 of a dense LSB-first stream of `bits`-bit codes
    (uint8 array `codes`) -> float32 out[0:n]. Reads only inside `codes`. Hot loops run
    over views with indices from 0 (numba then needs no negative-index checks and
    vectorises)."""
    if bits == 8:
        src = codes[i0:i0 + n]
        for j in range(n):
            out[j] = np.float32(src[j])
        return
    if bits == 4 or bits == 2:
        per = 8 // bits
        mask = np.uint32((1 << bits) - 1)
        j = 0
        while j < n and (i0 + j) % per != 0:  # leading codes up to a byte boundary
            i = i0 + j
            out[j] = np.float32((np.uint32(codes[i // per]) >> np.uint32((i % per) * bits))
                                & mask)
            j += 1
        nfull = (n - j) // per
        src = codes[(i0 + j) // per:(i0 + j) // per + nfull]
        dst = out[j:j + nfull * per]
        if bits == 4:
            for k in range(nfull):
                v = np.uint32(src[k])
                dst[2 * k] = np.float32(v & np.uint32(15))
                dst[2 * k + 1] = np.float32(v >> np.uint32(4))
        else:
            for k in range(nfull):
                v = np.uint32(src[k])
                dst[4 * k] = np.float32(v & np.uint32(3))
                dst[4 * k + 1] = np.float32((v >> np.uint32(2)) & np.uint32(3))
                dst[4 * k + 2] = np.float32((v >> np.uint32(4)) & np.uint32(3))
                dst[4 * k + 3] = np.float32(v >> np.uint32(6))
        j += nfull * per
        while j < n:  # trailing codes
            i = i0 + j
            out[j] = np.float32((np.uint32(codes[i // per]) >> np.uint32((i % per) * bits))
                                & mask)
            j += 1
        return
    nbytes = codes.shape[0]
    mask = np.uint32((1 << bits) - 1)
    for j in range(n):
        bp = (i0 + j) * bits
        by = bp >> 3
        v = np.uint32(codes[by])
        if by + 1 < nbytes:
            v |= np.uint32(codes[by + 1]) << np.uint32(8)
        out[j] = np.float32((v >> np.uint32(bp & 7)) & mask)


# ----------------------------------------------------------------------------- Ecco blocks


@njit(inline="always", cache=True)
def _quad(words, b, stride, t, tsc, sy, lv, lo, AB, i0):
    """Blocks b, b + stride, b + 2 stride, b + 3 stride through the shared decode core
    (code-space levels -> lv[lo : lo+512], A/B -> AB[2 i0 : 2 i0 + 8]); returns the
    corrupt-block count."""
    n = decode4(words, b, b + stride, b + 2 * stride, b + 3 * stride, t, tsc, sy, lv, lo, AB,
                i0)
    if n < 0:
        n = decode4_slow(words, b, b + stride, b + 2 * stride, b + 3 * stride, t, tsc, sy, lv,
                         lo, AB, i0)
    return n


@njit(inline="always", cache=True)
def _eb_views(ch, c):
    """ecco-eb chunk c's data, index, field widths and tables (see the module docstring)."""
    return (carray(_ptr_u64(ch[c, 0]), ch[c, 6]), carray(_ptr_u32(ch[c, 1]), ch[c, 7]),
            np.int64(ch[c, 11] & 255), np.int64(ch[c, 11] >> 8),
            carray(_ptr_f64(ch[c, 8]), EB_STEPS), carray(_ptr_u32(ch[c, 9]), EB_MTAB),
            carray(_ptr_u8(ch[c, 10]), EB_LENS))


# ----------------------------------------------------------------------------- K side items


@njit(inline="always", cache=True)
def _k_clear(S, soff, T, R, ntok):
    """S[soff + r*T : soff + r*T + ntok] = 0 for the R query rows."""
    for r in range(R):
        S[soff + r * T:soff + r * T + ntok] = _F0


@njit(inline="always", cache=True)
def _k_use4(lv, AB, gi, n, qf, qoff, d, R, D, S, soff, T, cB, ng):
    """Scores from one decoded channel quad (channels d .. d+3) of token group gi, for
    its n tokens: S[soff + r*T + gi*128 + k] += sum_c (q[r, c] * A_c) * level_c[k], and
    the group's B terms sum_c q[r, c] * B_c into cB[r * ng + gi] (added once per token
    by `_k_add_bias`). Levels at lv[gi * 512 + 128 c ...], A/B at AB[gi * 8 + 2 c ...]."""
    q0 = np.uint64(gi * 4 * _G)
    a8 = gi * 8
    A0 = AB[a8]
    A1 = AB[a8 + 2]
    A2 = AB[a8 + 4]
    A3 = AB[a8 + 6]
    Bq = np.uint64(a8)
    for r in range(R):
        qo = qoff + r * D + d
        q_0 = qf[qo]
        q_1 = qf[qo + 1]
        q_2 = qf[qo + 2]
        q_3 = qf[qo + 3]
        a0 = q_0 * A0
        a1 = q_1 * A1
        a2 = q_2 * A2
        a3 = q_3 * A3
        cB[r * ng + gi] += (q_0 * AB[Bq + np.uint64(1)] + q_1 * AB[Bq + np.uint64(3)]
                            + q_2 * AB[Bq + np.uint64(5)] + q_3 * AB[Bq + np.uint64(7)])
        so = np.uint64(soff + r * T + gi * _G)
        for k in range(n):
            uk = np.uint64(k)
            S[so + uk] += ((a0 * lv[q0 + uk] + a1 * lv[q0 + np.uint64(_G) + uk])
                           + (a2 * lv[q0 + np.uint64(2 * _G) + uk]
                              + a3 * lv[q0 + np.uint64(3 * _G) + uk]))


@njit(inline="always", cache=True)
def _k_use1(lv, AB, gi, n, qf, qoff, d, R, D, S, soff, T, cB, ng):
    """`_k_use4` for one decoded channel d (levels at lv[0 ...], A/B at AB[0], AB[1])."""
    lv0 = lv[0:n]
    for r in range(R):
        qd = qf[qoff + r * D + d]
        a0 = qd * AB[0]
        cB[r * ng + gi] += qd * AB[1]
        so = soff + r * T + gi * _G
        srow = S[so:so + n]
        for k in range(n):
            srow[k] += a0 * lv0[k]


@njit(inline="always", cache=True)
def _k_add_bias(S, soff, T, R, ng, g0, Tc, cB):
    """Add each token group's B terms cB[r * ng + gi] to its tokens' scores."""
    for r in range(R):
        for gi in range(ng):
            so = soff + r * T + gi * _G
            srow = S[so:so + min(_G, Tc - (g0 + gi) * _G)]
            c = cB[r * ng + gi]
            for k in range(srow.shape[0]):
                srow[k] += c


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_ecco_item(words, h, g0, ng, ngroups, Tc, D, qf, qoff, R, S, soff, T, t, tsc):
    """Scores of token groups g0 .. g0+ng-1 of one Ecco chunk (Tc tokens, ngroups groups)
    for KV head h: S[soff + r*T + t] (t from the first token of group g0) =
    sum_d qf[r, d] * K[t, d], computed as (q*A) * level + (sum_d q*B), the latter once
    per group. Four channels are decoded side by side and each channel's blocks are
    walked in order (block of channel d, group g = (h*D + d) * ngroups + g). Returns the
    number of corrupt blocks."""
    # the ng quads of one channel quad are decoded first, then used
    lv = np.empty(ng * 4 * _G, np.float32)
    sy = np.empty(4 * SYM_STRIDE, np.uint8)
    AB = np.empty(ng * 8, np.float32)
    cB = np.zeros(R * ng, np.float32)
    _k_clear(S, soff, T, R, min(Tc, (g0 + ng) * _G) - g0 * _G)
    nbad = 0
    d = 0
    while d + 4 <= D:
        for gi in range(ng):
            nbad += _quad(words, (h * D + d) * ngroups + g0 + gi, ngroups, t, tsc, sy, lv,
                          gi * 4 * _G, AB, gi * 4)
        for gi in range(ng):
            _k_use4(lv, AB, gi, min(_G, Tc - (g0 + gi) * _G), qf, qoff, d, R, D, S, soff, T,
                    cB, ng)
        d += 4
    while d < D:
        for gi in range(ng):
            n = min(_G, Tc - (g0 + gi) * _G)
            nbad += decode1(words, (h * D + d) * ngroups + g0 + gi, t, tsc, sy, lv, 0, AB, 0)
            _k_use1(lv, AB, gi, n, qf, qoff, d, R, D, S, soff, T, cB, ng)
        d += 1
    _k_add_bias(S, soff, T, R, ng, g0, Tc, cB)
    return nbad


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_eb_item(words, ix, kb, zb, sb, mt, ln, h, g0, ng, ngroups, Tc, D, qf, qoff, R, S, soff,
               T, d0):
    """`_k_ecco_item` for an ecco-eb chunk (index ix, field widths kb/zb, step d0,
    tables sb/mt/ln): the same loops, blocks through `eb_core`."""
    # the ng quads of one channel quad are decoded first, then used
    lv = np.empty(ng * 4 * _G, np.float32)
    sy = np.empty(4 * SYM_STRIDE, np.uint8)
    AB = np.empty(ng * 8, np.float32)
    cB = np.zeros(R * ng, np.float32)
    _k_clear(S, soff, T, R, min(Tc, (g0 + ng) * _G) - g0 * _G)
    nbad = 0
    d = 0
    LB = eb_core.LEN_BITS
    while d + 4 <= D:
        # each channel's blocks follow each other: one index walk, then + length
        b = (h * D + d) * ngroups + g0
        p0, l0 = eb_core.locate(words, ix, b)
        p1, l1 = eb_core.locate(words, ix, b + ngroups)
        p2, l2 = eb_core.locate(words, ix, b + 2 * ngroups)
        p3, l3 = eb_core.locate(words, ix, b + 3 * ngroups)
        for gi in range(ng):
            nbad += eb_core.decode4_at(words, p0, l0, p1, l1, p2, l2, p3, l3,
                                       min(_G, Tc - (g0 + gi) * _G), kb, zb, d0, sb, mt, ln,
                                       sy, lv, gi * 4 * _G, AB, gi * 4)
            if gi + 1 < ng:
                p0 += l0
                p1 += l1
                p2 += l2
                p3 += l3
                l0 = eb_core.field(words, p0, LB)
                l1 = eb_core.field(words, p1, LB)
                l2 = eb_core.field(words, p2, LB)
                l3 = eb_core.field(words, p3, LB)
        for gi in range(ng):
            _k_use4(lv, AB, gi, min(_G, Tc - (g0 + gi) * _G), qf, qoff, d, R, D, S, soff, T,
                    cB, ng)
        d += 4
    while d < D:
        for gi in range(ng):
            n = min(_G, Tc - (g0 + gi) * _G)
            nbad += eb_core.decode1(words, ix, (h * D + d) * ngroups + g0 + gi, n, kb, zb, d0,
                                    sb, mt, ln, sy, lv, 0, AB, 0)
            _k_use1(lv, AB, gi, n, qf, qoff, d, R, D, S, soff, T, cB, ng)
        d += 1
    _k_add_bias(S, soff, T, R, ng, g0, Tc, cB)
    return nbad


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_int_tok_item(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, h, ts, n, D, qf, qoff, R,
                    S, soff, T):
    """Scores of tokens ts .. ts+n-1 of an int chunk grouped per channel over tokens (groups
    of G tokens, ts a multiple of G): K = code * scale + zero. Four channels are unpacked
    and dequantised side by side (per group: one multiply-add per value), then added into
    each score row over all n tokens at once (long loops even for KIVI's 32-token groups,
    and a quarter of the score loads and stores)."""
    ngroups = (Tc + G - 1) // G
    g0 = ts // G
    ngl = (n + G - 1) // G
    buf = np.empty(4 * n, np.float32)
    for r in range(R):
        S[soff + r * T:soff + r * T + n] = _F0
    d = 0
    while d < D:
        nd = min(4, D - d)
        for j in range(nd):
            bj = buf[j * n:(j + 1) * n]
            _unpack(codes, (h * D + d + j) * Tc + ts, n, bits, bj)
            for gl in range(ngl):
                b = (h * D + d + j) * ngroups + g0 + gl
                sc = _ld(sc16, sc32, is32, b)
                z = _ld(z16, z32, is32, b)
                seg = bj[gl * G:min(n, gl * G + G)]
                for t in range(seg.shape[0]):
                    seg[t] = seg[t] * sc + z
        for j in range(nd, 4):
            buf[j * n:(j + 1) * n] = _F0
        b0 = buf[0:n]
        b1 = buf[n:2 * n]
        b2 = buf[2 * n:3 * n]
        b3 = buf[3 * n:4 * n]
        for r in range(R):
            qo = qoff + r * D + d
            q0 = qf[qo]
            q1 = qf[qo + 1] if nd > 1 else _F0
            q2 = qf[qo + 2] if nd > 2 else _F0
            q3 = qf[qo + 3] if nd > 3 else _F0
            srow = S[soff + r * T:soff + r * T + n]
            for t in range(n):
                srow[t] += (q0 * b0[t] + q1 * b1[t]) + (q2 * b2[t] + q3 * b3[t])
        d += 4


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_int_ch_item(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, h, ts, n, D, qf, qoff, R,
                   S, soff, T):
    """Scores of tokens ts .. ts+n-1 of an int chunk grouped per token over channels
    (groups of G channels): s = sum_groups scale * (q . codes) + zero * sum(q)."""
    ngroups = (D + G - 1) // G
    buf = np.empty(D, np.float32)
    qs = np.zeros(R * ngroups, np.float32)
    scv = np.empty(ngroups, np.float32)
    zv = np.empty(ngroups, np.float32)
    for r in range(R):
        for gi in range(ngroups):
            qg = qf[qoff + r * D + gi * G:qoff + r * D + min(D, gi * G + G)]
            x = _F0
            for d in range(qg.shape[0]):
                x += qg[d]
            qs[r * ngroups + gi] = x
    for t in range(n):
        m = h * Tc + ts + t
        _unpack(codes, m * D, D, bits, buf)
        for gi in range(ngroups):
            scv[gi] = _ld(sc16, sc32, is32, m * ngroups + gi)
            zv[gi] = _ld(z16, z32, is32, m * ngroups + gi)
        for r in range(R):
            acc = _F0
            for gi in range(ngroups):
                lo = gi * G
                hi = min(D, lo + G)
                qg = qf[qoff + r * D + lo:qoff + r * D + hi]
                bg = buf[lo:hi]
                x = _F0
                for d in range(hi - lo):
                    x += qg[d] * bg[d]
                acc += scv[gi] * x + zv[gi] * qs[r * ngroups + gi]
            S[soff + r * T + t] = acc


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_exact_item(kx, koff, n, D, qf, qoff, R, S, soff, T):
    """Scores of n exact tokens: S[soff + r*T + t] = qf[r] . kx[koff + t*D : +D]."""
    for t in range(n):
        krow = kx[koff + t * D:koff + t * D + D]
        for r in range(R):
            qr = qf[qoff + r * D:qoff + r * D + D]
            x = _F0
            for d in range(D):
                x += qr[d] * krow[d]
            S[soff + r * T + t] = x


@njit(cache=True, fastmath=True, error_model="numpy")
def _softmax_row(S, base, T, mode, allow, bias, moff, na):
    """Turn one score row S[base : base+T] into unnormalised weights exp(s - max) over the
    allowed tokens (0 elsewhere); returns (their sum, the max) ((0, float32 min) if no token
    is allowed).
    mode 0: tokens t < na allowed (causal); 1: allow[moff + t] != 0; 2: same, plus the
    additive bias[moff + t]."""
    x = S[base:base + T]
    if mode == 0:
        x[na:] = _F0
        if na <= 0:
            return _F0, _NEG
        xa = x[:na]
        m = _NEG
        for t in range(na):
            m = max(m, xa[t])
        lsum = _F0
        for t in range(na):
            z = xa[t] - m
            e = _expf(max(z, _XMIN))
            e = e if z > _CUT else _F0
            xa[t] = e
            lsum += e
        return lsum, m
    al = allow[moff:moff + T]
    if mode == 2:
        bi = bias[moff:moff + T]
        for t in range(T):
            x[t] += bi[t]
    m = _NEG
    cnt = 0
    for t in range(T):
        a = al[t] != 0
        cnt += a
        m = max(m, x[t] if a else _NEG)
    if cnt == 0:
        x[:] = _F0
        return _F0, _NEG
    lsum = _F0
    for t in range(T):
        z = x[t] - m
        e = _expf(min(max(z, _XMIN), _F0))
        e = e if z > _CUT else _F0
        e = e if al[t] != 0 else _F0
        x[t] = e
        lsum += e
    return lsum, m


@njit(cache=True, fastmath=True, error_model="numpy")
def _k_item(it, kind, t, G, bits, ch, tsc, it_c,
            it_h, it_s, it_n, kx, Te, e0, e1, es, Tc_tot, a, qf, R, D, T, S, bad):
    """One K work item (see `k_phase`)."""
    nci = it_c.shape[0]
    if it >= nci:  # exact tail tokens e0 .. e1-1: items of `es` tokens per KV head
        ne = (e1 - e0 + es - 1) // es
        h = (it - nci) // ne
        s = e0 + (it - nci - h * ne) * es
        _k_exact_item(kx, (h * Te + s) * D, min(es, e1 - s), D, qf, h * R * D, R, S,
                      h * R * T + Tc_tot + s - a, T)
        return
    c = it_c[it]
    h = it_h[it]
    s = it_s[it]
    n = it_n[it]
    qoff = h * R * D
    Tc = ch[c, 3]
    soff = h * R * T + ch[c, 4] + s - a
    if kind == 0:
        words = carray(_ptr_u64(ch[c, 0]), ch[c, 6])
        nb = _k_ecco_item(words, h, s // _G, (n + _G - 1) // _G, (Tc + _G - 1) // _G, Tc, D, qf,
                          qoff, R, S, soff, T, t, tsc[c])
        if nb:
            bad[c] = 1
        return
    if kind == 3:
        words, ix, kb, zb, sb, mt, ln = _eb_views(ch, c)
        nb = _k_eb_item(words, ix, kb, zb, sb, mt, ln, h, s // _G, (n + _G - 1) // _G,
                        (Tc + _G - 1) // _G, Tc, D, qf, qoff, R, S, soff, T, tsc[c])
        if nb:
            bad[c] = 1
        return
    is32 = ch[c, 5] == 1
    n1 = ch[c, 7]
    codes = carray(_ptr_u8(ch[c, 0]), ch[c, 6])
    sc16 = carray(_ptr_u16(ch[c, 1]), 0 if is32 else n1)
    sc32 = carray(_ptr_f32(ch[c, 1]), n1 if is32 else 0)
    z16 = carray(_ptr_u16(ch[c, 2]), 0 if is32 else n1)
    z32 = carray(_ptr_f32(ch[c, 2]), n1 if is32 else 0)
    if kind == 1:
        _k_int_tok_item(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, h, s, n, D, qf, qoff, R,
                        S, soff, T)
    else:
        _k_int_ch_item(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, h, s, n, D, qf, qoff, R,
                       S, soff, T)


@njit(sig.K_PHASE, parallel=True, cache=True, error_model="numpy")
def k_phase(kind, t, G, bits, ch, tsc, it_c, it_h,
            it_s, it_n, kx, Te, e0, e1, es, Tc_tot, a, qf, Hkv, R, D, T, Tt, S, bad, mode,
            allow, bias, i0, Lt, Lq, lsum, mrow):
    """Scores of every (KV head, tile row, token) of the context block a .. a+T-1 (of Tt
    tokens in all) into S [Hkv, R, T], then the softmax weights in place, their sums in
    lsum and the row maxima in mrow (block-local: `fused_attention` merges blocks). Work
    items: the chunks' (it_c, it_h, it_s, it_n) = chunk, KV head, first token within the
    chunk, token count (all inside the block); then the exact tail's tokens e0 .. e1-1
    (of Te, starting at token Tc_tot) in pieces of `es` tokens per KV head. bad[c] = 1 for
    a chunk with a corrupt Ecco block. The tile's query i0 + (r % Lt) of Lq serves row r."""
    nit = it_c.shape[0] + Hkv * ((e1 - e0 + es - 1) // es)
    for it in prange(nit):
        _k_item(np.int64(it), kind, t, G, bits, ch, tsc, it_c, it_h, it_s, it_n, kx, Te, e0,
                e1, es, Tc_tot, a, qf, R, D, T, S, bad)
    for row in prange(Hkv * R):
        i = i0 + (row % R) % Lt
        na = min(T, max(0, min(Tt, Tt - Lq + i + 1) - a))
        ls, m = _softmax_row(S, np.int64(row) * T, T, mode, allow, bias, i * Tt + a, na)
        lsum[row] = ls
        mrow[row] = m


# ----------------------------------------------------------------------------- V side items


@njit(inline="always", cache=True)
def _v_psums(P, tb, T, R, n, psum):
    """psum[r] = sum of P[tb + r*T : tb + r*T + n] (a token group's probabilities)."""
    for r in range(R):
        prow = P[tb + r * T:tb + r * T + n]
        x = _F0
        for k in range(n):
            x += prow[k]
        psum[r] = x


@njit(inline="always", cache=True)
def _v_use4(P, tb, T, R, n, lv, AB, acc, w, j, psum):
    """p.V from one decoded channel quad of a token group (n tokens, probabilities at
    P[tb + r*T ...], levels at lv[128 c ...], A/B at AB[2 c ...]): acc[r*w + j + c] +=
    A_c * (p . levels_c) + B_c * psum[r]."""
    for r in range(R):
        pb = np.uint64(tb + r * T)
        x0 = _F0
        x1 = _F0
        x2 = _F0
        x3 = _F0
        for k in range(n):
            uk = np.uint64(k)
            pt = P[pb + uk]
            x0 += pt * lv[uk]
            x1 += pt * lv[np.uint64(_G) + uk]
            x2 += pt * lv[np.uint64(2 * _G) + uk]
            x3 += pt * lv[np.uint64(3 * _G) + uk]
        ao = r * w + j
        pr = psum[r]
        acc[ao] += AB[0] * x0 + AB[1] * pr
        acc[ao + 1] += AB[2] * x1 + AB[3] * pr
        acc[ao + 2] += AB[4] * x2 + AB[5] * pr
        acc[ao + 3] += AB[6] * x3 + AB[7] * pr


@njit(inline="always", cache=True)
def _v_use1(P, tb, T, R, n, lv, AB, acc, w, j, psum):
    """`_v_use4` for one decoded channel (levels at lv[0 ...], A/B at AB[0], AB[1])."""
    lv0 = lv[0:n]
    for r in range(R):
        prow = P[tb + r * T:tb + r * T + n]
        x0 = _F0
        for k in range(n):
            x0 += prow[k] * lv0[k]
        acc[r * w + j] += AB[0] * x0 + AB[1] * psum[r]


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_ecco_chunk(words, Tc, t0c, g0, g1, h, d0, d1, D, P, poff, R, T, acc, psum, t, tsc):
    """acc[r, d - d0] += sum_t p[r, t] * V[t, d] over token groups g0 .. g1-1 of one Ecco
    chunk (its token 0 at column t0c of P), channels d0 .. d1-1: per block
    A * (p . levels) + B * sum(p). Returns the number of corrupt blocks."""
    w = d1 - d0
    lv = np.empty(4 * _G, np.float32)
    sy = np.empty(4 * SYM_STRIDE, np.uint8)
    AB = np.empty(8, np.float32)
    ngroups = (Tc + _G - 1) // _G
    nbad = 0
    for g in range(g0, g1):
        n = min(_G, Tc - g * _G)
        tb = poff + t0c + g * _G
        _v_psums(P, tb, T, R, n, psum)
        d = d0
        while d + 4 <= d1:
            nbad += _quad(words, (h * D + d) * ngroups + g, ngroups, t, tsc, sy, lv, 0, AB, 0)
            _v_use4(P, tb, T, R, n, lv, AB, acc, w, d - d0, psum)
            d += 4
        while d < d1:
            nbad += decode1(words, (h * D + d) * ngroups + g, t, tsc, sy, lv, 0, AB, 0)
            _v_use1(P, tb, T, R, n, lv, AB, acc, w, d - d0, psum)
            d += 1
    return nbad


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_eb_chunk(words, ix, kb, zb, sb, mt, ln, Tc, t0c, g0, g1, h, d0, d1, D, P, poff, R, T,
                acc, psum, st):
    """`_v_ecco_chunk` for an ecco-eb chunk (index ix, field widths kb/zb, step st,
    tables sb/mt/ln): the same loops, blocks through `eb_core`."""
    w = d1 - d0
    lv = np.empty(4 * _G, np.float32)
    sy = np.empty(4 * SYM_STRIDE, np.uint8)
    AB = np.empty(8, np.float32)
    ngroups = (Tc + _G - 1) // _G
    nbad = 0
    # each channel's blocks follow each other: one index walk per channel, then + length
    rp = np.empty(w, np.int64)
    rl = np.empty(w, np.int64)
    for j in range(w):
        rp[j], rl[j] = eb_core.locate(words, ix, (h * D + d0 + j) * ngroups + g0)
    for g in range(g0, g1):
        if g > g0:
            for j in range(w):
                rp[j] += rl[j]
                rl[j] = eb_core.field(words, rp[j], eb_core.LEN_BITS)
        n = min(_G, Tc - g * _G)
        tb = poff + t0c + g * _G
        _v_psums(P, tb, T, R, n, psum)
        d = d0
        while d + 4 <= d1:
            j = d - d0
            nbad += eb_core.decode4_at(words, rp[j], rl[j], rp[j + 1], rl[j + 1], rp[j + 2],
                                       rl[j + 2], rp[j + 3], rl[j + 3], n, kb, zb, st, sb, mt,
                                       ln, sy, lv, 0, AB, 0)
            _v_use4(P, tb, T, R, n, lv, AB, acc, w, d - d0, psum)
            d += 4
        while d < d1:
            nbad += eb_core.decode1_at(words, rp[d - d0], rl[d - d0], n, kb, zb, st, sb, mt,
                                       ln, sy, lv, 0, AB, 0)
            _v_use1(P, tb, T, R, n, lv, AB, acc, w, d - d0, psum)
            d += 1
    return nbad


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_int_tok_chunk(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, t0c, g0, g1, h, d0, d1,
                     D, P, poff, R, T, acc, psum, buf):
    """acc[r, d - d0] += sum_t p[r, t] * V[t, d] over token groups g0 .. g1-1 of one int
    chunk grouped per channel over tokens: per group scale * (p . codes) + zero * sum(p)."""
    w = d1 - d0
    ngroups = (Tc + G - 1) // G
    for g in range(g0, g1):
        tl = g * G
        n = min(G, Tc - tl)
        tb = poff + t0c + tl
        bs = buf[:n]
        _v_psums(P, tb, T, R, n, psum)
        for d in range(d0, d1):
            m = h * D + d
            b = m * ngroups + g
            _unpack(codes, m * Tc + tl, n, bits, buf)
            sc = _ld(sc16, sc32, is32, b)
            z = _ld(z16, z32, is32, b)
            for r in range(R):
                prow = P[tb + r * T:tb + r * T + n]
                x = _F0
                for t in range(n):
                    x += prow[t] * bs[t]
                acc[r * w + d - d0] += sc * x + z * psum[r]


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_int_ch_span(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, t0c, h, ts, n, D, P, poff,
                   R, T, acc, buf):
    """acc[r, :] += sum_t p[r, t] * V[t, :] over tokens ts .. ts+n-1 of one int chunk
    grouped per token over channels (each token's D values decoded once, then one axpy
    per tile row)."""
    ngroups = (D + G - 1) // G
    bw = buf[:D]
    for t in range(ts, ts + n):
        m = h * Tc + t
        _unpack(codes, m * D, D, bits, buf)
        for gi in range(ngroups):
            b = m * ngroups + gi
            sc = _ld(sc16, sc32, is32, b)
            z = _ld(z16, z32, is32, b)
            bg = buf[gi * G:min(D, gi * G + G)]
            for j in range(bg.shape[0]):
                bg[j] = bg[j] * sc + z
        for r in range(R):
            pw = P[poff + r * T + t0c + t]
            arow = acc[r * D:r * D + D]
            for j in range(D):
                arow[j] += pw * bw[j]


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_exact(vx, Te, e0, e1, t0, h, d0, d1, D, P, poff, R, T, acc):
    """acc[r, d - d0] += sum_t p[r, t0 + t] * vx[h, t, d] over exact tokens e0 .. e1-1."""
    w = d1 - d0
    for t in range(e0, e1):
        vrow = vx[(h * Te + t) * D + d0:(h * Te + t) * D + d1]
        for r in range(R):
            pw = P[poff + r * T + t0 + t]
            arow = acc[r * w:r * w + w]
            for j in range(w):
                arow[j] += pw * vrow[j]


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_item(it, kind, t, G, bits, ch, tsc, cl0, cl1, vx, Te, e0, e1,
            Tc_tot, a, P, lsum, R, D, T, dw, out, bad):
    """One V work item (see `v_phase`)."""
    nch = ch.shape[0]
    nd = (D + dw - 1) // dw
    h = it // nd
    d0 = (it - h * nd) * dw
    d1 = min(D, d0 + dw)
    w = d1 - d0
    poff = h * R * T
    acc = np.zeros(R * w, np.float32)
    psum = np.empty(R, np.float32)
    buf = np.empty(max(G, _G, D), np.float32)
    for c in range(nch):
        if cl1[c] <= cl0[c]:
            continue
        Tc = ch[c, 3]
        t0c = ch[c, 4] - a
        if kind == 0:
            words = carray(_ptr_u64(ch[c, 0]), ch[c, 6])
            if _v_ecco_chunk(words, Tc, t0c, cl0[c] // _G, (cl1[c] + _G - 1) // _G, h, d0, d1,
                             D, P, poff, R, T, acc, psum, t, tsc[c]):
                bad[c] = 1
        elif kind == 3:
            words, ix, kb, zb, sb, mt, ln = _eb_views(ch, c)
            if _v_eb_chunk(words, ix, kb, zb, sb, mt, ln, Tc, t0c, cl0[c] // _G,
                           (cl1[c] + _G - 1) // _G, h, d0, d1, D, P, poff, R, T, acc, psum,
                           tsc[c]):
                bad[c] = 1
        else:
            is32 = ch[c, 5] == 1
            n1 = ch[c, 7]
            codes = carray(_ptr_u8(ch[c, 0]), ch[c, 6])
            sc16 = carray(_ptr_u16(ch[c, 1]), 0 if is32 else n1)
            sc32 = carray(_ptr_f32(ch[c, 1]), n1 if is32 else 0)
            z16 = carray(_ptr_u16(ch[c, 2]), 0 if is32 else n1)
            z32 = carray(_ptr_f32(ch[c, 2]), n1 if is32 else 0)
            _v_int_tok_chunk(codes, sc16, sc32, z16, z32, is32, bits, G, Tc, t0c, cl0[c] // G,
                             (cl1[c] + G - 1) // G, h, d0, d1, D, P, poff, R, T, acc, psum, buf)
    if e1 > e0:
        _v_exact(vx, Te, e0, e1, Tc_tot - a, h, d0, d1, D, P, poff, R, T, acc)
    for r in range(R):
        lr = lsum[h * R + r]
        inv = _F1 / lr if lr > _F0 else _F0
        oo = (h * R + r) * D + d0
        for j in range(w):
            out[oo + j] = acc[r * w + j] * inv


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_span_item(it, G, bits, ch, it_c, it_h, it_s, it_n, vx, Te, e0, e1, es, Tc_tot, a, P,
                 R, D, T, part):
    """One token-span V work item (int chunks grouped over channels, or the exact tail in
    pieces of `es` tokens per head): its partial sum_t p[r, t] * V[t, :] goes to
    part[it, r, :]."""
    nci = it_c.shape[0]
    acc = part[it * R * D:(it + 1) * R * D]
    acc[:] = _F0
    if it >= nci:
        ne = (e1 - e0 + es - 1) // es
        h = (it - nci) // ne
        s = e0 + (it - nci - h * ne) * es
        poff = h * R * T
        for t in range(s, min(e1, s + es)):
            vrow = vx[(h * Te + t) * D:(h * Te + t + 1) * D]
            for r in range(R):
                pw = P[poff + r * T + Tc_tot - a + t]
                arow = acc[r * D:r * D + D]
                for j in range(D):
                    arow[j] += pw * vrow[j]
        return
    c = it_c[it]
    h = it_h[it]
    s = it_s[it]
    n = it_n[it]
    poff = h * R * T
    is32 = ch[c, 5] == 1
    n1 = ch[c, 7]
    codes = carray(_ptr_u8(ch[c, 0]), ch[c, 6])
    sc16 = carray(_ptr_u16(ch[c, 1]), 0 if is32 else n1)
    sc32 = carray(_ptr_f32(ch[c, 1]), n1 if is32 else 0)
    z16 = carray(_ptr_u16(ch[c, 2]), 0 if is32 else n1)
    z32 = carray(_ptr_f32(ch[c, 2]), n1 if is32 else 0)
    buf = np.empty(D, np.float32)
    _v_int_ch_span(codes, sc16, sc32, z16, z32, is32, bits, G, ch[c, 3], ch[c, 4] - a, h, s, n,
                   D, P, poff, R, T, acc, buf)


@njit(cache=True, fastmath=True, error_model="numpy")
def _v_reduce_row(row, R, D, it_h, ne, part, lsum, out):
    """out[row] = sum of the span items' partials of this (head, tile row) / lsum[row]
    (chunk items with it_h == head, then the head's `ne` exact-tail items)."""
    h = row // R
    r = row - h * R
    o = out[row * D:(row + 1) * D]
    o[:] = _F0
    nci = it_h.shape[0]
    for it in range(nci + ne * h, nci + ne * (h + 1)):
        pr = part[(it * R + r) * D:(it * R + r + 1) * D]
        for j in range(D):
            o[j] += pr[j]
    for it in range(nci):
        if it_h[it] == h:
            pr = part[(it * R + r) * D:(it * R + r + 1) * D]
            for j in range(D):
                o[j] += pr[j]
    lr = lsum[row]
    inv = _F1 / lr if lr > _F0 else _F0
    for j in range(D):
        o[j] *= inv


@njit(sig.V_PHASE, parallel=True, cache=True, error_model="numpy")
def v_phase(kind, t, G, bits, ch, tsc, cl0, cl1, vx, Te, e0, e1, es,
            Tc_tot, a, P, lsum, Hkv, R, D, T, dw, out, bad, it_c, it_h, it_s, it_n, part):
    """out[h, r, d] = sum_t p[h, r, t] * V[h, a + t, d] / lsum[h, r] (0 where lsum == 0)
    over the context block a .. a+T-1 (p = P [Hkv, R, T] from `k_phase`).
    kind 0/1/3: work items (KV head, dw consecutive channels), each over chunk c's tokens
    cl0[c] .. cl1[c]-1 (group aligned; none where cl1 <= cl0) and the exact tail's tokens
    e0 .. e1-1. kind 2 (int grouped over channels): token-span items (it_c, it_h, it_s,
    it_n and the exact tokens in pieces of `es`, as in `k_phase`) write partial sums into
    part [items, R, D], then one reduction per output row."""
    if kind == 2:
        ne = (e1 - e0 + es - 1) // es
        for it in prange(it_c.shape[0] + Hkv * ne):
            _v_span_item(np.int64(it), G, bits, ch, it_c, it_h, it_s, it_n, vx, Te, e0, e1, es,
                         Tc_tot, a, P, R, D, T, part)
        for row in prange(Hkv * R):
            _v_reduce_row(np.int64(row), R, D, it_h, ne, part, lsum, out)
    else:
        nd = (D + dw - 1) // dw
        for it in prange(Hkv * nd):
            _v_item(np.int64(it), kind, t, G, bits, ch, tsc, cl0, cl1, vx, Te, e0, e1, Tc_tot, a,
                    P, lsum, R, D, T, dw, out, bad)
