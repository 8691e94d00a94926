"""Length-limited canonical Huffman codes over a small alphabet (<= 16 symbols).

Bit order is LSB-first: a code is written starting at the lowest free bit of the stream,
its first (most significant canonical) bit first. Decoding peeks `max_len` bits and looks
them up in a table of 2**max_len entries, each holding (symbol | length << 4).

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


def decode_table(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """uint16 table (2**max_len,): entry = symbol | (length << 4) for LSB-first peeks."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if kraft_sum(lengths) != 1.0:
        raise ValueError("code lengths must form a complete prefix code")
    rev = encode_table(lengths)
    table = np.zeros(1 << max_len, dtype=np.uint16)
    for s, (r, ln) in enumerate(zip(rev, lengths, strict=True)):
        step = 1 << int(ln)
        table[int(r) :: step] = s | (int(ln) << 4)
    return table


def code_length_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))
