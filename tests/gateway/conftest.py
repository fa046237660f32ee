"""Gateway fixtures: a real Redis server from the Debian package (spec §4), never a mock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .redisharness import RedisServer, redis_server_bin


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` for the session; tests call ``flush()`` (or use a flushing fixture) to
    start from an empty store. A missing binary fails rather than skips, so the shared-quota tests
    cannot silently drop out of a run."""
    binary = redis_server_bin()
    if binary is None:
        pytest.fail("redis-server not found: `make sysdeps` installs it (Debian package redis-server)")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
