"""The Redis channel layer with a connection pool that waits instead of failing.

redis-py 8's asyncio ConnectionPool allows 100 connections and raises
MaxConnectionsError ("Too many connections") at the 101st concurrent command.
When thousands of sockets open or close at once, their group_add/group_discard
calls exceed that and the consumers die mid-handshake or mid-cleanup (measured
with bench/memory.py: 8,000 sockets closed at once, 25 consumers crashed and left
their groups behind). A BlockingConnectionPool queues those commands instead.
"""

from __future__ import annotations

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer
from redis.asyncio import BlockingConnectionPool


class RedisChannelLayer(_RedisChannelLayer):
    def create_pool(self, index: int) -> BlockingConnectionPool:
        host = dict(self.hosts[index])
        return BlockingConnectionPool.from_url(host.pop("address"), **host)
