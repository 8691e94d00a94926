"""Fused decode-GEMV over Ecco weight blocks: Y = X W^T, W read straight from its blocks.

W (n_out, n_in) is stored in the flat weight layout (`eccokv.weights.layout`): the
row-major matrix cut into blocks of 128 consecutive values, so block b holds flat values
128 b .. 128 b + 127 and crosses into the next row only when n_in % 128 != 0. `unit`
rows (128 / gcd(n_in, 128)) end exactly on a block boundary; a work item is one such unit
of rows, so no two threads ever write the same output. Each block is decoded by the shared
core (`ecco_core.decode4`, four consecutive blocks side by side) into code-space levels
l and the pair (A, B); a row segment of the block then contributes
``A * sum(l * x) + B * sum(x)`` to y[t, row]. W itself is never written out.

Callers validate every array size first (numba does not bounds-check): words holds
nblocks * W + 1 uint64, nblocks = ceil(n_out * n_in / 128), X is (T, n_in) float32 and Y
(T, n_out) float32, both C-contiguous. Corrupt blocks (a code stream overrunning its
block) are counted, never read past; the caller raises if the count is not 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from eccokv.kernels import signatures as sig
from eccokv.kernels.ecco_core import SYM_STRIDE, G, decode1, decode4, decode4_slow

_RUNS = 64  # work runs (scratch allocated once per run)
_F0 = np.float32(0.0)


@njit(inline="always", cache=True)
def _accumulate(lv, lo, A, B, k0, n_in, n_out, X, Y, T):
    """Add the block whose levels are lv[lo : lo+128] and which starts at flat index k0 to
    Y: each row segment it covers gets A * sum(l * x) + B * sum(x)."""
    m = k0 // n_in
    c = k0 - m * n_in
    j = 0
    while j < G and m < n_out:
        ln = min(G - j, n_in - c)
        for tt in range(T):
            d = _F0
            s = _F0
            xo = np.uint64(c)
            lj = np.uint64(lo + j)
            for i in range(ln):
                ui = np.uint64(i)
                xv = X[tt, xo + ui]
                d += lv[lj + ui] * xv
                s += xv
            Y[tt, m] += A * d + B * s
        j += ln
        m += 1
        c = 0


@njit(sig.GEMV, cache=True, parallel=True, fastmath=True, error_model="numpy")
def gemv_blocks(words, nblocks, t, tsc, n_in, n_out, unit, X, Y):
    """Y[t, m] = sum_k W[m, k] X[t, k] for the Ecco blocks `words` of W (see the module
    docstring). Y is overwritten. Returns the number of corrupt blocks."""
    T = X.shape[0]
    bpu = unit * n_in // G  # blocks per unit of rows (exact: unit * n_in % 128 == 0)
    nunits = (n_out + unit - 1) // unit
    nrun = min(nunits, _RUNS)
    per = (nunits + nrun - 1) // max(nrun, 1)
    bad = np.zeros(max(nrun, 1), np.int64)
    for ru in prange(nrun):
        sy = np.empty(4 * SYM_STRIDE, np.uint8)
        lv = np.empty(4 * G, np.float32)
        AB = np.empty(8, np.float32)
        nb = 0
        u0 = ru * per
        u1 = min(nunits, u0 + per)
        for tt in range(T):
            for m in range(u0 * unit, min(n_out, u1 * unit)):
                Y[tt, m] = _F0
        # the run's units are one contiguous block range: quads run across unit bounds
        b = u0 * bpu
        b1 = min(nblocks, u1 * bpu)
        while b < b1:
            if b + 4 <= b1:
                n = decode4(words, b, b + 1, b + 2, b + 3, t, tsc, sy, lv, 0, AB, 0)
                if n < 0:
                    n = decode4_slow(words, b, b + 1, b + 2, b + 3, t, tsc, sy, lv, 0, AB, 0)
                nb += n
                for q in range(4):
                    _accumulate(lv, q * G, AB[2 * q], AB[2 * q + 1], (b + q) * G, n_in, n_out,
                                X, Y, T)
                b += 4
            else:
                nb += decode1(words, b, t, tsc, sy, lv, 0, AB, 0)
                _accumulate(lv, 0, AB[0], AB[1], b * G, n_in, n_out, X, Y, T)
                b += 1
        bad[ru] = nb
    return bad.sum()
