"""Quotas per principal (a user or an API key), across all its connections and server processes.

- messages per minute: a counter per principal per wall-clock minute;
- tokens per day: a counter per principal per UTC day, charged after each model call
  with the tokens the model reported (prompt + completion), or an estimate
  (characters / 4) when it reported none;
- concurrent live sessions: counted in the sessions table, the one place every
  process writes and the orphan sweep keeps honest after a crash;
- allowed models: a list per key (or R2D2_QUOTA_MODELS).

The counters live in Redis when REDIS_URL is set (one Lua script per message:
atomic, and one round trip), in this process's memory otherwise. Anonymous
connections have no quota (the per-socket token bucket in chat/accounts/limits.py limits
them). Nothing here knows about sockets: the consumer calls these functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from django.conf import settings

from chat.protocol.errors import ClientError, ErrorCode

if TYPE_CHECKING:
    from chat import llm
    from chat.accounts.principals import Principal

logger = logging.getLogger(__name__)

DAY = 86_400


# Checks --------------------------------------------------------------------------


def check_model(principal: Principal, model: str) -> None:
    models = principal.limits.models
    if models and model not in models:
        raise ClientError(ErrorCode.MODEL_NOT_ALLOWED, f"This key may use only: {', '.join(models)}.")


async def check_sessions(principal: Principal) -> None:
    """Refuse a new session when the principal already has its limit of live ones (in any process)."""
    from chat.models import ChatSession

    limit = principal.limits.max_sessions
    if principal.is_anonymous or limit <= 0:
        return
    live = await ChatSession.objects.live().filter(principal.own_sessions()).acount()
    if live >= limit:
        raise _exceeded(f"Concurrent sessions: {live} of {limit} are live; end one to start another.")


async def check_message(principal: Principal, *, now: float | None = None) -> None:
    """Count one message against the minute's limit and refuse it if over, or if today's tokens are spent."""
    limits = principal.limits
    if principal.is_anonymous or (limits.messages_per_minute <= 0 and limits.tokens_per_day <= 0):
        return
    now = time.time() if now is None else now
    messages, tokens = await counters().count_message(_minute_key(principal, now), _day_key(principal, now), ttl=120)
    if 0 < limits.tokens_per_day <= tokens:
        raise _exceeded(
            f"Tokens per day: {tokens} of {limits.tokens_per_day} used; resets at 00:00 UTC "
            f"(in {_duration(_next_day(now) - now)})."
        )
    if 0 < limits.messages_per_minute < messages:
        raise _exceeded(
            f"Messages per minute: the limit is {limits.messages_per_minute}; resets in {math.ceil(60 - now % 60)} s."
        )


def tokens_used(reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> int:
    """What a model call cost: the model's own count, or an estimate (4 characters a token) where it gave none."""
    if reply.prompt_tokens is None and reply.completion_tokens is None and not text and not reply.headers_received:
        return 0  # refused or unreachable before it answered anything
    prompt = reply.prompt_tokens
    if prompt is None:
        prompt = math.ceil(sum(len(m.get("content") or "") for m in request) / 4)
    completion = reply.completion_tokens
    if completion is None:
        completion = math.ceil(len(text) / 4)
    return prompt + completion


async def charge_tokens(principal: Principal, tokens: int, *, now: float | None = None) -> None:
    if principal.is_anonymous or tokens <= 0:
        return
    now = time.time() if now is None else now
    await counters().add(_day_key(principal, now), tokens, ttl=2 * DAY)


def charge_in_background(principal: Principal, tokens: int) -> None:
    """Charge without holding up the turn (called as the turn ends); a failure is logged, not raised."""
    task = asyncio.get_running_loop().create_task(charge_tokens(principal, tokens))
    _background.add(task)
    task.add_done_callback(_charged)


_background: set[asyncio.Task] = set()


def _charged(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("could not charge tokens to a quota", exc_info=task.exception())


async def usage(principal: Principal, *, now: float | None = None) -> dict[str, int]:
    """Use so far: messages this minute, tokens today (the admin shows them against the limits)."""
    now = time.time() if now is None else now
    store = counters()
    return {
        "messages_this_minute": await store.get(_minute_key(principal, now)),
        "tokens_today": await store.get(_day_key(principal, now)),
    }


def _exceeded(message: str) -> ClientError:
    return ClientError(ErrorCode.QUOTA_EXCEEDED, message)


def _minute_key(principal: Principal, now: float) -> str:
    return f"{principal.quota_key}:m:{int(now // 60)}"


def _day_key(principal: Principal, now: float) -> str:
    return f"{principal.quota_key}:t:{datetime.fromtimestamp(now, UTC):%Y%m%d}"


def _next_day(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


# Where the counters live -----------------------------------------------------------


class Counters(Protocol):
    async def count_message(self, minute_key: str, day_key: str, *, ttl: int) -> tuple[int, int]:
        """Add one to the minute's messages; return (messages this minute, tokens today)."""

    async def add(self, key: str, amount: int, *, ttl: int) -> int: ...

    async def get(self, key: str) -> int: ...


class MemoryCounters:
    """One process's counters: enough when there is one process (no REDIS_URL)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}

    async def count_message(self, minute_key: str, day_key: str, *, ttl: int) -> tuple[int, int]:
        return self._add(minute_key, 1, ttl), await self.get(day_key)

    async def add(self, key: str, amount: int, *, ttl: int) -> int:
        return self._add(key, amount, ttl)

    async def get(self, key: str) -> int:
        value, expires = self._values.get(key, (0, 0.0))
        return value if expires > time.time() else 0

    def _add(self, key: str, amount: int, ttl: int) -> int:
        now = time.time()
        value, expires = self._values.get(key, (0, 0.0))
        if expires <= now:
            value, expires = 0, now + ttl
            self._forget_expired(now)
        self._values[key] = (value + amount, expires)
        return value + amount

    def _forget_expired(self, now: float) -> None:
        if len(self._values) > 10_000:
            self._values = {k: v for k, v in self._values.items() if v[1] > now}


# INCR then EXPIRE on first use, and read today's tokens, atomically and in one round trip.
_COUNT_MESSAGE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
_ADD = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
"""


class RedisCounters:
    """Counters shared by every process on one Redis (redis.asyncio; one client per event loop)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _redis(self):
        import redis.asyncio as redis

        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            pool = redis.BlockingConnectionPool.from_url(self.url, max_connections=50, timeout=20, socket_timeout=5)
            client = redis.Redis(connection_pool=pool)
            found = self._clients[loop] = (client, client.register_script(_COUNT_MESSAGE), client.register_script(_ADD))
        return found

    def _key(self, key: str) -> str:
        return f"{self.prefix}:quota:{key}"

    async def count_message(self, minute_key: str, day_key: str, *, ttl: int) -> tuple[int, int]:
        _, count_message, _ = self._redis()
        messages, tokens = await count_message(keys=[self._key(minute_key), self._key(day_key)], args=[ttl])
        return int(messages), int(tokens)

    async def add(self, key: str, amount: int, *, ttl: int) -> int:
        _, _, add = self._redis()
        return int(await add(keys=[self._key(key)], args=[amount, ttl]))

    async def get(self, key: str) -> int:
        client, _, _ = self._redis()
        return int(await client.get(self._key(key)) or 0)


_counters: Counters | None = None


def counters() -> Counters:
    global _counters
    if _counters is None:
        if settings.REDIS_URL:
            # Principal ids are those of one database: deployments (or test runs) sharing a Redis
            # with different databases must not share counters.
            database = hashlib.sha256(str(settings.DATABASES["default"]["NAME"]).encode()).hexdigest()[:12]
            prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "r2d2")
            _counters = RedisCounters(settings.REDIS_URL, f"{prefix}:{database}")
        else:
            _counters = MemoryCounters()
    return _counters


def reset_counters() -> None:
    """Forget the counters (tests change settings between runs)."""
    global _counters
    _counters = None
