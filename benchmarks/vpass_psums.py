"""p.V per block: dense p . levels (current) vs per-level p sums then 16-entry dot."""
import time, numpy as np
from numba import njit

@njit(fastmath=True, cache=False)
def dense(P, lv, R, nblk, out):
    # lv: [nblk, 4, 128] decoded levels of 4 channels; P: [R, nblk*128]
    for b in range(nblk):
        for r in range(R):
            x0 = x1 = x2 = x3 = np.float32(0)
            for k in range(128):
                pt = P[r, b * 128 + k]
                x0 += pt * lv[b, 0, k]; x1 += pt * lv[b, 1, k]
                x2 += pt * lv[b, 2, k]; x3 += pt * lv[b, 3, k]
            out[r, 0] += x0; out[r, 1] += x1; out[r, 2] += x2; out[r, 3] += x3

@njit(fastmath=True, cache=False)
def hist(P, sy, lev, R, nblk, out):
    # sy: [nblk, 4, 128] uint8 symbols; lev: [16] levels; per-level sums of p then dot
    bins = np.zeros((4, 16), np.float32)
    for b in range(nblk):
        for r in range(R):
            bins[:] = 0
            for k in range(128):
                pt = P[r, b * 128 + k]
                bins[0, sy[b, 0, k]] += pt; bins[1, sy[b, 1, k]] += pt
                bins[2, sy[b, 2, k]] += pt; bins[3, sy[b, 3, k]] += pt
            for c in range(4):
                x = np.float32(0)
                for s in range(16):
                    x += bins[c, s] * lev[s]
                out[r, c] += x

rng = np.random.default_rng(0)
for R in (1, 3, 4, 8):
    nblk = 64
    P = rng.random((R, nblk * 128), dtype=np.float32)
    sy = rng.integers(0, 16, (nblk, 4, 128)).astype(np.uint8)
    lev = rng.standard_normal(16).astype(np.float32)
    lv = lev[sy]
    out = np.zeros((R, 4), np.float32)
    dense(P, lv, R, nblk, out); hist(P, sy, lev, R, nblk, out)
    td = th = 9
    for _ in range(200):
        t = time.perf_counter(); dense(P, lv, R, nblk, out); td = min(td, time.perf_counter() - t)
        t = time.perf_counter(); hist(P, sy, lev, R, nblk, out); th = min(th, time.perf_counter() - t)
    n = R * nblk * 4 * 128
    print(f"R={R}: dense {n/td/1e9:.2f} G p*v/s, per-level sums {n/th/1e9:.2f} G/s ({th/td:.1f}x slower)")
