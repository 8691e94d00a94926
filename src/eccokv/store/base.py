"""The store interface every backend implements, with its counters and outage handling.

A backend moves opaque bytes under hex keys (`_get`, `_put`, `_exists`, `_delete_if`,
`_keys`, `_clear`, `_backend_stats`). This class adds: counters (`stats()`), "store down"
handling (a connection refused or timing out raises `StoreUnavailable` inside; the public
methods turn it into a miss / a skipped write, warn once per outage, and skip the store for
`retry_s` seconds), and corrupt-entry handling (counted, logged once per key, deleted when
the stored bytes are still the ones read).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("eccokv.store")


class StoreUnavailable(OSError):
    """The backend cannot be reached (refused, timed out, disk error)."""


class Store:
    """Base class; see the module docstring. `url` names the backend."""

    scheme = ""

    def __init__(self, url: str, retry_s: float = 1.0) -> None:
        self.url = url
        self.retry_s = float(retry_s)
        self._down_until = 0.0
        self._warned = False
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "misses": 0, "corrupt": 0, "errors": 0, "puts": 0,
                         "put_skipped": 0, "bytes_read": 0, "bytes_written": 0, "deleted": 0}

    # -- backend hooks ------------------------------------------------------------------
    def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in keys:
            v = self._get(k)
            out.append(v)
            if v is None:
                break
        return out

    def _put(self, key: str, data: bytes) -> bool:
        raise NotImplementedError

    def _put_many(self, items: list[tuple[str, bytes]]) -> int:
        return sum(bool(self._put(k, d)) for k, d in items)

    def _exists(self, keys: list[str]) -> list[bool]:
        raise NotImplementedError

    def _delete_if(self, key: str, data: bytes) -> bool:
        raise NotImplementedError

    def _keys(self) -> Iterator[str]:
        raise NotImplementedError

    def _clear(self) -> int:
        raise NotImplementedError

    def _backend_stats(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- outage handling ----------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, default: Any = None) -> Any:
        if time.monotonic() < self._down_until:
            return default
        try:
            out = fn(*args)
        except StoreUnavailable as e:
            with self._lock:
                self.counters["errors"] += 1
                self._down_until = time.monotonic() + self.retry_s
                first = not self._warned
                self._warned = True
            if first:
                warnings.warn(f"eccokv store {self.url} is unavailable ({what}: {e}); "
                              "computing without it", RuntimeWarning, stacklevel=4)
            log.warning("store %s unavailable during %s: %s", self.url, what, e)
            return default
        self._warned = False
        return out

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    # -- public -------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Bytes stored under each key, in order, possibly stopping after the first miss
        (or [] when the store is down)."""
        out = self._call("get", self._get_many, list(keys), default=[])
        with self._lock:
            self.counters["bytes_read"] += sum(len(v) for v in out if v)
        return out

    def get(self, key: str) -> bytes | None:
        got = self.get_many([key])
        return got[0] if got else None

    def exists(self, keys: Iterable[str]) -> list[bool] | None:
        """Which keys are stored (None when the store is down)."""
        return self._call("exists", self._exists, list(keys), default=None)

    def put_many(self, items: list[tuple[str, bytes]]) -> int:
        """Store each (key, bytes) unless the key is present; returns how many landed."""
        n = self._call("put", self._put_many, items, default=0)
        with self._lock:
            self.counters["puts"] += n
            self.counters["put_skipped"] += len(items) - n
            self.counters["bytes_written"] += sum(len(d) for _, d in items) if n else 0
        return n

    def put(self, key: str, data: bytes) -> bool:
        return self.put_many([(key, data)]) == 1

    def hit(self) -> None:
        with self._lock:
            self.counters["hits"] += 1

    def miss(self) -> None:
        with self._lock:
            self.counters["misses"] += 1

    def corrupt(self, key: str, data: bytes, reason: str) -> None:
        """Count a rejected entry, log it once, delete it if it is still the bytes read."""
        with self._lock:
            self.counters["corrupt"] += 1
            first = key not in self._logged
            self._logged.add(key)
        if first:
            log.warning("store %s: entry %s rejected (%s); treated as a miss", self.url,
                        key[:16], reason)
        if self._call("delete", self._delete_if, key, data, default=False):
            with self._lock:
                self.counters["deleted"] += 1

    def keys(self) -> Iterator[str]:
        """Every entry key (hex) in the backend."""
        return self._keys()

    def clear(self) -> int:
        """Delete every eccokv entry of this store; returns how many."""
        return self._clear()

    def stats(self) -> dict[str, Any]:
        """Counters of this process (hits, misses, corrupt, errors, puts, bytes read and
        written) and the backend's totals (entries, bytes stored)."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        back = self._call("stats", self._backend_stats, default=None)
        out.update(back if back is not None else {"entries": None, "bytes": None})
        out["url"] = self.url
        out["available"] = back is not None
        return out

    def verify(self, delete: bool = False) -> dict[str, Any]:
        """Parse and decode every entry; {"entries", "ok", "bad": [(key, reason)]}."""
        from eccokv.store.entry import EntryError, decode_entry

        ok, bad = 0, []
        for k in list(self._keys()):
            got = self._get_many([k])
            data = got[0] if got else None
            if data is None:
                continue
            try:
                decode_entry(data, key=k)
                ok += 1
            except EntryError as e:
                bad.append((k, str(e)))
                if delete:
                    self._delete_if(k, data)
        return {"entries": ok + len(bad), "ok": ok, "bad": bad}

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
