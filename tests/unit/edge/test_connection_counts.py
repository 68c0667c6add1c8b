"""Connection counts across processes on Redis (chat/edge/connection_limits.py): a live process whose liveness
key expired while Redis was out of its reach (or lost in a restart) gets its sockets counted again."""

from __future__ import annotations

import uuid

import pytest

from chat.edge import connection_limits
from chat.ops import store

pytestmark = pytest.mark.redis


@pytest.fixture
def prefixed(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "x", "CONFIG": {"prefix": f"t{uuid.uuid4().hex[:8]}"}}}
    yield
    store.forget()


async def test_a_process_judged_gone_while_redis_was_away_counts_again_after_its_refresh(prefixed):
    one, two = connection_limits.RedisCounter(), connection_limits.RedisCounter()
    assert await one.acquire("address:192.0.2.1", 2) and await one.acquire("address:192.0.2.1", 2)
    assert not await two.acquire("address:192.0.2.1", 2), "two sockets open on the first: at the cap"
    redis = store.client()
    await redis.delete(one._process_key())  # its key expired while Redis was out of its reach
    assert await two.acquire("address:192.0.2.1", 2)  # the first's sockets dropped as a dead process's
    await two.release("address:192.0.2.1")
    await one.refresh()  # Redis answers again: its next refresh
    assert not await two.acquire("address:192.0.2.1", 2), "the first's two sockets count again"
    await one.refresh()  # its key was there: nothing written twice
    assert int(await redis.hget(one._key("address:192.0.2.1"), one.process_id)) == 2
    for counter in (one, two):
        if counter._refresher is not None:
            counter._refresher.cancel()
    await redis.delete(one._key("address:192.0.2.1"), one._process_key(), two._process_key())
