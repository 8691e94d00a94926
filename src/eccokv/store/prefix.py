"""Prefix caching on a store: `lookup` (EccoCache.from_store) and `write` (cache.to_store).

Chunking: with s exact sink tokens and C chunk tokens (`chunk_tokens`, default 256, a
multiple of every layer's compression step), entry j covers the compressed tokens
[s + j*C, s + (j+1)*C); entry 0 also holds the sink and its ids. Keys chain like vLLM's
block hashes: key_0 = blake2b(version, model fingerprint, settings hash, ids[:s + C]),
key_j = blake2b(key_{j-1}, ids of chunk j), so a key names the whole prefix up to it.

Entries hold whole compressed chunks only, never the exact window: a warm prefix is
always the stored cache cropped at a chunk boundary inside its compressed part (so the
crop has no window either: same structure, the same bits), the bytes per token stay at the
codec's rate (a 16-bit window would add far more than it saves), and an entry does not
depend on where the storing run's window happened to be. The last R..R+G-1 tokens of a
prompt are recomputed by the next run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from eccokv.codecs.base import SUPPORTED_DTYPES, Compressed
from eccokv.store.entry import EntryError, Expect, decode_entry, encode_entry
from eccokv.store.slicing import slice_tokens

DEFAULT_CHUNK = 256
KEY_VERSION = b"eccokv-prefix-v1\0"


def _ids_list(ids: Any) -> list[int]:
    t = torch.as_tensor(ids)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(f"the prefix store takes one sequence (input_ids [1, T]), got "
                             f"batch {t.shape[0]}")
        t = t[0]
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must be integer token ids [1, T], got "
                         f"{tuple(t.shape)} {t.dtype}")
    return [int(x) for x in t.tolist()]


def _key(prev: bytes, ids: list[int]) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.digest()


def chain_keys(root: bytes, ids: list[int], sink: int, C: int, n: int) -> list[str]:
    """Hex keys of the first n chunks of `ids`."""
    keys, prev = [], root
    for j in range(n):
        lo = 0 if j == 0 else sink + j * C
        prev = _key(prev, ids[lo:sink + (j + 1) * C])
        keys.append(prev.hex())
    return keys


class _Plan:
    """Everything a lookup/write must agree on, from a cache and the model config."""

    def __init__(self, cache: Any, config: Any, dtype: torch.dtype, C: int | None) -> None:
        from eccokv.hf.cache import DEFAULT_EXACT_DTYPE, EccoLayer
        from eccokv.hf.persist import kv_shape, model_fingerprint

        bad = [i for i, layer in enumerate(cache.layers) if not isinstance(layer, EccoLayer)]
        if bad:
            raise ValueError(f"the prefix store needs every layer compressed by EccoCache; "
                             f"layers {bad[:8]} are not (sliding-window layers: use "
                             "sliding='compress')")
        self.C = DEFAULT_CHUNK if C is None else C
        if not isinstance(self.C, int) or isinstance(self.C, bool) or self.C <= 0:
            raise ValueError(f"chunk_tokens must be an int > 0, got {C!r}")
        self.kv, self.hd = kv_shape(config)
        for i, layer in enumerate(cache.layers):
            g = torch.lcm(torch.tensor(layer.spec.key.token_granularity(self.hd)),
                          torch.tensor(layer.spec.value.token_granularity(self.hd))).item()
            if self.C % g:
                raise ValueError(f"chunk_tokens {self.C} is not a multiple of layer {i}'s "
                                 f"compression step ({g} tokens)")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"model dtype {dtype} is not float32/float16/bfloat16")
        first = cache.layers[0]
        exact = first.exact_dtype or (dtype if dtype != torch.float32 else DEFAULT_EXACT_DTYPE)
        self.dtype, self.exact = SUPPORTED_DTYPES[dtype], SUPPORTED_DTYPES[exact]
        self.sink = cache.sink_tokens
        self.codecs = [(layer.spec.key.codec, layer.spec.value.codec) for layer in cache.layers]
        settings = {"layers": [[layer.spec.key.describe(), layer.spec.value.describe()]
                               for layer in cache.layers],
                    "sink": self.sink, "exact": self.exact, "dtype": self.dtype, "C": self.C}
        self.settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()
                                            ).hexdigest()[:32]
        self.fingerprint = model_fingerprint(config)
        self.root = hashlib.blake2b(KEY_VERSION + self.fingerprint.encode()
                                    + self.settings_hash.encode(), digest_size=16).digest()

    def header(self, key: str, parent: str, j: int) -> dict[str, Any]:
        return {"key": key, "parent": parent, "index": j, "fingerprint": self.fingerprint,
                "settings_hash": self.settings_hash, "dtype": self.dtype,
                "exact_dtype": self.exact, "sink": self.sink, "chunk_tokens": self.C}

    def expect(self, j: int, parent: str, ids: list[int]) -> Expect:
        return Expect(self.fingerprint, self.settings_hash, j, parent, ids, self.codecs,
                      self.kv, self.hd, self.dtype, self.exact, self.sink, self.C)

    def chunk_ids(self, ids: list[int], j: int) -> list[int]:
        lo = 0 if j == 0 else self.sink + j * self.C
        return ids[lo:self.sink + (j + 1) * self.C]


def _model_dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return getattr(model, "dtype", torch.float32)


def lookup(store: Any, model: Any, input_ids: Any, chunk_tokens: int | None = None,
           **cache_kwargs: Any) -> Any:
    """A new EccoCache(model.config, **cache_kwargs) holding the longest stored prefix of
    input_ids (at least one token is left to compute); a store that is down, or an entry
    that fails validation, ends the prefix there (never an error)."""
    from eccokv.hf.cache import EccoCache
    from eccokv.hf.persist import init_layer, restore_stream

    ids = _ids_list(input_ids)
    cache = EccoCache(model.config, **cache_kwargs)
    cache.token_ids = torch.tensor([ids], dtype=torch.int64)
    plan = _Plan(cache, model.config, _model_dtype(model), chunk_tokens)
    n = max(0, (len(ids) - 1 - plan.sink) // plan.C)
    if n == 0 or store is None:
        return cache
    keys = chain_keys(plan.root, ids, plan.sink, plan.C, n)
    datas = store.get_many(keys)
    entries = []
    parent = ""
    for j, key in enumerate(keys):
        data = datas[j] if j < len(datas) else None
        if data is None:
            if store.available:
                store.miss()
            break
        try:
            entries.append(decode_entry(data, key=key,
                                        expect=plan.expect(j, parent, plan.chunk_ids(ids, j))))
        except EntryError as e:
            store.corrupt(key, data, str(e))
            break
        store.hit()
        parent = key
    if entries:
        _rebuild(cache, entries, plan, init_layer, restore_stream)
    return cache


def _rebuild(cache: Any, entries: list[Any], plan: _Plan, init_layer: Any,
             restore_stream: Any) -> None:
    dtype = {v: k for k, v in SUPPORTED_DTYPES.items()}[plan.dtype]
    exact = {v: k for k, v in SUPPORTED_DTYPES.items()}[plan.exact]
    n = plan.sink + len(entries) * plan.C
    for i, layer in enumerate(cache.layers):
        init_layer(layer, dtype, plan.kv, plan.hd, 1)
        for si, s in enumerate((layer.k, layer.v)):
            if plan.sink:
                held = entries[0].sinks[i][si]
            else:
                held = torch.empty((1, plan.kv, 0, plan.hd), dtype=exact)
            chunks = [[c] for e in entries for c in e.pieces[i][si]]
            valid = [_tokens(c, plan.hd) for e in entries for c in e.pieces[i][si]]
            restore_stream(s, held, plan.sink, chunks, valid)
        layer.seq = n
        layer.keys, layer.values = layer.k.held, layer.v.held


def _tokens(c: Compressed, hd: int) -> int:
    return c.shape[1] if len(c.shape) == 3 else c.shape[1] // hd


def _pieces(stream: Any, a: int, b: int, hd: int) -> list[Compressed]:
    """Slices of the stream's chunks covering compressed tokens [a, b)."""
    out, o = [], 0
    for chunk, v in zip(stream.chunks, stream.valid, strict=True):
        lo, hi = max(a, o), min(b, o + v)
        if lo < hi:
            out.append(slice_tokens(chunk[0], hd, lo - o, hi - o))
        o += v
        if o >= b:
            break
    return out


def write(cache: Any, store: Any, token_ids: Any = None, chunk_tokens: int | None = None) -> int:
    """Store the cache's full compressed chunks not yet stored; returns how many entries
    landed (0 when the store is down). token_ids: the tokens the cache was built from
    (default: the ids `from_store`/`load` recorded)."""
    ids_src = token_ids if token_ids is not None else getattr(cache, "token_ids", None)
    if ids_src is None:
        raise ValueError("to_store needs the token ids the cache was built from: pass "
                         "token_ids=, or build the cache with EccoCache.from_store")
    ids = _ids_list(ids_src)
    cfg = cache.layers[0].attn_config if cache.layers else None
    if cfg is None:
        raise ValueError("to_store: the cache has no layers")
    first = cache.layers[0]
    if not first.is_initialized:
        return 0
    plan = _Plan(cache, cfg, first.dtype, chunk_tokens)
    if first.k.held is not None and first.k.held.shape[0] != 1:
        raise ValueError(f"the prefix store takes one sequence, the cache holds batch "
                         f"{first.k.held.shape[0]}")
    usable = min(min(layer.k.compressed_len, layer.v.compressed_len) for layer in cache.layers)
    if any(layer.k.sink_len != plan.sink or layer.v.sink_len != plan.sink
           for layer in cache.layers):
        return 0
    n = min(usable, len(ids) - plan.sink) // plan.C
    if n <= 0:
        return 0
    keys = chain_keys(plan.root, ids, plan.sink, plan.C, n)
    present = store.exists(keys)
    if present is None:
        return 0
    items = []
    parent = ""
    for j, key in enumerate(keys):
        if not present[j]:
            a, b = j * plan.C, (j + 1) * plan.C
            layers = [(_pieces(layer.k, a, b, plan.hd), _pieces(layer.v, a, b, plan.hd))
                      for layer in cache.layers]
            sinks = None
            if j == 0 and plan.sink:
                sinks = [(layer.k.sink.contiguous(), layer.v.sink.contiguous())
                         for layer in cache.layers]
            items.append((key, encode_entry(plan.header(key, parent, j), plan.chunk_ids(ids, j),
                                            layers, sinks)))
        parent = key
    if not items:
        return 0
    return store.put_many(items)


def fill_chunks(cache: Any, model: Any, input_ids: Any, chunk_tokens: int | None = None) -> int:
    """Compute the full chunks of input_ids [1, T] that `cache` (from `lookup`) lacks, one
    forward per chunk, each chunk compressed whole on its own (no exact window at chunk
    boundaries). The cache then depends only on the tokens, not on which chunks came from
    the store: computed or loaded, chunk j is the same bits. Returns the chunks computed."""
    ids = _ids_list(input_ids)
    plan = _Plan(cache, model.config, _model_dtype(model), chunk_tokens)
    have = cache.get_seq_length()
    if have and ((have - plan.sink) % plan.C or any(
            layer.k.exact_len or layer.v.exact_len for layer in cache.layers)):
        raise ValueError(f"fill_chunks needs a cache at a chunk boundary with no exact window "
                         f"(from EccoCache.from_store); this one holds {have} tokens")
    j0 = 0 if have == 0 else (have - plan.sink) // plan.C
    k = max(0, (len(ids) - 1 - plan.sink) // plan.C)
    if j0 >= k:
        return 0
    t = torch.tensor([ids], dtype=torch.int64)
    saved = [(layer.k.residual, layer.v.residual) for layer in cache.layers]
    try:
        for layer in cache.layers:
            layer.k.residual = layer.v.residual = 0
        with torch.no_grad():
            for j in range(j0, k):
                lo = 0 if j == 0 else plan.sink + j * plan.C
                model(t[:, lo:plan.sink + (j + 1) * plan.C], past_key_values=cache,
                      use_cache=True)
    finally:
        for layer, (rk, rv) in zip(cache.layers, saved, strict=True):
            layer.k.residual, layer.v.residual = rk, rv
    return k - j0
