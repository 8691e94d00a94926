"""A prefix store for compressed KV caches: `eccokv.store.open(url)`.

    store = eccokv.store.open("dir:///var/cache/eccokv")     # or "redis://host:6379/0"
    cache = EccoCache.from_store(store, model, input_ids)     # longest stored prefix
    out = model.generate(input_ids, past_key_values=cache)    # computes only the rest
    cache.to_store(store)                                     # stores the new full chunks
    store.stats()   # {"hits", "misses", "corrupt", "errors", "bytes", "entries", ...}

URLs: `dir:///abs/path?max_bytes=8G&fsync=0` (`eccokv.store.dirstore`) and
`redis://host:port/db?timeout=2&part_bytes=4M&prefix=eccokv:&ttl=0`
(`eccokv.store.redisstore`); both take `retry=` (seconds to skip a store that was down).
Entry format: `eccokv.store.entry` (`decode_entry`); keying and chunking:
`eccokv.store.prefix`; design and measurements: docs/store.md.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from eccokv.store.base import Store, StoreUnavailable
from eccokv.store.entry import EntryError, decode_entry

__all__ = ["EntryError", "Store", "StoreUnavailable", "decode_entry", "generate", "open"]

_DIR_OPTS = {"max_bytes", "fsync", "retry"}
_REDIS_OPTS = {"timeout", "part_bytes", "prefix", "ttl", "retry"}


def open(url: str) -> Store:  # noqa: A001 - the public name the issue asks for
    """A store from its URL (see the module docstring); bad URLs raise ValueError."""
    from eccokv.store.dirstore import parse_size

    if not isinstance(url, str):
        raise TypeError(f"store url must be a string, got {type(url).__name__}")
    u = urlparse(url)
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    retry = float(q.get("retry", 1.0))
    if u.scheme == "dir":
        bad = set(q) - _DIR_OPTS
        if bad:
            raise ValueError(f"unknown dir store options {sorted(bad)}; known: "
                             f"{sorted(_DIR_OPTS)}")
        if u.netloc:
            raise ValueError(f"dir store url must be dir:///abs/path (three slashes), got "
                             f"{url!r}")
        from eccokv.store.dirstore import DirStore

        mb = q.get("max_bytes", "8G")
        return DirStore(url, unquote(u.path),
                        max_bytes=None if mb in ("0", "none", "") else parse_size(mb),
                        fsync=q.get("fsync", "0") in ("1", "true", "yes"), retry_s=retry)
    if u.scheme in ("redis", "valkey"):
        bad = set(q) - _REDIS_OPTS
        if bad:
            raise ValueError(f"unknown redis store options {sorted(bad)}; known: "
                             f"{sorted(_REDIS_OPTS)}")
        path = u.path.strip("/") or "0"
        if not path.isdigit():
            raise ValueError(f"redis url database must be a number (redis://host:port/db), "
                             f"got {u.path!r}")
        from eccokv.store.redisstore import DEFAULT_PART, RedisStore

        return RedisStore(url, u.hostname or "127.0.0.1", u.port or 6379, int(path),
                          timeout=float(q.get("timeout", 2.0)),
                          part_bytes=parse_size(q["part_bytes"]) if "part_bytes" in q
                          else DEFAULT_PART,
                          prefix=q.get("prefix", "eccokv:"), ttl=int(q.get("ttl", 0)),
                          retry_s=retry)
    raise ValueError(f"unknown store url {url!r}: use dir:///abs/path or "
                     "redis://host:port/db")


def generate(model: Any, input_ids: Any, store: Store | None, cache_kwargs: dict | None = None,
             chunk_tokens: int | None = None, **generate_kwargs: Any) -> tuple[Any, Any]:
    """Generate with a prefix store; returns (generate's output, cache).

    The longest stored prefix is loaded (`EccoCache.from_store`), the prompt's other full
    chunks are computed one chunk per forward (`prefix.fill_chunks`) and stored at once,
    then `model.generate` computes the rest. Loaded or computed, each chunk is the same
    bits, so the output does not depend on what the store held: a store that is down,
    empty, partly written or full of corrupt entries gives exactly the output of
    `generate(model, input_ids, None)`."""
    import torch

    from eccokv.hf.cache import EccoCache
    from eccokv.store.prefix import fill_chunks

    cache = EccoCache.from_store(store, model, input_ids, chunk_tokens=chunk_tokens,
                                 **(cache_kwargs or {}))
    if fill_chunks(cache, model, input_ids, chunk_tokens) and store is not None:
        cache.to_store(store)
    with torch.no_grad():
        out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    return out, cache
