"""`dir:///abs/path[?max_bytes=8G&fsync=0]`: entries as files in a local directory.

Layout: <path>/eccokv-v1/<2 hex>/<key hex>.ekv, temporaries in <path>/eccokv-v1/tmp/.

- Atomic, put-if-absent writes: bytes go to a temporary file, which is then hard-linked to
  its final name (fails if the name exists: the first writer wins, a file is never
  replaced) and unlinked. A process killed mid-write leaves only a temporary, never a
  partial entry; temporaries older than an hour are swept during eviction.
- Size limit with LRU eviction: a hit touches the file's mtime; when this process's
  running estimate of the total passes `max_bytes` (or every 64 writes) it rescans the
  folder and deletes the least recently used entries down to 90% of the limit. Several
  processes may evict at once (a vanished file is a miss, never an error).
- A disk error (full disk, permissions) on write is a skipped write with a warning.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eccokv.store.base import Store, StoreUnavailable

SUFFIX = ".ekv"
STALE_TMP_S = 3600.0
RESCAN_EVERY = 64


def parse_size(v: str) -> int:
    """"8G", "512M", "1048576" -> bytes."""
    s = v.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in "KMGT" else s
    try:
        n = int(float(num) * mult)
    except ValueError:
        raise ValueError(f"bad size {v!r} (use e.g. 8G, 512M or a byte count)") from None
    if n <= 0:
        raise ValueError(f"size must be > 0, got {v!r}")
    return n


class DirStore(Store):
    scheme = "dir"

    def __init__(self, url: str, path: str, max_bytes: int | None = 8 << 30,
                 fsync: bool = False, retry_s: float = 1.0) -> None:
        super().__init__(url, retry_s)
        if not os.path.isabs(path):
            raise ValueError(f"dir store path must be absolute (dir:///abs/path), got {path!r}")
        self.root = Path(path) / "eccokv-v1"
        self.tmp = self.root / "tmp"
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._approx: int | None = None
        self._since_scan = 0
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the dir store at {self.root}: {e}") from None

    def path(self, key: str) -> Path:
        return self.root / key[:2] / (key + SUFFIX)

    def _get(self, key: str) -> bytes | None:
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"reading {p}: {e}") from None
        try:
            os.utime(p)  # LRU: most recently used
        except OSError:
            pass
        return data

    def _put(self, key: str, data: bytes) -> bool:
        p = self.path(key)
        if p.exists():
            return False
        tmp = self.tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            p.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, p)
                landed = True
            except FileExistsError:
                landed = False
        except OSError as e:
            self._unlink(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self._evict(force=True)
            raise StoreUnavailable(f"writing {p}: {e}") from None
        self._unlink(tmp)
        if landed:
            self._account(len(data))
        return landed

    def _account(self, n: int) -> None:
        if self.max_bytes is None:
            return
        self._since_scan += 1
        if self._approx is None:
            self._approx = self._scan_total()
        else:
            self._approx += n
        if self._approx > self.max_bytes or self._since_scan >= RESCAN_EVERY:
            self._evict()

    def _scan(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or sub.name == "tmp":
                continue
            try:
                for e in os.scandir(sub):
                    if e.name.endswith(SUFFIX):
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        out.append((st.st_mtime, st.st_size, Path(e.path)))
            except FileNotFoundError:
                continue
        return out

    def _scan_total(self) -> int:
        return sum(s for _, s, _ in self._scan())

    def _evict(self, force: bool = False) -> None:
        """Delete least recently used entries down to 90% of max_bytes (force: also when
        under the limit, one tenth of the entries, to make room after a full disk)."""
        self._since_scan = 0
        files = sorted(self._scan())
        total = sum(s for _, s, _ in files)
        target = int(0.9 * self.max_bytes) if self.max_bytes else total
        if force:
            target = min(target, total - total // 10)
        for _, size, p in files:
            if total <= target:
                break
            self._unlink(p)
            total -= size
        self._approx = total
        now = time.time()
        try:
            for e in os.scandir(self.tmp):
                try:
                    if now - e.stat().st_mtime > STALE_TMP_S:
                        self._unlink(Path(e.path))
                except FileNotFoundError:
                    continue
        except FileNotFoundError:
            pass

    @staticmethod
    def _unlink(p: Path) -> bool:
        try:
            os.unlink(p)
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False

    def _exists(self, keys: list[str]) -> list[bool]:
        return [self.path(k).exists() for k in keys]

    def _delete_if(self, key: str, data: bytes) -> bool:
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                same = f.read() == data
                ino = os.fstat(f.fileno()).st_ino
            if same and os.stat(p).st_ino == ino:
                return self._unlink(p)
        except OSError:
            return False
        return False

    def _keys(self) -> Iterator[str]:
        for _, _, p in sorted(self._scan()):
            yield p.name[: -len(SUFFIX)]

    def _clear(self) -> int:
        n = 0
        for _, _, p in self._scan():
            n += self._unlink(p)
        self._approx = 0
        return n

    def _backend_stats(self) -> dict[str, Any]:
        files = self._scan()
        tmps = sum(1 for _ in os.scandir(self.tmp)) if self.tmp.exists() else 0
        return {"entries": len(files), "bytes": sum(s for _, s, _ in files),
                "max_bytes": self.max_bytes, "temporaries": tmps}
