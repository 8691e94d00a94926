"""numba kernels for the Ecco block codec: the parallel encoder, and the parallel decoder
built on the shared decode core (`ecco_core`: every block is read there).

Block layout (docs/format.md): a block is `W` little-endian uint64 words, bits LSB-first.
header = mode(1) | sign(1) | scale(SB) | low end(LB) | pattern(PB) | codebook(CB), then
  mode 0: G Huffman codes, then as many patches (pos(PS) | int8 value(8)) as fit;
  mode 1 (always fits): G fixed-width codes of FB bits on a uniform grid, then patches.
Decoded value = level * A + B with A = +/-gs * h, B = +/-gs * c (float32) from the scale
and low-end codes; patches decode to ptab[q] * A + B.

Callers validate every array length before calling (numba does not bounds-check); the
decode core additionally never starts a load past a block's last byte and flags blocks
whose code stream overruns the block (corrupt data).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from eccokv.kernels import signatures as sig
from eccokv.kernels.ecco_core import SYM_STRIDE, G, decode1, decode4, f32_bits, header, symbols4


@njit(inline="always", cache=True)
def _put(words, base, pos, val, n):
    """OR the low `n` bits of `val` into the bit stream at bit `pos` (n <= 57)."""
    wi = base + (pos >> 6)
    off = np.uint64(pos & 63)
    v = np.uint64(val) & ((np.uint64(1) << np.uint64(n)) - np.uint64(1))
    words[wi] |= v << off
    if (pos & 63) + n > 64:
        words[wi + 1] |= v >> (np.uint64(64) - off)


# ----------------------------------------------------------------------------- encoder

@njit(inline="always", cache=True)
def _sum_top(err2, n, k, top):
    """Sum of the k largest of err2[:n] (k small), keeping a sorted list in top[:k]."""
    m = 0
    for j in range(n):
        e = err2[j]
        if m < k:
            i = m
            m += 1
        elif e > top[k - 1]:
            i = k - 1
        else:
            continue
        while i > 0 and top[i - 1] < e:
            top[i] = top[i - 1]
            i -= 1
        top[i] = e
    s = 0.0
    for i in range(m):
        s += top[i]
    return s


@njit(inline="always", cache=True)
def _move_ratio(vj, k, e2, levels, lengths, p, h, NL, tgt, w):
    """Cheapest (weight w) error increase per saved bit moving vj from level k to a
    neighbour with a shorter code (inf if none); the neighbour goes to tgt[0]."""
    best = np.inf
    lk = lengths[h, k]
    for kk in (k - 1, k + 1):
        if kk < 0 or kk >= NL:
            continue
        dl = lk - lengths[h, kk]
        if dl <= 0:
            continue
        e = vj - levels[p, kk]
        r = (w * e * e - e2) / dl
        if r < best:
            best = r
            tgt[0] = kk
    return best



@njit(sig.ENCODE_BLOCKS, cache=True, parallel=True)
def encode_blocks(
    groups, nvalid_last, ngroups, levels, mids, kstart, lengths, codes, errtab, nbuckets,
    scale_table, tscale, scale_steps, sb, lb, ctab, htab, pb, cb, fb, ps, block_bits, ncand,
    patch_by_error, trim_passes, wts, words, fallback,
):
    """Encode float32 groups (nb, g) into `words` (nb * W + 1 uint64, zeroed).

    wts (ngroups * g,) float64: the importance of each position along the codec axis
    (value j of block b sits at position (b % ngroups) * g + j). Every error the encoder
    compares (candidate proxy, pattern choice, trimming, patches) is weighted by it: all
    ones for KV; E[x_j^2] of the input channel for activation-aware weights.

    nvalid_last: valid values in the last group of each row (1..g); ngroups: groups per
    row. levels (S, NL) sorted with levels[:, NL-1] == 1; mids (S, NL-1) midpoints;
    lengths/codes (H, NL) Huffman lengths and LSB-first codes; errtab (B, S) bucket error
    proxies for candidate selection; kstart (S, B): first level index that can be nearest
    for a value in bucket B (nearest-level search starts there).
    fallback (nb,) uint8 output: 1 where mode 1 fired.
    """
    nb, g = groups.shape
    S, NL = levels.shape
    H = lengths.shape[0]
    W = block_bits // 64
    smax = (1 << sb) - 1
    hdr = 2 + sb + lb + pb + cb
    pbits = ps + 8
    log2 = np.log(2.0)
    qmax = (1 << lb) - 1
    nchunks = min(nb, 256)
    per = (nb + nchunks - 1) // nchunks
    minsym = np.zeros(H, np.int64)  # per codebook: the symbol with the shortest code
    for hh in range(H):
        for k in range(NL):
            if lengths[hh, k] < lengths[hh, minsym[hh]]:
                minsym[hh] = k
    for ch in prange(nchunks):
        # per-thread scratch, allocated once per chunk of blocks
        v = np.empty(g, np.float64)
        hist = np.zeros(nbuckets, np.float32)
        approx = np.zeros(S, np.float32)
        sym = np.empty(g, np.int64)
        best_sym = np.empty(g, np.int64)
        err2 = np.empty(g, np.float64)
        cnt = np.zeros(NL, np.int64)
        ratio = np.empty(g, np.float64)
        target = np.zeros(g, np.int64)
        tmp = np.empty(g, np.float64)
        bucket = np.zeros(g, np.int64)
        order = np.zeros(max(1, min(ncand, S)), np.int64)
        for b in range(ch * per, min(nb, (ch + 1) * per)):
            x = groups[b]
            wb = wts[(b % ngroups) * g:(b % ngroups) * g + g]
            nv = g
            if (b % ngroups) == ngroups - 1:
                nv = nvalid_last
            base = b * W
            amax = 0.0
            imax = 0
            for j in range(nv):
                a = abs(x[j])
                if a > amax:
                    amax = a
                    imax = j
            if amax == 0.0:
                continue  # scale code 0: an all-zero group; the block stays zero
            neg = x[imax] < 0
            s = int(np.round(scale_steps * np.log(amax / tscale) / log2)) + smax
            s = max(1, min(smax, s))
            gs = np.float64(scale_table[s])
            if gs == 0.0:
                s = smax
                gs = np.float64(scale_table[s])
            # asymmetric normalisation: the max maps to +1 and the other extreme, coded
            # in lb bits as a fraction of the signed max, to -1
            sg = np.float32(-gs if neg else gs)
            umin = 1.0
            isg = 1.0 / np.float64(sg)
            for j in range(nv):
                u = x[j] * isg
                if u < umin:
                    umin = u
            ql = int(np.round((1.0 - umin) * 0.5 * qmax))
            ql = max(0, min(qmax, ql))
            A = np.float64(np.float32(sg * htab[ql]))
            B = np.float64(np.float32(sg * ctab[ql]))
            if A != 0.0 and ql < qmax:
                # many values at the low extreme (e.g. one outlier above a tight cluster):
                # its level has a long code there, so use the symmetric range [-max, max]
                nlow = 0
                thr = B - 0.9 * A  # v < -0.9  <=>  x < thr (A > 0) or x > thr (A < 0)
                for j in range(nv):
                    nlow += (x[j] < thr) if A > 0 else (x[j] > thr)
                if nlow * 4 > nv:
                    ql = qmax
                    A = np.float64(np.float32(sg * htab[ql]))
                    B = np.float64(np.float32(sg * ctab[ql]))
            iA = 1.0 / A if A != 0.0 else 0.0
            for j in range(g):
                if j < nv:
                    v[j] = (x[j] - B) * iA if A != 0.0 else 1.0
                else:
                    v[j] = 0.0
            # candidate patterns by a histogram proxy of the squared error
            hist[:] = 0
            for j in range(nv):
                bk = int((v[j] + 1.0) * 0.5 * nbuckets)
                bk = max(0, min(nbuckets - 1, bk))
                hist[bk] += np.float32(wb[j])
                bucket[j] = bk
            approx[:] = 0.0
            for bk in range(nbuckets):
                h = hist[bk]
                if h:
                    row = errtab[bk]
                    for p in range(S):
                        approx[p] += h * row[p]
            # the ncand best patterns by the proxy (partial selection, no sort)
            nc = min(ncand, S)
            for ci in range(nc):
                bp = 0
                bv = np.float32(np.inf)
                for pp in range(S):
                    if approx[pp] < bv:
                        bv = approx[pp]
                        bp = pp
                order[ci] = bp
                approx[bp] = np.float32(np.inf)
            best_err = np.inf
            best_p = -1
            best_h = 0
            for ci in range(min(ncand, S)):
                p = order[ci]
                cnt[:] = 0
                tot = 0.0
                mp = mids[p]
                lp = levels[p]
                ks = kstart[p]
                for j in range(g):
                    if j < nv:
                        vj = v[j]
                        # nearest level: start from the bucket's first candidate
                        k = ks[bucket[j]]
                        while k < NL - 1 and vj > mp[k]:
                            k += 1
                        e = vj - lp[k]
                        err2[j] = wb[j] * e * e
                        tot += err2[j]
                        sym[j] = k
                        cnt[k] += 1
                    else:
                        # padding (decoded and dropped): the codebook's shortest code,
                        # chosen below with the codebook; no error counted
                        err2[j] = 0.0
                hbest = 0
                lbest = 1 << 30
                for hh in range(H):
                    ln = (g - nv) * lengths[hh, minsym[hh]]
                    for k in range(NL):
                        ln += cnt[k] * lengths[hh, k]
                    if ln < lbest:
                        lbest = ln
                        hbest = hh
                used = hdr + lbest
                if used > block_bits:
                    # rate-distortion trimming: move values to a neighbouring level with a
                    # shorter code, cheapest error increase per saved bit first, until it fits
                    excess = used - block_bits
                    # passes: rank every value's cheapest move once, apply moves in that
                    # order until the block fits (a value moves at most once per pass)
                    for _pass in range(trim_passes):
                        if excess <= 0:
                            break
                        for j in range(nv):
                            ratio[j] = _move_ratio(v[j], sym[j], err2[j], levels, lengths, p,
                                                   hbest, NL, target[j:j + 1], wb[j])
                        rk = np.argsort(ratio[:nv])
                        for i in range(nv):
                            bj = rk[i]
                            if excess <= 0 or ratio[bj] == np.inf:
                                break
                            k = sym[bj]
                            bk = target[bj]
                            excess -= lengths[hbest, k] - lengths[hbest, bk]
                            cnt[k] -= 1
                            cnt[bk] += 1
                            sym[bj] = bk
                            e = v[bj] - levels[p, bk]
                            tot += wb[bj] * e * e - err2[bj]
                            err2[bj] = wb[bj] * e * e
                    if excess > 0:
                        continue
                    lbest = block_bits - hdr + excess
                    used = hdr + lbest
                npatch = (block_bits - used) // pbits
                # error left after patching the npatch largest errors
                if npatch > 0:
                    tot -= _sum_top(err2, nv, min(npatch, nv), tmp)
                if tot < best_err:
                    best_err = tot
                    best_p = p
                    best_h = hbest
                    best_sym[:nv] = sym[:nv]
                    best_sym[nv:] = minsym[hbest]
            sign_bit = 1 if neg else 0
            if best_p >= 0:
                pos = 0
                _put(words, base, pos, 0, 1)
                _put(words, base, 1, sign_bit, 1)
                _put(words, base, 2, s, sb)
                _put(words, base, 2 + sb, ql, lb)
                _put(words, base, 2 + sb + lb, best_p, pb)
                _put(words, base, 2 + sb + lb + pb, best_h, cb)
                pos = hdr
                for j in range(g):
                    k = best_sym[j]
                    _put(words, base, pos, codes[best_h, k], lengths[best_h, k])
                    pos += lengths[best_h, k]
                for j in range(g):
                    if j < nv:
                        e = v[j] - levels[best_p, best_sym[j]]
                        err2[j] = wb[j] * e * e if patch_by_error else (
                            v[j] * v[j] if best_sym[j] != NL - 1 else -0.5)
                    else:
                        err2[j] = -1.0
            else:
                # always-fits mode: fixed-width codes indexing an evenly spaced subset of the
                # best pattern's levels (which always includes the max level)
                fallback[b] = 1
                p = order[0]
                _put(words, base, 0, 1, 1)
                _put(words, base, 1, sign_bit, 1)
                _put(words, base, 2, s, sb)
                _put(words, base, 2 + sb, ql, lb)
                _put(words, base, 2 + sb + lb, p, pb)
                pos = hdr
                nq = 1 << fb
                for j in range(g):
                    q = 0
                    if j < nv:
                        bq = 0
                        be = np.inf
                        for qq in range(nq):
                            e = v[j] - levels[p, ((qq + 1) * NL >> fb) - 1]
                            if e * e < be:
                                be = e * e
                                bq = qq
                        q = bq
                        err2[j] = wb[j] * be
                    else:
                        err2[j] = -1.0
                    _put(words, base, pos, q, fb)
                    pos += fb
            # patches: largest remaining error first; spare slots repeat the last patch
            npatch = (block_bits - pos) // pbits
            lastj = 0
            lastq = 0
            for _t in range(npatch):
                jm = np.argmax(err2)
                if err2[jm] >= 0.0:
                    lastj = jm
                    q = int(np.round(v[jm] * 127.0))
                    lastq = max(-127, min(127, q))
                    err2[jm] = -1.0
                _put(words, base, pos, lastj, ps)
                _put(words, base, pos + ps, lastq & 255, 8)
                pos += pbits


# ----------------------------------------------------------------------------- decoder


@njit(inline="always", cache=True)
def _f32_to_bf16(u):
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


@njit(inline="always", cache=True)
def _f32_to_f16(u):
    """IEEE round-to-nearest-even float32 bits -> float16 bits, saturating at +/-65504."""
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    e = np.int64((u >> np.uint32(23)) & np.uint32(0xFF))
    m = np.uint32(u & np.uint32(0x7FFFFF))
    ne = e - 127 + 15
    if ne >= 31:
        return np.uint16(sign | np.uint32(0x7BFF))
    if ne <= 0:
        shift = 14 - ne
        if shift > 24:
            return np.uint16(sign)
        mm = m | np.uint32(0x800000)
        h = mm >> np.uint32(shift)
        rem = mm & ((np.uint32(1) << np.uint32(shift)) - np.uint32(1))
        half = np.uint32(1) << np.uint32(shift - 1)
        if rem > half or (rem == half and (h & np.uint32(1))):
            h += np.uint32(1)
        return np.uint16(sign | h)
    h = (np.uint32(ne) << np.uint32(10)) | (m >> np.uint32(13))
    rem = m & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    if h >= np.uint32(0x7C00):
        h = np.uint32(0x7BFF)
    return np.uint16(sign | h)


@njit(inline="always", cache=True)
def _put_value(out, i, v, kind):
    """out[i] = v (float32) as float32 (kind 0) or the bits of bf16 (1) / fp16 (2)."""
    if kind == 0:
        out[i] = v
    elif kind == 1:
        out[i] = _f32_to_bf16(f32_bits(v))
    else:
        out[i] = _f32_to_f16(f32_bits(v))


@njit(cache=True, error_model="numpy")
def _store_rows(lv, AB, nblk, m0, gi, length, ngroups, suffix, out, kind):
    """Write decoded blocks of rows m0 .. m0+nblk-1 (group gi of each; consecutive rows,
    so consecutive positions when suffix > 1) to the flat output: value = level * A + B,
    rounded to float32 after the multiply and after the add (no FMA: bit-identical to
    the reference decoder)."""
    start = gi * G
    n = min(G, length - start)
    if suffix == 1:
        for i in range(nblk):
            m = m0 + i
            off = m * length + start
            A = AB[2 * i]
            B = AB[2 * i + 1]
            src = lv[i * G:i * G + n]
            if kind == 0:
                dst = out[off:off + n]
                for j in range(n):
                    dst[j] = np.float32(src[j] * A) + B
            else:
                for j in range(n):
                    _put_value(out, off + j, np.float32(src[j] * A) + B, kind)
        return
    pre = m0 // suffix
    s0 = m0 - pre * suffix
    base = pre * length * suffix + start * suffix + s0
    # values block by block (vectorised), in place, then a transposing copy whose stores
    # are contiguous runs of nblk values (one cache line for 16 float32 channels)
    for i in range(nblk):
        A = AB[2 * i]
        B = AB[2 * i + 1]
        src = lv[i * G:i * G + n]
        for j in range(n):
            src[j] = np.float32(src[j] * A) + B
    if kind == 0:
        for j in range(n):
            dst = out[base + j * suffix:base + j * suffix + nblk]
            for i in range(nblk):
                dst[i] = lv[i * G + j]
    else:
        for j in range(n):
            o = base + j * suffix
            for i in range(nblk):
                _put_value(out, o + i, lv[i * G + j], kind)


_RUNS = 64  # work runs of decode_blocks (8 per thread up to 8 threads)


@njit(inline="always", cache=True)
def tile_plan(nb, ngroups, suffix):
    """Work plan of a block decoder over nb blocks (`decode_blocks`, and ecco-eb's):
    tiles of up to TR rows at one group (TR = 16 when suffix > 1, so the stores of a
    tile fill whole cache lines, else 4), split into nrun runs of `per` tiles. Returns
    (nrows, TR, tiles_per, ntiles, nrun, per)."""
    nrows = nb // ngroups
    TR = 16
    if suffix == 1:
        TR = 4
    # tiles never cross a row block of `suffix` rows (their outputs are then contiguous)
    tiles_per = (suffix + TR - 1) // TR if suffix > 1 else (nrows + TR - 1) // TR
    nblocks_rows = nrows // suffix if suffix > 1 else 1
    ntiles = tiles_per * nblocks_rows * ngroups
    # tiles in at most _RUNS runs, so the scratch buffers are allocated once per run (an
    # allocation per 4-block tile cost ~25% of the decode time; numba.get_num_threads()
    # here would make the function uncachable)
    nrun = min(ntiles, _RUNS)
    per = (ntiles + nrun - 1) // max(nrun, 1)
    return nrows, TR, tiles_per, ntiles, nrun, per


@njit(inline="always", cache=True)
def tile_rows(it, ngroups, tiles_per, suffix, TR, nrows):
    """Tile `it` of `tile_plan`: its group gi and rows m0 .. m1-1."""
    gi = it % ngroups
    rt = it // ngroups
    if suffix > 1:
        pr = rt // tiles_per
        m0 = pr * suffix + (rt - pr * tiles_per) * TR
        m1 = min(pr * suffix + suffix, m0 + TR)
    else:
        m0 = rt * TR
        m1 = min(nrows, m0 + TR)
    return gi, m0, m1


@njit(inline="always", cache=True, error_model="numpy")
def _decode_tile(words, it, ngroups, tiles_per, suffix, TR, nrows, t, tsc, length, out, kind,
                 bad, sy, lv, AB):
    """Tile `it` of `decode_blocks`: up to TR rows at one group, decoded then stored."""
    gi, m0, m1 = tile_rows(it, ngroups, tiles_per, suffix, TR, nrows)
    i = 0
    while i < m1 - m0:
        b = (m0 + i) * ngroups + gi
        if i + 4 <= m1 - m0:
            nbad = decode4(words, b, b + ngroups, b + 2 * ngroups, b + 3 * ngroups, t, tsc,
                           sy, lv, i * G, AB, i)
            if nbad != 0:
                for k in range(4):
                    bad[b + k * ngroups] = decode1(words, b + k * ngroups, t, tsc, sy,
                                                   lv, (i + k) * G, AB, i + k)
            i += 4
        else:
            bad[b] = decode1(words, b, t, tsc, sy, lv, i * G, AB, i)
            i += 1
    _store_rows(lv, AB, m1 - m0, m0, gi, length, ngroups, suffix, out, kind)


@njit(sig.DECODE_BLOCKS, cache=True, parallel=True, error_model="numpy")
def decode_blocks(words, nb, t, tsc, length, ngroups, suffix, out, kind, bad):
    """Decode nb Ecco blocks straight into the flat output `out` (float32 if kind == 0,
    else the uint16 bits of bf16 (1) or fp16 (2)) in the grouping layout: block
    b = m * ngroups + gi holds row m's values gi*128 .. at stride `suffix` (row m =
    p * suffix + s). Work items are tiles of up to 16 consecutive rows at one group (16
    channels of one token group when suffix > 1, so stores fill whole cache lines),
    decoded four blocks at a time by the shared core. bad (nb,) uint8: 1 for corrupt
    blocks (code stream overruns; nothing else is read past)."""
    nrows, TR, tiles_per, ntiles, nrun, per = tile_plan(nb, ngroups, suffix)
    for ru in prange(nrun):
        sy = np.empty(4 * SYM_STRIDE, np.uint8)
        lv = np.empty(TR * G, np.float32)
        AB = np.empty(2 * TR, np.float32)
        for it in range(ru * per, min(ntiles, ru * per + per)):
            _decode_tile(words, it, ngroups, tiles_per, suffix, TR, nrows, t, tsc, length, out,
                         kind, bad, sy, lv, AB)


@njit(sig.SYMBOLS_PASS, cache=True, parallel=True, error_model="numpy")
def symbols_pass(words, nb, t):
    """Phase 1 alone (the serial Huffman pass of the decode core) over nb blocks, four at a
    time: for benchmarks, to split decode time into the Huffman pass and the rest (levels,
    patches, scaling, stores). Returns a checksum so the work cannot be optimised away."""
    nq = nb // 4
    acc = np.zeros(max(1, nq), np.int64)
    for q in prange(nq):
        sy = np.empty(4 * SYM_STRIDE, np.uint8)
        b = 4 * q
        m0, s0, p0, h0, A0, B0 = header(words, b, t, 0.0)
        m1, s1, p1, h1, A1, B1 = header(words, b + 1, t, 0.0)
        m2, s2, p2, h2, A2, B2 = header(words, b + 2, t, 0.0)
        m3, s3, p3, h3, A3, B3 = header(words, b + 3, t, 0.0)
        e0, e1, e2, e3 = symbols4(words, b, b + 1, b + 2, b + 3, h0, h1, h2, h3, t, sy)
        acc[q] = e0 + e1 + e2 + e3 + sy[0]
    return acc.sum()
