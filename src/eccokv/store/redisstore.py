"""`redis://host:port/db[?timeout=2&part_bytes=4M&prefix=eccokv:&ttl=0]`: Redis or Valkey.

Through redis-py. An entry up to `part_bytes` is one string value under
`<prefix><key hex>`. A larger one is split: its parts go under
`<prefix><key hex>:<nonce>:<i>` (a random nonce per write, so two writers never touch
each other's parts), then a small manifest (b"ECKP", part count, length, blake2b digest,
nonce) goes under
the entry's key, last, with SET NX: a reader finds either a complete entry or none, and a
writer that loses the race deletes its parts. Writes of one `to_store` go in one
pipeline. Expiry and eviction are the server's (maxmemory-policy; `ttl` sets an expiry on
every key if given): an evicted part makes the entry a miss, and its manifest is deleted.
Connection refused / timeouts (`timeout` seconds) raise StoreUnavailable (see base).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from typing import Any

from eccokv.store.base import Store, StoreUnavailable

PART_MAGIC = b"ECKP"
_MANIFEST = struct.Struct("<4sIQ32s8s")  # magic, parts, length, blake2b, writer nonce
DEFAULT_PART = 4 << 20
MAX_PARTS = 1 << 16


def _errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class RedisStore(Store):
    scheme = "redis"

    def __init__(self, url: str, host: str, port: int, db: int, timeout: float = 2.0,
                 part_bytes: int = DEFAULT_PART, prefix: str = "eccokv:", ttl: int = 0,
                 retry_s: float = 1.0) -> None:
        super().__init__(url, retry_s)
        try:
            import redis
        except ImportError:
            raise ValueError("the redis store needs redis-py: pip install 'eccokv[store]'") \
                from None
        if part_bytes < 1024:
            raise ValueError(f"part_bytes must be >= 1024, got {part_bytes}")
        self.prefix = prefix
        self.part_bytes = int(part_bytes)
        self.ttl = int(ttl) or None
        self.r = redis.Redis(host=host, port=port, db=db, socket_timeout=timeout,
                             socket_connect_timeout=timeout)
        self._err = _errors()

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _run(self, fn: Any) -> Any:
        try:
            return fn()
        except self._err as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from None

    # -- reads --------------------------------------------------------------------------
    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        def go() -> list[bytes | None]:
            pipe = self.r.pipeline(transaction=False)
            for k in keys:
                pipe.get(self._k(k))
            vals = pipe.execute()
            out: list[bytes | None] = []
            for k, v in zip(keys, vals, strict=True):
                if v is not None and v[:4] == PART_MAGIC:
                    v = self._join(k, v)
                out.append(v)
                if v is None:
                    break
            return out

        return self._run(go)

    def _join(self, key: str, manifest: bytes) -> bytes | None:
        if len(manifest) != _MANIFEST.size:
            return manifest  # the entry parser rejects it (counted as corrupt)
        _, n, total, digest, nonce = _MANIFEST.unpack(manifest)
        if not 0 < n <= MAX_PARTS:
            return manifest
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            pipe.get(self._part(key, nonce, i))
        parts = pipe.execute()
        if any(p is None for p in parts):  # a part evicted/expired: the entry is gone
            self._delete_if(key, manifest)
            return None
        data = b"".join(parts)
        if len(data) != total or hashlib.blake2b(data, digest_size=32).digest() != digest:
            return manifest  # mismatch -> rejected as corrupt by the caller
        return data

    def _part(self, key: str, nonce: bytes, i: int) -> str:
        return f"{self._k(key)}:{nonce.hex()}:{i}"

    def _exists(self, keys: list[str]) -> list[bool]:
        def go() -> list[bool]:
            pipe = self.r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._k(k))
            return [bool(x) for x in pipe.execute()]

        return self._run(go)

    # -- writes -------------------------------------------------------------------------
    def _put_many(self, items: list[tuple[str, bytes]]) -> int:
        def go() -> int:
            pipe = self.r.pipeline(transaction=False)
            slots: list[tuple[int, str, bytes, int]] = []  # (result index, key, digest, n)
            pos = 0
            for key, data in items:
                if len(data) <= self.part_bytes:
                    pipe.set(self._k(key), data, nx=True, ex=self.ttl)
                    slots.append((pos, key, b"", 0))
                    pos += 1
                    continue
                digest = hashlib.blake2b(data, digest_size=32).digest()
                nonce = os.urandom(8)  # this write's parts: a losing writer deletes only its own
                n = -(-len(data) // self.part_bytes)
                for i in range(n):
                    pipe.set(self._part(key, nonce, i),
                             data[i * self.part_bytes:(i + 1) * self.part_bytes], ex=self.ttl)
                pipe.set(self._k(key), _MANIFEST.pack(PART_MAGIC, n, len(data), digest, nonce),
                         nx=True, ex=self.ttl)
                pos += n
                slots.append((pos, key, nonce, n))
                pos += 1
            res = pipe.execute()
            landed = 0
            losers = []
            for idx, key, nonce, n in slots:
                if res[idx]:
                    landed += 1
                elif n:
                    losers += [self._part(key, nonce, i) for i in range(n)]
            if losers:
                self.r.delete(*losers)
            return landed

        return self._run(go)

    def _delete_if(self, key: str, data: bytes) -> bool:
        import redis

        name = self._k(key)

        def go() -> bool:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(name)
                    cur = pipe.get(name)
                    same = cur == data or (cur is not None and cur[:4] == PART_MAGIC)
                    if not same:
                        pipe.unwatch()
                        return False
                    parts = []
                    if cur[:4] == PART_MAGIC and len(cur) == _MANIFEST.size:
                        _, n, _, _, nonce = _MANIFEST.unpack(cur)
                        parts = [self._part(key, nonce, i) for i in range(min(n, MAX_PARTS))]
                    pipe.multi()
                    pipe.delete(name, *parts)
                    pipe.execute()
                    return True
                except redis.exceptions.WatchError:
                    return False

        return self._run(go)

    # -- listing ------------------------------------------------------------------------
    def _scan(self) -> Iterator[str]:
        for k in self.r.scan_iter(match=self.prefix + "*", count=1000):
            yield k.decode() if isinstance(k, bytes) else k

    def _keys(self) -> Iterator[str]:
        n = len(self.prefix)
        for k in list(self._run(lambda: list(self._scan()))):
            if ":" not in k[n:]:
                yield k[n:]

    def _clear(self) -> int:
        def go() -> int:
            names = list(self._scan())
            for i in range(0, len(names), 1000):
                self.r.unlink(*names[i:i + 1000])
            return sum(1 for k in names if ":" not in k[len(self.prefix):])

        return self._run(go)

    def _backend_stats(self) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            names = list(self._scan())
            pipe = self.r.pipeline(transaction=False)
            for k in names:
                pipe.strlen(k)
            sizes = pipe.execute() if names else []
            entries = sum(1 for k in names if ":" not in k[len(self.prefix):])
            mem = self.r.info("memory")
            return {"entries": entries, "keys": len(names), "bytes": int(sum(sizes)),
                    "server_used_memory": mem.get("used_memory"),
                    "maxmemory_policy": mem.get("maxmemory_policy")}

        return self._run(go)

    def close(self) -> None:
        try:
            self.r.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass
