"""A consumer's channel-layer receive ends promptly when cancelled (the consumer crashed or closed),
even when the Redis client underneath swallows the cancellation or Redis is away."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.conf import settings

from chat.channel_layer import RedisChannelLayer
from testkit.server import free_port

pytestmark = pytest.mark.redis


def layer(url: str | None = None) -> RedisChannelLayer:
    host = dict(settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0])
    if url:
        host["address"] = url
    return RedisChannelLayer(hosts=[host], prefix=f"test-cancel-{uuid.uuid4().hex[:8]}")


async def cancelled_promptly(task: asyncio.Task, within: float = 1.5) -> bool:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    return task in done


async def test_receive_ends_when_the_blocking_pop_swallows_the_cancellation():
    """As redis/redis-py#2028: a cancellation landing as BZPOPMIN returns is lost, and channels_redis's
    receive_single pops again. The consumer's task must still finish cancelling."""
    channel_layer = layer()
    original = channel_layer._brpop_with_clean
    swallowed = []

    async def brpop_swallowing_one_cancellation(index, channel, timeout):
        try:
            return await original(index, channel, timeout)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
            asyncio.current_task().uncancel()
            return None  # "nothing popped": receive_single loops into the next BZPOPMIN

    channel_layer._brpop_with_clean = brpop_swallowing_one_cancellation
    try:
        receive = asyncio.ensure_future(channel_layer.receive(await channel_layer.new_channel()))
        await asyncio.sleep(0.3)  # blocked in BZPOPMIN
        assert await cancelled_promptly(receive), "the receive never finished cancelling"
        assert swallowed, "the cancellation did not reach the blocking pop"
        assert receive.cancelled()
    finally:
        await channel_layer.flush()
        await channel_layer.close_pools()


async def test_receive_ends_when_cancelled_while_redis_is_away():
    channel_layer = layer(f"redis://127.0.0.1:{free_port()}/0")
    try:
        receive = asyncio.ensure_future(channel_layer.receive(await channel_layer.new_channel()))
        await asyncio.sleep(0.5)  # failing and retrying
        assert await cancelled_promptly(receive)
        assert receive.cancelled()
    finally:
        await channel_layer.close_pools()


async def test_a_message_still_arrives():
    channel_layer = layer()
    try:
        channel = await channel_layer.new_channel()
        receive = asyncio.ensure_future(channel_layer.receive(channel))
        await channel_layer.send(channel, {"type": "hello"})
        assert await asyncio.wait_for(receive, 5) == {"type": "hello"}
    finally:
        await channel_layer.flush()
        await channel_layer.close_pools()
