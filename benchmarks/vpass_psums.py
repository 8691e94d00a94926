"""p.V per block: dense p . levels (what the fused V pass does) against per-level sums of
p followed by one 16-entry dot with the levels (the alternative the speed issue proposed).

    python benchmarks/vpass_psums.py      (one core; figures in docs/format.md)
"""

import time

import numpy as np
from numba import njit


@njit(fastmath=True)
def dense(P, lv, R, nblk, out):
    """lv [nblk, 4, 128]: decoded levels of 4 channels; P [R, nblk * 128]: weights."""
    for b in range(nblk):
        for r in range(R):
            x0 = x1 = x2 = x3 = np.float32(0)
            for k in range(128):
                pt = P[r, b * 128 + k]
                x0 += pt * lv[b, 0, k]
                x1 += pt * lv[b, 1, k]
                x2 += pt * lv[b, 2, k]
                x3 += pt * lv[b, 3, k]
            out[r, 0] += x0
            out[r, 1] += x1
            out[r, 2] += x2
            out[r, 3] += x3


@njit(fastmath=True)
def hist(P, sy, lev, R, nblk, out):
    """sy [nblk, 4, 128] uint8 symbols, lev [16] levels: per-level sums of p, then a dot."""
    bins = np.zeros((4, 16), np.float32)
    for b in range(nblk):
        for r in range(R):
            bins[:] = 0
            for k in range(128):
                pt = P[r, b * 128 + k]
                for c in range(4):
                    bins[c, sy[b, c, k]] += pt
            for c in range(4):
                x = np.float32(0)
                for s in range(16):
                    x += bins[c, s] * lev[s]
                out[r, c] += x


def best(fn, *args, repeats=200):
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    rng = np.random.default_rng(0)
    nblk = 64
    for R in (1, 3, 4, 8):
        P = rng.random((R, nblk * 128), dtype=np.float32)
        sy = rng.integers(0, 16, (nblk, 4, 128)).astype(np.uint8)
        lev = rng.standard_normal(16).astype(np.float32)
        lv = lev[sy]
        out = np.zeros((R, 4), np.float32)
        td = best(dense, P, lv, R, nblk, out)
        th = best(hist, P, sy, lev, R, nblk, out)
        n = R * nblk * 4 * 128
        print(f"R={R}: dense {n / td / 1e9:.2f} G p*v/s, per-level sums "
              f"{n / th / 1e9:.2f} G/s ({th / td:.1f}x slower)")


if __name__ == "__main__":
    main()
