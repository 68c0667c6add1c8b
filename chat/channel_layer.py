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
        """Wait for Redis to come back rather than fail; when cancelled, end at once.

        The receive runs in a task of its own, awaited through a shield: cancelling
        this coroutine (a consumer that crashed or closed: Channels' dispatch loop
        cancels its pending receive and awaits it) raises CancelledError here at
        once, whatever the receive below does with its own cancellation. It may
        swallow it: a cancellation landing as a blocking pop returns is lost inside
        redis-py (redis/redis-py#2028) and channels_redis's receive_single then
        issues the next BZPOPMIN, so the consumer's task never finished cancelling,
        the application never ended and Daphne left its socket open and silent.
        The inner task is cancelled again until it really ends (bounded, so this
        stays prompt).
        """
        inner = asyncio.ensure_future(self._receive_retrying(channel))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            await _cancel_until_done(inner)
            raise

    async def _receive_retrying(self, channel: str) -> dict:
        """Left bare, an error from Redis (a restart, a failover) propagates out of
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


async def _cancel_until_done(task: asyncio.Task, timeout: float = 2.0) -> None:
    """Cancel `task` (again, if it swallowed a cancellation) until it ends, for at most `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if not task.done():
        logger.error("channel layer receive ignores cancellation; abandoned")
    elif not task.cancelled():
        task.exception()  # retrieved: a receive that failed or returned as it was cancelled is moot now
