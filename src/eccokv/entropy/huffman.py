"""Length-limited canonical Huffman codes over a small alphabet (<= 256 symbols).

Bit order is LSB-first: a code is written starting at the lowest free bit of the stream,
its first (most significant canonical) bit first. Decoding peeks `max_len` bits and looks
them up in a table of 2**max_len entries, each holding (symbol | length << shift), shift 4
for alphabets of <= 16 symbols (Ecco's levels) and 8 for larger ones (ecco-eb's codes).

Every symbol always gets a code (counts are floored at 1), so any symbol an encoder
produces can be coded, and a complete code means every table entry is a valid symbol:
arbitrary (corrupt) bits still decode to *some* in-range symbol.
"""

from __future__ import annotations

import heapq

import numpy as np


def huffman_lengths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """Optimal code lengths for `counts` under a maximum length (package-merge).

    counts: (n,) non-negative; zero counts are treated as 1 so every symbol is codable.
    Returns uint8 lengths (n,) with sum(2**-len) == 1 (a complete prefix code).
    """
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    n = c.size
    if n < 2:
        raise ValueError("need at least 2 symbols")
    if (1 << max_len) < n:
        raise ValueError(f"max_len {max_len} is too small for {n} symbols")
    # Package-merge (Larmore & Hirschberg): lengths = times each symbol is chosen.
    order = np.argsort(c, kind="stable")
    leaves = [(float(c[i]), (int(i),)) for i in order]
    packages = list(leaves)
    for _ in range(max_len - 1):
        paired = [
            (packages[k][0] + packages[k + 1][0], packages[k][1] + packages[k + 1][1])
            for k in range(0, len(packages) - 1, 2)
        ]
        packages = list(heapq.merge(leaves, paired, key=lambda t: t[0]))
    lengths = np.zeros(n, dtype=np.int64)
    for _, syms in packages[: 2 * n - 2]:
        for s in syms:
            lengths[s] += 1
    assert kraft_sum(lengths) == 1.0, "package-merge must give a complete code"
    return lengths.astype(np.uint8)


def kraft_sum(lengths: np.ndarray) -> float:
    return float(np.sum(np.ldexp(1.0, -np.asarray(lengths, dtype=np.int64))))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (MSB-first integers) for the given lengths, uint32 (n,)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = sorted(range(lengths.size), key=lambda s: (lengths[s], s))
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, prev = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def bit_reverse(v: int, n: int) -> int:
    r = 0
    for _ in range(n):
        r = (r << 1) | (v & 1)
        v >>= 1
    return r


def encode_table(lengths: np.ndarray) -> np.ndarray:
    """LSB-first codes: uint32 (n,) where bit 0 is the first bit written."""
    codes = canonical_codes(lengths)
    return np.array([bit_reverse(int(c), int(l)) for c, l in zip(codes, lengths, strict=True)],
                    dtype=np.uint32)


def _shift(n: int) -> int:
    if n > 256:
        raise ValueError(f"at most 256 symbols, got {n}")
    return 4 if n <= 16 else 8


def decode_table(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """uint16 table (2**max_len,): entry = symbol | (length << shift) for LSB-first peeks
    (shift 4 for <= 16 symbols, else 8)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if kraft_sum(lengths) != 1.0:
        raise ValueError("code lengths must form a complete prefix code")
    sh = _shift(lengths.size)
    rev = encode_table(lengths)
    table = np.zeros(1 << max_len, dtype=np.uint16)
    for s, (r, ln) in enumerate(zip(rev, lengths, strict=True)):
        step = 1 << int(ln)
        table[int(r) :: step] = s | (int(ln) << sh)
    return table


def code_length_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


# Multi-symbol decode entries (zstd's X2 idea): an L-bit peek yields up to MULTI_SYMS
# symbols. Entry (uint32) = s0 | s1 << 8 | s2 << 16 | n << 24 | nbits << 26: the symbols as
# bytes (so one unaligned 32-bit store writes them all), how many (1..3) and how many bits
# they take together (<= L <= 15).
MULTI_SYMS = 3


def multi_decode_table(lengths: np.ndarray, window: int) -> np.ndarray:
    """uint32 table (2**window,) of multi-symbol entries for LSB-first peeks: each entry
    holds the longest run of at most MULTI_SYMS whole codes that fits in `window` bits
    (at least one: window >= the longest code)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not int(lengths.max()) <= window <= 15:
        raise ValueError(f"window {window} must be in [longest code {int(lengths.max())}, 15]")
    single = decode_table(lengths, window).astype(np.int64)  # symbol | length << sh
    sh = _shift(lengths.size)
    idx = np.arange(1 << window, dtype=np.int64)
    sym = np.zeros((MULTI_SYMS, idx.size), np.int64)
    n = np.zeros(idx.size, np.int64)
    used = np.zeros(idx.size, np.int64)
    active = np.ones(idx.size, bool)
    mask = (1 << window) - 1
    for k in range(MULTI_SYMS):
        e = single[(idx >> used) & mask]
        ln = e >> sh
        ok = active & (used + ln <= window)
        sym[k] = np.where(ok, e & ((1 << sh) - 1), 0)
        n += ok
        used += np.where(ok, ln, 0)
        active = ok
    out = sym[0] | (sym[1] << 8) | (sym[2] << 16) | (n << 24) | (used << 26)
    return out.astype(np.uint32)
