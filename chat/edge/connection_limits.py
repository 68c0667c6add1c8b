"""At most R2D2_MAX_CONNECTIONS_PER_ADDRESS open WebSockets per client address (ASGI middleware).

Counted across every server process when REDIS_URL is set, in this process
otherwise. Over the cap the handshake is accepted (so that a browser can read
why) and the client gets one `too_many_connections` error frame, then close
code 4429. The consumer never sees such a socket.

Redis accounting, robust to a killed process: per address, one hash
`<prefix>:conns:<address>` maps a process id to that process's open sockets
for the address; each process also keeps `<prefix>:conns-process:<id>` alive
with a TTL it refreshes. Counting (one Lua script, so check-and-add is atomic
across processes) sums only the fields of processes whose key still exists and
deletes the others: a SIGKILLed process's sockets stop counting within
PROCESS_TTL seconds, without anyone having to clean up after it. The refresher
also renews the address hashes this process holds, which otherwise expire, so
addresses never seen again do not stay in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any

from django.conf import settings

from chat.protocol import error
from chat.protocol.errors import ErrorCode

logger = logging.getLogger(__name__)

#: Close code after the `too_many_connections` frame (4000-4999: for applications; 429 as in HTTP).
CLOSE_TOO_MANY_CONNECTIONS = 4429
#: A process's liveness key lives this long; it is refreshed every REFRESH_SECONDS.
PROCESS_TTL = 30
REFRESH_SECONDS = 10

# KEYS[1] the address hash; ARGV: this process's id, the cap, the process-key prefix, the TTL.
_ACQUIRE = """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
    if redis.call('EXISTS', ARGV[3] .. fields[i]) == 1 then
        total = total + tonumber(fields[i + 1])
    else
        redis.call('HDEL', KEYS[1], fields[i])
    end
end
if total >= tonumber(ARGV[2]) then
    return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# KEYS[1] the address hash; ARGV[1] this process's id.
_RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


class LocalCounter:
    """This process's sockets per address: enough when there is one process (no Redis)."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    async def acquire(self, address: str, cap: int) -> bool:
        if self.open[address] >= cap:
            return False
        self.open[address] += 1
        return True

    async def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


class RedisCounter(LocalCounter):
    """Every process's sockets per address, in Redis (see the module docstring)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.process_id = uuid.uuid4().hex
        self._redis: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task | None = None

    def _key(self, address: str) -> str:
        return f"{self.prefix}:conns:{address}"

    def _process_key(self) -> str:
        return f"{self.prefix}:conns-process:{self.process_id}"

    async def _client(self):
        loop = asyncio.get_running_loop()
        if self._redis is None or self._loop is not loop:
            # One client per event loop (tests run several loops in one process).
            from redis.asyncio import Redis

            self._redis, self._loop = Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5), loop
            self._refresher = None
        if self._refresher is None or self._refresher.done():
            await self._redis.set(self._process_key(), 1, ex=PROCESS_TTL)
            self._refresher = loop.create_task(self._refresh())
        return self._redis

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._process_key(), 1, ex=PROCESS_TTL)
                    for address in list(self.open):
                        pipe.expire(self._key(address), PROCESS_TTL * 2)
                    await pipe.execute()
            except Exception as exc:  # Redis away for a moment: the next round tries again.
                logger.warning("connection-count refresh failed", extra={"error": type(exc).__name__})

    async def acquire(self, address: str, cap: int) -> bool:
        redis = await self._client()
        accepted = await redis.eval(
            _ACQUIRE, 1, self._key(address), self.process_id, cap, f"{self.prefix}:conns-process:", PROCESS_TTL * 2
        )
        if accepted:
            self.open[address] += 1
        return bool(accepted)

    async def release(self, address: str) -> None:
        await super().release(address)
        redis = await self._client()
        await redis.eval(_RELEASE, 1, self._key(address), self.process_id)


_counter: LocalCounter | None = None


def counter() -> LocalCounter:
    global _counter
    if _counter is None:
        prefix = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("prefix", "r2d2")
        _counter = RedisCounter(settings.REDIS_URL, prefix) if settings.REDIS_URL else LocalCounter()
    return _counter


class ConnectionLimitMiddleware:
    """Caps open WebSockets per scope["client"][0] (the address chat/edge/proxy.py settles on)."""

    def __init__(self, app, cap: int | None = None) -> None:
        self.app = app
        self.cap = settings.R2D2_MAX_CONNECTIONS_PER_ADDRESS if cap is None else cap

    async def __call__(self, scope, receive, send) -> None:
        client = scope.get("client")
        if scope["type"] != "websocket" or self.cap <= 0 or not client:
            return await self.app(scope, receive, send)
        address = client[0]
        limits = counter()
        try:
            accepted = await limits.acquire(address, self.cap)
        except Exception as exc:
            # Redis unreachable: serve the socket uncounted rather than refuse everyone.
            logger.warning("connection limit unavailable; socket not counted", extra={"error": type(exc).__name__})
            return await self.app(scope, receive, send)
        if not accepted:
            return await self._refuse(receive, send)
        try:
            return await self.app(scope, receive, send)
        finally:
            # Shielded: Daphne cancels an application that outlives its socket, and an
            # interrupted release would count this socket until its process dies.
            try:
                await asyncio.shield(limits.release(address))
            except Exception as exc:
                logger.warning("connection count release failed", extra={"error": type(exc).__name__})

    async def _refuse(self, receive, send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        text = error(
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"This address already has {self.cap} open connections; close one and reconnect.",
        )
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": CLOSE_TOO_MANY_CONNECTIONS})
