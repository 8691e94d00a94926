"""Shared or per-stream codebooks for ecco-eb (issue 8: "decide by measured rate, with
every byte counted"), and where the bits of a chunk go.

On real SmolLM2 K and V (one Wikipedia window of 1024 tokens, every third layer, grouped
over tokens as the cache does, at target_bits 3.0) it counts, for the Huffman blocks'
symbols: the bits with the 14 shared codebooks (each block picks its cheapest, 4 bits of
choice counted in the header), the bits with one codebook built from the tensor's own
histogram (KVComp's per-stream codebook) plus the 64 code lengths it must store (4 bits
each), and the per-block empirical entropy (a lower bound for any per-block code); then
the header and index bits of the whole chunk. Escapes' raw bits are the same under every
choice and are left out of the code columns.

Run: `python benchmarks/eb_codebooks.py`; prints one JSON line (bits per value).
"""

from __future__ import annotations

import json

import numpy as np

import eccokv  # noqa: F401  (runtime settings before torch)
from eccokv import codecs as C
from eccokv import models, provenance
from eccokv.codecs.base import Layout, to_rows
from eccokv.codecs.ecco_eb import _kernel_tables, codebooks
from eccokv.data import token_windows
from eccokv.entropy.huffman import huffman_lengths
from eccokv.hf.capture import capture_kv
from eccokv.kernels.eb_core import ESC, LEN_BITS, NCODEBOOKS, W_BITS


def main() -> int:
    model, tok = models.load("smollm2")
    kv = capture_kv(model, token_windows(tok, "wiki", window=1024, n=1, seed=0))
    lens = codebooks()[0]
    sbase = _kernel_tables()[0]
    codec = C.get("eb3")
    tot = dict.fromkeys(("shared", "per_tensor", "entropy", "headers", "index", "all"), 0.0)
    n = 0
    for layer in range(0, len(kv), 3):
        for x in kv[layer]:
            x = x[0]
            lay = Layout(tuple(x.shape), 1, 128)
            g = to_rows(x, lay)
            _, _, _, amax = codec._stats(g, lay)
            _, plan = codec._search(g, lay, amax, x.dtype, np.zeros(lay.nblocks, np.uint8),
                                    lay.numel)
            A = (plan["d0"] * sbase[plan["k"]]).astype(np.float32)
            huff = plan["cb"] < NCODEBOOKS
            e = np.rint(g.astype(np.float64) / A[:, None]).astype(np.int64) - plan["z"][:, None]
            sym = np.where((e > 31) | (e < -31), ESC, np.where(e >= 0, 2 * e, -2 * e - 1))[huff]
            hist = np.stack([np.bincount(s, minlength=64) for s in sym])
            tot["shared"] += float((hist * lens[plan["cb"][huff]]).sum())
            own = huffman_lengths(np.maximum(hist.sum(0), 1), 10).astype(np.int64)
            tot["per_tensor"] += float((hist * own).sum()) + 64 * 4
            p = hist / hist.sum(1, keepdims=True)
            tot["entropy"] += float(-(hist * np.log2(np.where(p > 0, p, 1.0))).sum())
            tot["headers"] += float(huff.sum() * (LEN_BITS + 4 + W_BITS + plan["ZB"]
                                                  + plan["KB"]) + (~huff).sum() * 17)
            tot["index"] += 32.0 * (-(-lay.nblocks // 8) + 1)
            tot["all"] += 8.0 * codec.encode(x, axis=1).payload_nbytes
            n += x.numel()
    out = {k: round(v / n, 4) for k, v in tot.items()}
    out["source_digest"] = provenance.source_digest()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
