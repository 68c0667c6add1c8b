"""Storage blips absorbed: a database or Redis call that meets a connection error is tried again.

A PostgreSQL restart takes well under a second, an RDS Multi-AZ failover 20 to 60 s; a Redis restart
about a second. Every call on a turn's path and in the frame handlers goes through `retry`: a
connection error (a broken pooled connection, `AdminShutdown`, a refused connect, Django's wrappers of
them, Redis's `ConnectionError`/`TimeoutError`) is tried again with backoff for up to
R2D2_STORAGE_RETRY_SECONDS (10 by default), so an outage shorter than that is invisible to clients.
Past it the call raises `Unavailable`, which the turn and the consumer answer with
`storage_unavailable` ("send it again"), never `internal_error`.

A retried write must be safe to run twice: the caller passes `recover`, asked before every retry
whether the attempt that broke took effect after all (an INSERT that committed just before the
connection dropped), or the write is conditional or idempotent by its own statement (the quota's Redis
scripts record each call under an id of their own: chat/accounts/counters.py).

An outage is logged once when it starts and once when it ends (how long it lasted, how many calls
waited for it, how many gave up): `Outage`, one per storage, shared by every caller in the process.
No traceback per frame.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from django.conf import settings
from django.db import DatabaseError as DjangoDatabaseError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATABASE, REDIS = "database", "redis"

#: The first retry comes at once (the usual failure is one stale pooled connection), then each waits
#: twice as long as the one before, from FIRST_DELAY up to MAX_DELAY, with a little jitter so that a
#: thousand waiting turns do not all knock at once.
FIRST_DELAY = 0.05
MAX_DELAY = 1.0


class Unavailable(Exception):
    """The storage did not answer within R2D2_STORAGE_RETRY_SECONDS (clients get `storage_unavailable`)."""

    def __init__(self, storage: str = DATABASE) -> None:
        super().__init__(f"the {storage} did not answer within the retry window")
        self.storage = storage


def connection_error(exc: BaseException) -> str | None:
    """Which storage `exc` says is unreachable (DATABASE or REDIS), or None for any other error."""
    if isinstance(exc, Unavailable):
        return exc.storage
    if isinstance(exc, DjangoDatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__  # Django's OperationalError/InterfaceError wrap the driver's
    if isinstance(exc, psycopg.OperationalError):  # AdminShutdown, a refused connect, a closed connection
        return DATABASE
    if isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc):
        return DATABASE
    try:
        from redis import exceptions as redis_errors  # here: a deployment without Redis never imports it
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) or _redis_closed_transport(exc):
        return REDIS
    return None


def _redis_closed_transport(exc: BaseException) -> bool:
    """A reset (`CLIENT KILL`) that lands while redis-py opens a connection, between the connect and its
    handshake: uvloop refuses the write with RuntimeError("unable to perform operation on <TCPTransport
    closed=True ...>; the handler is closed"), which redis-py lets out as it is, not as a ConnectionError."""
    if not isinstance(exc, RuntimeError) or "handler is closed" not in str(exc):
        return False
    frames = exc.__traceback__
    while frames is not None:  # raised inside redis-py (not, say, by a websocket's write)
        if frames.tb_frame.f_globals.get("__name__", "").startswith("redis."):
            return True
        frames = frames.tb_next
    return False


class Outage:
    """One storage's outage as this process sees it: logged when it starts and when it ends."""

    def __init__(self, storage: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.clock = clock
        self.since: float | None = None
        self.waited = 0  # calls that met the outage and retried
        self.gave_up = 0  # of those, calls that ran out of the window (their client got storage_unavailable)

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        """A call met a connection error: the outage starts (logged once) if it had not."""
        if self.since is None:
            self.since = self.clock()
            self.waited = self.gave_up = 0
            extra = {"storage": self.storage, "error": type(exc).__name__}
            logger.warning("storage unavailable", extra=extra)

    def answered(self) -> None:
        """A call succeeded: an outage in progress ends (logged once, with its length and its count)."""
        if self.since is None:
            return
        seconds, self.since = self.clock() - self.since, None
        extra = {"storage": self.storage, "seconds": round(seconds, 3), "waited": self.waited}
        logger.warning("storage available again", extra={**extra, "gave_up": self.gave_up})


OUTAGES = {DATABASE: Outage(DATABASE), REDIS: Outage(REDIS)}
_OUTAGE_DB, _OUTAGE_REDIS = OUTAGES[DATABASE], OUTAGES[REDIS]


def failed(exc: BaseException) -> str | None:
    """Note a connection error met outside `retry` (the heartbeat, the health check): the outage starts.
    Returns the storage, or None when `exc` is no connection error."""
    storage = connection_error(exc)
    if storage is not None:
        OUTAGES[storage].failed(exc)
    return storage


def answered(storage: str = DATABASE) -> None:
    """A call to `storage` succeeded outside `retry` (a heartbeat, a health check): an outage in progress ends."""
    OUTAGES[storage].answered()


#: Seconds between the ORM pool's attempts to reconnect while the database is down.
RECONNECT_EVERY = 1.0


def steady_reconnects() -> None:
    """The ORM's pool (psycopg_pool) tries to reconnect after 1, 2, 4, 8... s: after a 20 s failover its
    connections would come back up to 12 s later, and every ORM call waits that long in the pool. Once a
    second instead, so that calls waiting within R2D2_STORAGE_RETRY_SECONDS get through as soon as it answers.

    And a connection that fails the pool's check before it is lent (CONN_HEALTH_CHECKS) drops every idle one:
    the pool would otherwise check the next idle connection only after the same delay, so after a PostgreSQL
    restart, which kills them all, the ORM's thread (one per process: every ORM call and the heartbeat) stalled
    a second per pooled connection, up to R2D2_DB_POOL_MAX seconds: calls ran out of the retry window after a
    0.3 s restart, and the other processes judged this one gone and took its sessions (bench/chaos.py)."""
    try:
        from psycopg_pool import ConnectionPool
        from psycopg_pool.base import AttemptWithBackoff
    except ImportError:  # pragma: no cover (SQLite only)
        return
    AttemptWithBackoff.INITIAL_DELAY = RECONNECT_EVERY
    AttemptWithBackoff.DELAY_BACKOFF = 1.0
    # Django reads it from the class when it makes its pool (after start-up), passing it as the pool's `check`.
    if not getattr(ConnectionPool.check_connection, "drains", False):
        ConnectionPool.check_connection = staticmethod(_draining(ConnectionPool.check_connection))


def _draining(check: Callable[[psycopg.Connection], None]) -> Callable[[psycopg.Connection], None]:
    """`check`, and when a connection being lent fails it, the pool's idle connections are replaced at once
    (`drain()`: closed, new ones made; those lent out are replaced when they come back)."""

    def check_connection(conn: psycopg.Connection) -> None:
        try:
            check(conn)
        except Exception:
            pool = getattr(conn, "_pool", None)  # the pool lending it (None during the pool's own `check()`)
            if pool is not None:
                pool.drain()
            raise

    check_connection.drains = True  # type: ignore[attr-defined]
    return check_connection


def window() -> float:
    return max(0.0, float(settings.R2D2_STORAGE_RETRY_SECONDS))


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    recover: Callable[[], Awaitable[tuple[bool, T | None]]] | None = None,
    within: float | None = None,
    bounded: bool = True,
) -> T:
    """`await call()`, tried again on a connection error for up to `within` seconds (R2D2_STORAGE_RETRY_SECONDS).

    `recover()`, asked before each retry, returns (True, result) when the attempt that broke took effect
    after all: that result is returned and the write is not made again. Raises `Unavailable` past the window;
    any other error at once. `bounded`: the first attempt too is bounded by the window, as the ORM's calls
    must be (its pool waits R2D2_DB_POOL_TIMEOUT for a connection while the database is down); the turn's
    own connections (chat/turns/pgpool.py) fail at once or within their connect timeout, and a timer per
    statement would cost the turn's path about 8 µs each."""
    limit = window() if within is None else within
    started = time.monotonic()  # the loop's clock, without asking for the loop on every call
    bounded = bounded and limit > 0
    scope: asyncio.Timeout | None = None
    try:
        if bounded:
            async with asyncio.timeout(limit) as scope:
                result = await call()
        else:
            result = await call()
    except TimeoutError as exc:
        # Ours when our scope expired (the loop may fire it a clock tick before `limit` has passed by
        # time.monotonic(), so elapsed time cannot tell: an elapsed-time check let it out as a bare TimeoutError).
        if scope is None or not scope.expired():
            raise
        outage = OUTAGES[DATABASE]  # only the database's calls can wait that long (Redis's time out after 5 s)
        _wait(outage, exc, False)
        outage.gave_up += 1
        raise Unavailable(DATABASE) from exc
    except Exception as exc:
        storage = connection_error(exc)
        if storage is None:
            raise
        return await _again(call, recover, storage, exc, limit - (time.monotonic() - started))
    if _OUTAGE_DB.since is not None or _OUTAGE_REDIS.since is not None:
        _answered_any()
    return result


def _answered_any() -> None:
    # Which storage answered is not known here (a call may touch both): a success ends only an outage no call
    # is still failing on, which `_again` re-opens at its next failure. In practice one storage is down at a time.
    for outage in OUTAGES.values():
        outage.answered()


async def _again(
    call: Callable[[], Awaitable[T]],
    recover: Callable[[], Awaitable[tuple[bool, T | None]]] | None,
    storage: str,
    exc: Exception,
    within: float,
) -> T:
    outage = OUTAGES[storage]
    waiting = False  # counted in the outage: the immediate retry failed too (one stale connection is no outage)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            _wait(outage, exc, waiting)
            outage.gave_up += 1
            raise Unavailable(storage) from exc
        await asyncio.sleep(min(delay, remaining) * random.uniform(0.8, 1.2))
        delay = min(MAX_DELAY, max(FIRST_DELAY, delay * 2))
        try:
            # Bounded by the window: a connect to a host that fails over may hang for a TCP timeout.
            async with asyncio.timeout(max(deadline - loop.time(), 0.05)):
                if isinstance(exc, DjangoDatabaseError):
                    await _reset_orm_connection()
                done, result = await recover() if recover is not None else (False, None)
                if not done:
                    result = await call()
        except TimeoutError:  # the window ran out during the attempt
            _wait(outage, exc, waiting)
            outage.gave_up += 1
            raise Unavailable(storage) from exc
        except Exception as again:
            if connection_error(again) is None:
                raise
            exc, waiting = again, _wait(outage, again, waiting)
            continue
        outage.answered()
        return result  # type: ignore[return-value]


def _wait(outage: Outage, exc: BaseException, waiting: bool) -> bool:
    """A call waits for the storage: the outage starts (logged once) and counts it, once per call."""
    if not waiting:
        outage.failed(exc)
        outage.waited += 1
    return True


async def _reset_orm_connection() -> None:
    """Drop the ORM's connection of the thread its async calls run on, if it broke: Django would otherwise
    hand the same dead connection to every later call (the consumer skips Channels' per-frame cleanup)."""
    from asgiref.sync import sync_to_async
    from django.db import close_old_connections

    try:
        await sync_to_async(close_old_connections)()
    except Exception as exc:  # closing a dead connection may fail too; the next connect is what matters
        logger.debug("ORM connection not closed", extra={"error": type(exc).__name__})


def eventually(
    call: Callable[[], Awaitable[object]], *, what: str, give_up_after: float = 3600.0, key: object = None
) -> asyncio.Task:
    """Run a write that must land once the storage is back (a failed turn's state), in the background:
    retried with backoff for up to `give_up_after` seconds. Returns its task (held until it ends).
    `key`: what it belongs to (a session), for `settled`."""

    async def run() -> None:
        try:
            await retry(call, within=give_up_after)
        except Exception as exc:
            logger.warning("deferred write abandoned", extra={"what": what, "error": type(exc).__name__})

    task = asyncio.get_running_loop().create_task(run(), name=f"r2d2-deferred-{what}")
    _deferred.add(task)
    task.add_done_callback(_deferred.discard)
    if key is not None:
        _keys[task] = key
        task.add_done_callback(_keys.pop)
    return task


_deferred: set[asyncio.Task] = set()
_keys: dict[asyncio.Task, object] = {}


async def settled(key: object, timeout: float) -> None:
    """Wait, up to `timeout` seconds, for the deferred writes of `key` (a session handed to another process
    carries its failed turns' state with it: the next holder must not answer a message its client was told
    failed)."""
    tasks = [task for task, of in list(_keys.items()) if of == key]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


async def deferred_done() -> None:
    """Wait for the deferred writes in progress (tests; a drain)."""
    while _deferred:
        await asyncio.gather(*list(_deferred), return_exceptions=True)
