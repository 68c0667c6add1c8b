"""chat/ops/store.py: one choice of memory or Redis, one client per event loop, one key rule."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chat.accounts import counters
from chat.edge import connection_limits
from chat.ops import store
from chat.sessions import framelog


@pytest.fixture
def prefixed(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "x", "CONFIG": {"prefix": "blue"}}}
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"  # never connected to: clients connect at their first command
    yield settings
    store.forget()


def test_every_key_starts_with_the_channel_prefix(prefixed):
    """Two deployments sharing a Redis (R2D2_CHANNEL_PREFIX) never share a key: frame log, quotas, connections."""
    session_id = uuid.uuid4()
    assert store.key("frames", session_id.hex) == f"blue:frames:{session_id.hex}"
    assert framelog.shared().key(session_id) == f"blue:frames:{session_id.hex}"
    assert counters.counters()._names(("key:1:m:0",))[0].startswith("blue:")
    assert connection_limits.counter()._key("address:192.0.2.1") == "blue:conns:address:192.0.2.1"
    prefixed.CHANNEL_LAYERS = {"default": {"BACKEND": "x", "CONFIG": {"prefix": "green"}}}
    assert framelog.shared().key(session_id) == f"green:frames:{session_id.hex}"


def test_memory_without_redis_and_redis_with_it(settings):
    settings.REDIS_URL = ""
    assert isinstance(counters.counters(), counters.MemoryCounters)
    assert framelog.shared() is None
    assert type(connection_limits.counter()) is connection_limits.LocalCounter
    assert counters.counters() is counters.counters()  # one per process
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"
    assert isinstance(counters.counters(), counters.RedisCounters)
    assert isinstance(framelog.shared(), framelog.SharedLog)
    assert isinstance(connection_limits.counter(), connection_limits.RedisCounter)
    store.forget()


def test_one_client_per_event_loop(prefixed):
    async def twice() -> tuple:
        return store.client(), store.client(), store.client(decode=True)

    first, again, decoding = asyncio.run(twice())
    other, _, _ = asyncio.run(twice())
    assert first is again and decoding is not first
    assert other is not first
    pool = first.connection_pool
    assert pool.connection_kwargs["socket_timeout"] == store.TIMEOUT == pool.connection_kwargs["socket_connect_timeout"]
