"""Where state every server process shares lives: Redis when REDIS_URL is set, this process's memory otherwise.

The one place that chooses (`one`), for the quota counters (chat/accounts/counters.py), the frame log of
resumable sessions (chat/sessions/framelog.py) and the connection counts (chat/edge/connection_limits.py);
the channel layer is channels_redis's own (chat/channel_layer.py). One rule for each of them:

- one client per event loop (`client`): a redis.asyncio connection belongs to the loop that opened it,
  and tests and the admin run several loops in one process;
- one timeout policy: TIMEOUT seconds to connect and for each reply (a blocking read, XREAD BLOCK, waits
  its own block time on top), and at most MAX_CONNECTIONS per loop, a caller waiting up to POOL_WAIT for one;
- one key rule (`key`): every key starts with R2D2_CHANNEL_PREFIX (the channel layer's prefix), so two
  deployments, or two test runs, sharing a Redis never share a key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from django.conf import settings

T = TypeVar("T")

TIMEOUT = 5.0
MAX_CONNECTIONS = 100
POOL_WAIT = 20.0

_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, bool], Any]] = WeakKeyDictionary()
_chosen: dict[str, tuple[str, Any]] = {}


def shared() -> bool:
    """Several processes share state here (REDIS_URL is set)."""
    return bool(settings.REDIS_URL)


def prefix() -> str:
    """R2D2_CHANNEL_PREFIX, as the channel layer's settings hold it."""
    return settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("prefix", "r2d2")


def key(*parts: str) -> str:
    """A Redis key: the prefix, then what it names (`key("frames", id)` → `r2d2:frames:<id>`)."""
    return ":".join((prefix(), *parts))


def one(name: str, *, memory: Callable[[], T] | None, redis: Callable[[], T]) -> T | None:
    """This process's one `name` store: made by `redis` when REDIS_URL is set, by `memory` otherwise (None: the
    store has no memory form). Made again when REDIS_URL changes (tests change settings between runs)."""
    url = settings.REDIS_URL
    found = _chosen.get(name)
    if found is None or found[0] != url:
        made = redis() if url else (memory() if memory is not None else None)
        found = _chosen[name] = (url, made)
    return found[1]


def forget() -> None:
    """Forget every store made (tests: each starts with empty counters)."""
    _chosen.clear()


def client(*, decode: bool = False, url: str | None = None):
    """This event loop's Redis client (`decode`: replies as str), made at first use; `url` another Redis than
    REDIS_URL's (tests reach it through a proxy they cut), with the same policy."""
    import redis.asyncio as redis  # here: a deployment without Redis never imports it

    url = url or settings.REDIS_URL
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    found = per_loop.get((url, decode))
    if found is None:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            decode_responses=decode,
        )
        found = per_loop[(url, decode)] = redis.Redis(connection_pool=pool)
    return found


async def close() -> None:
    """Close this event loop's clients (a test's loop ending, a process stopping)."""
    for found in _clients.pop(asyncio.get_running_loop(), {}).values():
        await found.aclose()
