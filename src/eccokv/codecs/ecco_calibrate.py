"""Offline calibration of Ecco profiles: two-level k-means patterns and Huffman codebooks.

Input: float32 groups (N, 128) of real K/V values. Per variant:
1. normalise each group so its max-magnitude value is +1 and its other extreme is -1
   (the fixed last and first levels; see docs/format.md);
2. per-group 1-D k-means with NL-2 clusters over the other values (the "group pattern");
3. k-means over the group patterns -> S shared patterns (k-means++ init);
4. refinement: assign each group to the shared pattern with the smallest squared error and
   move each level to the mean of the values it quantises (Lloyd on the real error);
5. codebooks: symbol histograms of the groups under their patterns are clustered into H
   groups, each getting a length-limited (8 bit) canonical Huffman code, alternating
   "fit codes to clusters" and "move each group to its shortest codebook".
No transformers here: the CLI collects K/V and hands the groups to `build_profile`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numba import njit, prange

from eccokv.codecs.ecco_profile import MAX_CODE_LEN, Profile, VariantTables
from eccokv.entropy.huffman import huffman_lengths

DEFAULT_SHAPES: dict[str, dict[str, int]] = {
    "ecco4": {"levels": 14, "patterns": 128, "codebooks": 4},
    "ecco3": {"levels": 8, "patterns": 64, "codebooks": 4},
    "ecco2": {"levels": 4, "patterns": 16, "codebooks": 4},
}


def normalise_groups(groups: np.ndarray) -> np.ndarray:
    """(N, g) -> (N', g-2) sorted values in [-1, 1] without the two extremes: u = x / max
    (signed), then the range [min u, 1] maps onto [-1, 1]. Degenerate groups (zero or
    constant) are dropped."""
    g = np.asarray(groups, dtype=np.float64)
    rows = np.arange(len(g))
    amax_idx = np.abs(g).argmax(axis=1)
    mx = g[rows, amax_idx]
    u = g / np.where(mx == 0, 1.0, mx)[:, None]
    u[rows, amax_idx] = 1.0
    amin_idx = u.argmin(axis=1)
    umin = u[rows, amin_idx]
    keep = (mx != 0) & (umin < 1.0) & (amin_idx != amax_idx)
    c, h = (1.0 + umin) * 0.5, (1.0 - umin) * 0.5
    v = (u - c[:, None]) / np.where(h > 0, h, 1.0)[:, None]
    mask = np.ones_like(v, dtype=bool)
    mask[rows, amax_idx] = False
    mask[rows, amin_idx] = False
    v, mask = v[keep], mask[keep]
    rest = v[mask].reshape(len(v), -1)
    return np.sort(np.clip(rest, -1.0, 1.0), axis=1)


@njit(cache=True, parallel=True)
def _group_kmeans(vals, k, iters):
    """1-D k-means per row of sorted `vals` (N, n): returns sorted centroids (N, k)."""
    N, n = vals.shape
    out = np.empty((N, k))
    for i in prange(N):
        v = vals[i]
        c = np.empty(k)
        for t in range(k):
            c[t] = v[min(n - 1, int((t + 0.5) * n / k))]
        for _ in range(iters):
            s = np.zeros(k)
            cnt = np.zeros(k)
            t = 0
            for j in range(n):
                while t < k - 1 and v[j] > 0.5 * (c[t] + c[t + 1]):
                    t += 1
                s[t] += v[j]
                cnt[t] += 1
            for t in range(k):
                if cnt[t] > 0:
                    c[t] = s[t] / cnt[t]
            c.sort()
        out[i] = c
    return out


@njit(cache=True, parallel=True)
def _assign(vals, levels):
    """Best pattern per row of sorted vals by squared error; returns (idx, err)."""
    N, n = vals.shape
    S, L = levels.shape
    idx = np.zeros(N, np.int64)
    best = np.empty(N)
    for i in prange(N):
        v = vals[i]
        be = np.inf
        bp = 0
        for p in range(S):
            lv = levels[p]
            t = 0
            e = 0.0
            for j in range(n):
                while t < L - 1 and v[j] > 0.5 * (lv[t] + lv[t + 1]):
                    t += 1
                d = v[j] - lv[t]
                e += d * d
            if e < be:
                be = e
                bp = p
        idx[i] = bp
        best[i] = be
    return idx, best


@njit(cache=True)
def _update(vals, idx, levels):
    """Lloyd step: each level (except the fixed last) moves to the mean of its values.
    Also returns symbol counts per row (N, L) with the group max counted as the last."""
    N, n = vals.shape
    S, L = levels.shape
    s = np.zeros((S, L))
    cnt = np.zeros((S, L))
    sym_counts = np.zeros((N, L), np.int64)
    for i in range(N):
        p = idx[i]
        lv = levels[p]
        t = 0
        for j in range(n):
            while t < L - 1 and vals[i, j] > 0.5 * (lv[t] + lv[t + 1]):
                t += 1
            s[p, t] += vals[i, j]
            cnt[p, t] += 1
            sym_counts[i, t] += 1
        sym_counts[i, L - 1] += 1  # the group max
        sym_counts[i, 0] += 1  # the other extreme
    new = levels.copy()
    for p in range(S):
        for t in range(1, L - 1):
            if cnt[p, t] > 0:
                new[p, t] = s[p, t] / cnt[p, t]
    return new, sym_counts


def _kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Plain k-means with k-means++ init on rows of x (N, d)."""
    n = len(x)
    k = min(k, n)
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        c = x[rng.choice(n, p=p)]
        centers.append(c)
        d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
    c = np.stack(centers)
    for _ in range(iters):
        d = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
        a = d.argmin(1)
        for j in range(k):
            m = a == j
            if m.any():
                c[j] = x[m].mean(0)
    return c


def _finish_levels(c: np.ndarray) -> np.ndarray:
    """Sort the free levels, clip them into (-1, 1), add the fixed levels -1 and 1."""
    lo = np.nextafter(np.float32(-1.0), np.float32(0))
    hi = np.nextafter(np.float32(1.0), np.float32(0))
    c = np.clip(np.sort(c, axis=1), lo, hi)
    n = len(c)
    lv = np.concatenate([-np.ones((n, 1)), c, np.ones((n, 1))], axis=1).astype(np.float32)
    return np.ascontiguousarray(np.sort(lv, axis=1))


def _codebooks(counts: np.ndarray, H: int, iters: int = 12) -> np.ndarray:
    """Cluster symbol histograms (N, L) into H length-limited Huffman codebooks."""
    L = counts.shape[1]
    p = (counts + 0.5) / (counts + 0.5).sum(1, keepdims=True)
    ent = -(p * np.log2(p)).sum(1)
    order = np.argsort(ent)
    assign = np.empty(len(counts), np.int64)
    for h, part in enumerate(np.array_split(order, H)):
        assign[part] = h
    lengths = np.zeros((H, L), np.uint8)
    for _ in range(iters):
        for h in range(H):
            m = assign == h
            tot = counts[m].sum(0) if m.any() else np.ones(L)
            lengths[h] = huffman_lengths(tot, MAX_CODE_LEN)
        cost = counts @ lengths.T.astype(np.int64)
        new = cost.argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
    return lengths


def build_variant(groups: np.ndarray, levels: int, patterns: int, codebooks: int,
                  seed: int = 0, refine: int = 6, max_groups: int = 60000) -> VariantTables:
    """Learn one variant's tables from float32 groups (N, 128)."""
    rng = np.random.default_rng(seed)
    if len(groups) > max_groups:
        groups = groups[rng.choice(len(groups), max_groups, replace=False)]
    vals = np.ascontiguousarray(normalise_groups(groups))
    if len(vals) < patterns:
        raise ValueError(f"need at least {patterns} non-zero groups to calibrate, got {len(vals)}")
    k = levels - 2
    per_group = _group_kmeans(vals, k, 12)
    shared = _finish_levels(_kmeans(per_group, patterns, 25, rng)).astype(np.float64)
    for _ in range(refine):
        idx, _err = _assign(vals, shared)
        shared, _ = _update(vals, idx, shared)
        shared = _finish_levels(shared[:, 1:-1]).astype(np.float64)
    idx, _err = _assign(vals, shared)
    _, counts = _update(vals, idx, shared)
    lv = _finish_levels(shared[:, 1:-1])
    return VariantTables(lv, _codebooks(counts, codebooks))


def build_profile(groups: np.ndarray, variants: Sequence[str] = ("ecco4", "ecco3", "ecco2"),
                  shapes: dict[str, dict[str, int]] | None = None, seed: int = 0,
                  info: dict[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> Profile:
    """Learn a Profile with tables for each variant from float32 groups (N, 128)."""
    groups = np.asarray(groups, dtype=np.float32)
    if groups.ndim != 2 or groups.shape[1] != 128:
        raise ValueError(f"groups must have shape (N, 128), got {groups.shape}")
    if not np.all(np.isfinite(groups)):
        raise ValueError("calibration groups contain NaN or Inf")
    shp = {**DEFAULT_SHAPES, **(shapes or {})}
    out = {}
    for v in variants:
        if v not in shp:
            raise ValueError(f"unknown variant {v!r}; known: {sorted(shp)}")
        if progress:
            progress(v)
        s = shp[v]
        out[v] = build_variant(groups, s["levels"], s["patterns"], s["codebooks"], seed=seed)
    meta = dict(info or {})
    meta.update({"groups": int(len(groups)), "seed": seed,
                 "shapes": {v: shp[v] for v in variants}})
    return Profile(out, meta)
