"""numba kernels of the ecco-eb codec: plan (quantise within the bound, pick each
block's mode and codebook, count its bits), write, check (validate the index and every
length field of untrusted data) and decode (through `eb_core`, the format's one decode
core). Format: `eb_core` and docs/format.md section 4.

Callers validate every array length before calling (numba does not bounds-check).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from eccokv.kernels.eb_core import (
    CB_BITS,
    CB_EXACT,
    CB_FIXED,
    EMAX,
    ESC,
    LEN_BITS,
    MAX_LEN,
    MAX_WIDTH,
    NSYM,
    SB_BLOCKS,
    W_BITS,
    G,
    decode1,
    decode4,
    field,
)
from eccokv.kernels.ecco_core import SYM_STRIDE
from eccokv.kernels.ecco_numba import _put, _store_rows, tile_plan, tile_rows

ZMAX = 1 << 30  # |z| beyond this: the block is stored exact
CONST_BITS = 1 + 32


@njit(inline="always", cache=True)
def _bitlen(v):
    n = 0
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit(inline="always", cache=True)
def _value(e, A, B):
    """The decoded value of code e: float32(e * A) + B, as the decoders compute it."""
    return np.float32(np.float32(np.float32(e) * A) + B)


@njit(cache=True, parallel=True, error_model="numpy")
def plan_blocks(groups, nvalid_last, ngroups, bnd, dt, d0, sbase, kmax, lens, force,
                k_out, z_out, cb_out, w_out, pay_out):
    """Plan every block of `groups` (nb, 128) float32 (the last group of each row holds
    nvalid_last valid values). bnd (nb,): the error bound of each block; dt (nb,): the
    largest step allowed (<= 0: the block must be exact); d0: the tensor's step; force
    (nb,) uint8: 1 = store exact. Outputs per block: step code k, offset z, cb (0..13
    Huffman codebook, 14 fixed width, 15 exact), w (fixed width, or 0 constant / 1 raw
    for exact blocks) and the payload bits after the len, cb, k and z fields. Every
    value of a non-exact block is checked against its bound as the decoder computes it
    (float32); a block that fails is planned exact."""
    nb = groups.shape[0]
    H = lens.shape[0]
    for b in prange(nb):
        x = groups[b]
        n = G if (b % ngroups) != ngroups - 1 else nvalid_last
        same = True  # a constant group is stored exactly (33 bits: the cheapest mode)
        for j in range(1, n):
            if x[j] != x[0]:
                same = False
                break
        exact = force[b] != 0 or not dt[b] > 0.0 or same
        kk = 0
        A = np.float32(0.0)
        if not exact:
            kk = max(0, int(np.ceil(16.0 * np.log2(d0 / dt[b]) - 1e-9)))
            while kk < kmax and np.float32(d0 * sbase[kk]) > dt[b]:
                kk += 1
            A = np.float32(d0 * sbase[kk])
            if kk > kmax or A > dt[b] or not A > 0:
                exact = True
        q = np.empty(G, np.int64)
        best = -1
        z = 0
        w = 0
        pay = 0
        if not exact:
            qmin = np.int64(1) << 62
            qmax = -qmin
            s = 0.0
            Af = np.float64(A)
            for j in range(n):
                qj = np.int64(np.rint(np.float64(x[j]) / Af))
                q[j] = qj
                qmin = min(qmin, qj)
                qmax = max(qmax, qj)
                s += qj
            span = qmax - qmin
            if span >= (np.int64(1) << MAX_WIDTH) or abs(qmin) >= ZMAX or abs(qmax) >= ZMAX:
                exact = True
        if not exact:
            cost = np.int64(1) << 62
            # Huffman around the median (robust to outliers, which become escapes)
            zz = np.int64(np.rint(np.median(q[:n])))
            cnt = np.zeros(NSYM, np.int64)
            emx = 0
            for j in range(n):
                e = q[j] - zz
                if e > EMAX or e < -EMAX:
                    cnt[ESC] += 1
                    emx = max(emx, e if e >= 0 else -e - 1)
                else:
                    cnt[2 * e if e >= 0 else -2 * e - 1] += 1
            ew = _bitlen(emx) + 1 if cnt[ESC] > 0 else 0
            if ew <= 31:
                for h in range(H):
                    c = 0
                    for sy in range(NSYM):
                        c += cnt[sy] * lens[h, sy]
                    if c < cost:
                        cost = c
                        best = h
                cost += W_BITS + cnt[ESC] * ew
                z = zz
                w = ew
            wf = max(1, _bitlen(span))
            if W_BITS + n * wf < cost:
                best = CB_FIXED
                z = qmin
                w = wf
                cost = W_BITS + n * wf
            pay = cost
            # the bound, checked on every value as the decoder computes it
            Bz = np.float32(np.float64(z) * np.float64(A))
            for j in range(n):
                if abs(np.float64(x[j]) - np.float64(_value(q[j] - z, A, Bz))) > bnd[b]:
                    exact = True
                    break
        if exact:
            best = CB_EXACT
            kk = 0
            z = 0
            w = 0 if same else 1
            pay = 1 + 32 * n if w == 1 else CONST_BITS
        k_out[b] = kk
        z_out[b] = z
        cb_out[b] = best
        w_out[b] = w
        pay_out[b] = pay


@njit(cache=True, error_model="numpy")
def _write_block(groups, b, n, pos, ln, KB, ZB, k, z, cb, w, A, codes, lens, words):
    x = groups[b]
    _put(words, 0, pos, ln, LEN_BITS)
    pos += LEN_BITS
    _put(words, 0, pos, cb, CB_BITS)
    pos += CB_BITS
    if cb == CB_EXACT:
        _put(words, 0, pos, w, 1)
        pos += 1
        if w == 0:
            _put(words, 0, pos, np.int64(x[0:1].view(np.uint32)[0]), 32)
            return
        u = x.view(np.uint32)
        for j in range(n):
            _put(words, 0, pos, np.int64(u[j]), 32)
            pos += 32
        return
    if KB > 0:
        _put(words, 0, pos, k, KB)
        pos += KB
    if ZB > 0:
        _put(words, 0, pos, z & ((np.int64(1) << ZB) - 1), ZB)
        pos += ZB
    Af = np.float64(A)
    if cb == CB_FIXED:
        _put(words, 0, pos, w - 1, W_BITS)
        pos += W_BITS
        for j in range(n):
            e = np.int64(np.rint(np.float64(x[j]) / Af)) - z
            _put(words, 0, pos, e, w)
            pos += w
        return
    _put(words, 0, pos, w, W_BITS)  # escape width
    pos += W_BITS
    for j in range(n):
        e = np.int64(np.rint(np.float64(x[j]) / Af)) - z
        sy = ESC if e > EMAX or e < -EMAX else (2 * e if e >= 0 else -2 * e - 1)
        ln_ = lens[cb, sy]
        _put(words, 0, pos, codes[cb, sy], ln_)
        pos += ln_
    if w > 0:
        m = (np.int64(1) << w) - 1
        for j in range(n):
            e = np.int64(np.rint(np.float64(x[j]) / Af)) - z
            if e > EMAX or e < -EMAX:
                _put(words, 0, pos, e & m, w)
                pos += w


@njit(cache=True, parallel=True, error_model="numpy")
def write_blocks(groups, nvalid_last, ngroups, starts, KB, ZB, d0, sbase, k, z, cb, w, codes,
                 lens, words):
    """Write the planned blocks at bit offsets `starts` (nb + 1,) into `words` (zeroed).
    Groups of 8 blocks are written in two parallel passes (even, then odd groups): a group
    spans more than two words, so groups two apart never share a word."""
    nb = groups.shape[0]
    nsb = (nb + SB_BLOCKS - 1) // SB_BLOCKS
    for par in range(2):
        for s2 in prange((nsb + 1 - par) // 2):
            s = 2 * s2 + par
            for b in range(s * SB_BLOCKS, min(nb, s * SB_BLOCKS + SB_BLOCKS)):
                n = G if (b % ngroups) != ngroups - 1 else nvalid_last
                A = np.float32(d0 * sbase[k[b]])
                _write_block(groups, b, n, starts[b], starts[b + 1] - starts[b], KB, ZB, k[b],
                             z[b], cb[b], w[b], A, codes, lens, words)


@njit(cache=True, error_model="numpy")
def check_blocks(words, index, nb, ngroups, nvalid_last, KB, ZB):
    """Validate untrusted ecco-eb data before any decoder runs: every group of 8 blocks
    must walk, by its blocks' length fields, exactly from its index entry to the next;
    every length must be the one its mode implies (Huffman: between n and n * MAX_LEN
    code bits plus at most n escapes, n the group's values; the decoder checks the exact
    escape count). The index itself is checked by the caller (monotone, inside the
    data). Returns the first bad block, or -1."""
    nsb = (nb + SB_BLOCKS - 1) // SB_BLOCKS
    hdr = LEN_BITS + CB_BITS
    for s in range(nsb):
        pos = np.int64(index[s])
        end = np.int64(index[s + 1])
        for b in range(s * SB_BLOCKS, min(nb, s * SB_BLOCKS + SB_BLOCKS)):
            n = G if (b % ngroups) != ngroups - 1 else nvalid_last
            if pos + hdr + 1 > end:
                return b
            ln = field(words, pos, LEN_BITS)
            cb = field(words, pos + LEN_BITS, CB_BITS)
            if cb == CB_EXACT:
                sub = field(words, pos + hdr, 1)
                ok = ln == hdr + (1 + 32 * n if sub == 1 else CONST_BITS)
            elif cb == CB_FIXED:
                if pos + hdr + KB + ZB + W_BITS > end:
                    return b
                wv = field(words, pos + hdr + KB + ZB, W_BITS) + 1
                ok = wv <= MAX_WIDTH and ln == hdr + KB + ZB + W_BITS + n * wv
            else:
                if pos + hdr + KB + ZB + W_BITS > end:
                    return b
                ew = field(words, pos + hdr + KB + ZB, W_BITS)
                lo = hdr + KB + ZB + W_BITS + n
                ok = ew <= 31 and lo <= ln <= lo + n * (MAX_LEN - 1) + n * ew
            if not ok or pos + ln > end:
                return b
            pos += ln
        if pos != end:
            return min(nb, s * SB_BLOCKS + SB_BLOCKS) - 1
    return -1



@njit(cache=True, parallel=True, error_model="numpy")
def decode_blocks(words, index, nb, KB, ZB, d0, sbase, mtab, lens, length, ngroups, suffix,
                  out, kind, bad):
    """Decode nb checked ecco-eb blocks into the flat output `out` (float32 if kind == 0,
    else the uint16 bits of bf16 (1) / fp16 (2)) in the grouping layout, as Ecco's
    `decode_blocks` does: tiles of up to 16 rows at one group, four blocks at a time
    through the format's decode core. bad (nb,) uint8: 1 for corrupt blocks."""
    nrows, TR, tiles_per, ntiles, nrun, per = tile_plan(nb, ngroups, suffix)
    for ru in prange(nrun):
        sy = np.empty(4 * SYM_STRIDE, np.uint8)
        lv = np.empty(TR * G, np.float32)
        AB = np.empty(2 * TR, np.float32)
        for it in range(ru * per, min(ntiles, ru * per + per)):
            gi, m0, m1 = tile_rows(it, ngroups, tiles_per, suffix, TR, nrows)
            n = min(G, length - gi * G)
            i = 0
            while i < m1 - m0:
                b = (m0 + i) * ngroups + gi
                if i + 4 <= m1 - m0:
                    nbad = decode4(words, index, b, b + ngroups, b + 2 * ngroups,
                                   b + 3 * ngroups, n, KB, ZB, d0, sbase, mtab, lens, sy, lv,
                                   i * G, AB, i)
                    if nbad != 0:
                        for kq in range(4):
                            bad[b + kq * ngroups] = decode1(
                                words, index, b + kq * ngroups, n, KB, ZB, d0, sbase, mtab,
                                lens, sy, lv, (i + kq) * G, AB, i + kq)
                    i += 4
                else:
                    bad[b] = decode1(words, index, b, n, KB, ZB, d0, sbase, mtab, lens, sy,
                                     lv, i * G, AB, i)
                    i += 1
            _store_rows(lv, AB, m1 - m0, m0, gi, length, ngroups, suffix, out, kind)
