"""Caps on open WebSockets (ASGI middleware): anonymous sockets per client address, authenticated
sockets per principal.

- A socket that acts for nobody counts towards its address: R2D2_MAX_CONNECTIONS_PER_ADDRESS,
  IPv6 addresses grouped by /64 (a host picks any address in its /64, chat/edge/proxy.py).
- A socket that acts for a principal (an API key, a signed-in person) counts towards that
  principal instead: R2D2_MAX_CONNECTIONS_PER_PRINCIPAL. An office behind one NAT address,
  where every person has a key of their own, is then as many clients as it has keys.

It runs after Channels' AuthMiddlewareStack, which reads the session cookie; the handshake's
principal is settled here once (chat/accounts/auth.py `settle`: one look-up of an API key) and
the consumer reuses it. A handshake with a key that is not valid counts as anonymous (the
consumer then refuses it, 4401).

Counted across every server process when REDIS_URL is set, in this process
otherwise. Over a cap the handshake is accepted (so that a browser can read
why) and the client gets one `too_many_connections` error frame, then close
code 4429. The consumer never sees such a socket.

Redis accounting, robust to a killed process: per counted name (an address or a
principal), one hash `<prefix>:conns:<name>` maps a process id to that process's open
sockets for it; each process also keeps `<prefix>:conns-process:<id>` alive
with a TTL it refreshes. Counting (one Lua script, so check-and-add is atomic
across processes) sums only the fields of processes whose key still exists and
deletes the others: a SIGKILLed process's sockets stop counting within
PROCESS_TTL seconds, without anyone having to clean up after it. The refresher
also renews the hashes this process holds, which otherwise expire, so
names never seen again do not stay in Redis. A live process's key is also gone
after Redis was out of its reach for PROCESS_TTL, or restarted without it: other
processes then drop its counts as a dead one's, and the refresher that finds its
key gone writes them back (its sockets count again within REFRESH_SECONDS).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any

from django.conf import settings

from chat.accounts import auth
from chat.accounts.principals import Principal
from chat.ops import store, throttle
from chat.ops.addresses import address_group
from chat.protocol import error
from chat.protocol.errors import ErrorCode

logger = logging.getLogger(__name__)

#: Close code after the `too_many_connections` frame (4000-4999: for applications; 429 as in HTTP).
CLOSE_TOO_MANY_CONNECTIONS = 4429
#: A process's liveness key lives this long; it is refreshed every REFRESH_SECONDS.
PROCESS_TTL = 30
REFRESH_SECONDS = 10

# KEYS[1] the counted name's hash; ARGV: this process's id, the cap, the process-key prefix, the TTL.
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
# KEYS[1] the counted name's hash; ARGV[1] this process's id.
_RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


class LocalCounter:
    """This process's sockets per counted name: enough when there is one process (no Redis)."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    async def acquire(self, name: str, cap: int) -> bool:
        if self.open[name] >= cap:
            return False
        self.open[name] += 1
        return True

    async def release(self, name: str) -> None:
        self.open[name] -= 1
        if self.open[name] <= 0:
            del self.open[name]


class RedisCounter(LocalCounter):
    """Every process's sockets per counted name, in Redis (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.process_id = uuid.uuid4().hex
        self._redis: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task | None = None

    @staticmethod
    def _key(name: str) -> str:
        return store.key("conns", name)

    def _process_key(self) -> str:
        return store.key("conns-process", self.process_id)

    async def _client(self):
        loop = asyncio.get_running_loop()
        if self._redis is None or self._loop is not loop:
            # This event loop's client (chat/ops/store.py); the liveness refresher runs on the loop too.
            self._redis, self._loop = store.client(), loop
            self._refresher = None
        if self._refresher is None or self._refresher.done():
            await self._redis.set(self._process_key(), 1, ex=PROCESS_TTL)
            self._refresher = loop.create_task(self._refresh())
        return self._redis

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception as exc:  # Redis away for a moment: the next round tries again.
                logger.warning("connection-count refresh failed", extra={"error": type(exc).__name__})

    async def refresh(self) -> None:
        """Renew this process's key and its hashes; its counts written back if its key was gone (see above)."""
        names = list(self.open)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._process_key())
            pipe.set(self._process_key(), 1, ex=PROCESS_TTL)
            for name in names:
                pipe.expire(self._key(name), PROCESS_TTL * 2)
            existed, *_ = await pipe.execute()
        if existed or not self.open:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, count in list(self.open.items()):
                pipe.hset(self._key(name), self.process_id, count)
                pipe.expire(self._key(name), PROCESS_TTL * 2)
            await pipe.execute()
        logger.warning("connection counts written back", extra={"names": len(self.open)})

    async def acquire(self, name: str, cap: int) -> bool:
        redis = await self._client()
        accepted = await redis.eval(
            _ACQUIRE, 1, self._key(name), self.process_id, cap, store.key("conns-process", ""), PROCESS_TTL * 2
        )
        if accepted:
            self.open[name] += 1
        return bool(accepted)

    async def release(self, name: str) -> None:
        await super().release(name)
        redis = await self._client()
        await redis.eval(_RELEASE, 1, self._key(name), self.process_id)


def counter() -> LocalCounter:
    """This process's connection counts: every process's in Redis when REDIS_URL is set (chat/ops/store.py)."""
    found = store.one("connection counts", memory=LocalCounter, redis=RedisCounter)
    assert found is not None
    return found


def counted_as(principal: Principal | None, address: str | None) -> tuple[str, str] | None:
    """What a socket counts towards, as (name, who for the refusal), or None when nothing counts it."""
    if principal is not None and not principal.is_anonymous:
        who = "This API key" if principal.api_key_id is not None else "This account"
        return f"principal:{principal.quota_key}", who
    if address is not None:
        return f"address:{address}", "This address"
    return None


class ConnectionLimitMiddleware:
    """Caps open WebSockets per principal, or per address (chat/edge/proxy.py's, IPv6 by /64) for anonymous ones."""

    def __init__(self, app, cap: int | None = None, principal_cap: int | None = None) -> None:
        self.app = app
        self.address_cap = settings.R2D2_MAX_CONNECTIONS_PER_ADDRESS if cap is None else cap
        self.principal_cap = settings.R2D2_MAX_CONNECTIONS_PER_PRINCIPAL if principal_cap is None else principal_cap

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        address = address_group(client[0]) if client else None
        # This connection's tasks log client-caused warnings under its address (chat/ops/throttle.py).
        throttle.CLIENT.set(address)
        if self.address_cap <= 0 and self.principal_cap <= 0:
            return await self.app(scope, receive, send)
        scope = await auth.settle(scope)
        counted = counted_as(auth.settled(scope), address)
        if counted is None:
            return await self.app(scope, receive, send)
        name, who = counted
        cap = self.address_cap if name.startswith("address:") else self.principal_cap
        if cap <= 0:
            return await self.app(scope, receive, send)
        limits = counter()
        try:
            accepted = await limits.acquire(name, cap)
        except Exception as exc:
            # Redis unreachable: serve the socket uncounted rather than refuse everyone.
            logger.warning("connection limit unavailable; socket not counted", extra={"error": type(exc).__name__})
            return await self.app(scope, receive, send)
        if not accepted:
            return await self._refuse(receive, send, f"{who} already has {cap} open connections")
        try:
            return await self.app(scope, receive, send)
        finally:
            # Shielded: Daphne cancels an application that outlives its socket, and an
            # interrupted release would count this socket until its process dies.
            try:
                await asyncio.shield(limits.release(name))
            except Exception as exc:
                logger.warning("connection count release failed", extra={"error": type(exc).__name__})

    async def _refuse(self, receive, send, why: str) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        text = error(ErrorCode.TOO_MANY_CONNECTIONS, f"{why}; close one and reconnect.")
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": CLOSE_TOO_MANY_CONNECTIONS})
