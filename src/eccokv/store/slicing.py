"""Token slices of a cache chunk's `Compressed`, bit-exact, without re-encoding.

`slice_tokens(c, head_dim, a, b)` returns the part of an EccoCache chunk (a `Compressed`
of shape [H, n, D] or, for channel groups that do not divide head_dim, [H, n * D]) that
covers tokens [a, b), with the parent's per-tensor parameters (Ecco's tscale, fp8's scale,
int's scale dtype) kept: decoding the slice gives exactly the parent's decoded values for
those tokens. The store cuts the cache's chunks into fixed-size entries this way, so a
warm prefix is the stored cache cropped, bit for bit (docs/store.md).

a and b must fall on group boundaries along the codec axis (the store checks its chunk size
is a multiple of every layer's compression step, which guarantees it).
"""

from __future__ import annotations

import numpy as np

from eccokv.codecs.base import CodecError, Compressed, Layout

SLICEABLE = ("ecco", "int", "fp8", "none")


def _group(c: Compressed) -> int:
    cid = c.codec_config.get("id")
    if cid == "ecco":
        return 128
    if cid == "int":
        return int(c.codec_config["group_size"])
    return 1


def _token_view(c: Compressed, head_dim: int) -> tuple[int, int, int, int]:
    """(H, n tokens, values per token along the token dim, axis kind) of a chunk."""
    if len(c.shape) == 3:
        H, n, D = c.shape
        return H, n, D, c.axis
    if len(c.shape) == 2 and c.axis == 1 and head_dim > 0 and c.shape[1] % head_dim == 0:
        return c.shape[0], c.shape[1] // head_dim, head_dim, 3  # token-major [H, n * D]
    raise CodecError(f"cannot slice a chunk of shape {c.shape} axis {c.axis} into tokens")


def slice_tokens(c: Compressed, head_dim: int, a: int, b: int) -> Compressed:
    """Tokens [a, b) of chunk `c` as a new Compressed (arrays copied, meta kept)."""
    cid = c.codec_config.get("id")
    if cid not in SLICEABLE:
        raise CodecError(f"the store cannot cut chunks of codec {cid!r} (it can: "
                         f"{', '.join(SLICEABLE)})")
    H, n, D, kind = _token_view(c, head_dim)
    if not 0 <= a < b <= n:
        raise ValueError(f"token slice [{a}, {b}) is outside the chunk's {n} tokens")
    if a == 0 and b == n:
        return c
    G = _group(c)
    m = b - a
    if kind == 1:  # [H, n, D] grouped over tokens
        shape, lay = (H, m, D), Layout(c.shape, 1, G)
        g0, g1 = a, b
    elif kind == 2:  # [H, n, D] grouped over channels
        shape, lay = (H, m, D), Layout(c.shape, 2, G)
        g0 = g1 = 0
    else:  # [H, n * D] token-major, grouped over channels running on across tokens
        shape, lay = (H, m * D), Layout(c.shape, 1, G)
        g0, g1 = a * D, b * D
    if kind != 2 and (g0 % G or (g1 % G and g1 != lay.length)):
        raise ValueError(f"token slice [{a}, {b}) does not fall on {cid} group boundaries "
                         f"({G} values)")
    arrays: dict[str, np.ndarray] = {}
    for name, arr in c.arrays.items():
        arrays[name] = _slice_array(cid, name, arr, c, lay, kind, a, b, g0, g1, H, n, D)
    return Compressed(dict(c.codec_config), shape, c.dtype, c.axis, arrays, dict(c.meta))


def _blocks(arr: np.ndarray, lay: Layout, kind: int, a: int, b: int, g0: int, g1: int,
            H: int, n: int, words: int) -> np.ndarray:
    """Per-block array (nblocks * words, block b = row * ngroups + group) sliced."""
    if kind == 2:  # rows (h, t), groups over D
        x = arr.reshape(H, n, lay.ngroups, words)[:, a:b]
    else:
        G = lay.group_size
        x = arr.reshape(lay.prefix, lay.suffix, lay.ngroups, words)[:, :, g0 // G:-(-g1 // G)]
    return np.ascontiguousarray(x).reshape(-1)


def _slice_array(cid: str, name: str, arr: np.ndarray, c: Compressed, lay: Layout, kind: int,
                 a: int, b: int, g0: int, g1: int, H: int, n: int, D: int) -> np.ndarray:
    if cid == "ecco":
        if name == "blocks":
            words = (arr.size - 1) // max(1, lay.nblocks)
            body = _blocks(arr[:-1], lay, kind, a, b, g0, g1, H, n, words)
            return np.concatenate([body, arr[-1:]])  # the trailing guard word
        return arr.copy()  # tscale, embedded profile tables: per tensor
    if cid == "int":
        if name in ("scale", "zero"):
            return _blocks(arr, lay, kind, a, b, g0, g1, H, n, 1)
        from eccokv.codecs.intq import pack_codes, unpack_codes

        bits = int(c.codec_config["bits"])
        codes = unpack_codes(arr, lay.rows * lay.length, bits)
        if kind == 2:  # rows (h, t), values along D
            sub = codes.reshape(H, n, D)[:, a:b]
        else:  # rows (p, s), values along the axis
            sub = codes.reshape(lay.prefix, lay.suffix, lay.length)[:, :, g0:g1]
        return pack_codes(np.ascontiguousarray(sub), bits)
    # fp8 codes / none raw: C order over the tensor's own shape
    if (cid, name) == ("fp8", "scale"):
        return arr.copy()
    per = arr.size // max(1, c.numel)  # bytes per value (none: dtype itemsize)
    x = arr.reshape(H, n, D * per)[:, a:b]
    return np.ascontiguousarray(x).reshape(-1)
