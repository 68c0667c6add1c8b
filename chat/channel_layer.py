"""The Redis channel layer, hardened: a connection pool that waits instead of failing,
and a receive that outlives a Redis restart.

redis-py 8's asyncio ConnectionPool allows 100 connections and raises
MaxConnectionsError ("Too many connections") at the 101st concurrent command.
When thousands of sockets open or close at once, their group_add/group_discard
calls exceed that and the consumers die mid-handshake or mid-cleanup (measured
with bench/memory.py: 8,000 sockets closed at once, 25 consumers crashed and left
their groups behind). A BlockingConnectionPool queues those commands instead.
"""

from __future__ import annotations

import asyncio
import logging

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer
from redis.asyncio import BlockingConnectionPool

logger = logging.getLogger(__name__)


class RedisChannelLayer(_RedisChannelLayer):
    def create_pool(self, index: int) -> BlockingConnectionPool:
        host = dict(self.hosts[index])
        return BlockingConnectionPool.from_url(host.pop("address"), **host)

    async def receive(self, channel: str) -> dict:
        """Wait for Redis to come back rather than fail.

        Left bare, an error from Redis (a restart, a failover) propagates out of
        Channels' dispatch loop and Daphne closes every socket of the process
        with 1011. Retried with backoff, the sockets, their sessions and their
        generations carry on meanwhile.
        """
        delay = 0.1
        while True:
            try:
                return await super().receive(channel)
            except Exception as exc:
                # redis-py turns a cancelled read into its own error: the consumer
                # is shutting down then, so let the cancellation through.
                if asyncio.current_task().cancelling():
                    raise
                if delay == 0.1:
                    logger.warning("channel layer receive failed; retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
