"""The retry policy of chat/ops/storage.py: what is retried, for how long, what is logged."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from types import SimpleNamespace

import psycopg
import psycopg.errors
import pytest
import redis.exceptions
from django.db import OperationalError as DjangoOperationalError

from chat.ops import storage


@pytest.fixture(autouse=True)
def _quiet_outages(settings):
    """Each test starts with no outage in progress and a short window."""
    settings.R2D2_STORAGE_RETRY_SECONDS = 1.0
    for outage in storage.OUTAGES.values():
        outage.since = None
    yield
    for outage in storage.OUTAGES.values():
        outage.since = None


class Flaky:
    """A storage call that fails `failures` times with `error`, then answers "ok"."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or psycopg.OperationalError("connection refused")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def wrapped(cause: BaseException, wrapper: type[Exception] = DjangoOperationalError) -> Exception:
    """An error as Django raises it: its own class, the driver's error as its cause."""
    try:
        raise wrapper(str(cause)) from cause
    except wrapper as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "storage_name"),
    [
        (psycopg.OperationalError("connection refused"), "database"),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), "database"),
        (wrapped(psycopg.OperationalError("the connection is closed")), "database"),
        (redis.exceptions.ConnectionError("Error 111 connecting"), "redis"),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), "redis"),
        (storage.Unavailable("redis"), "redis"),
        (psycopg.errors.UniqueViolation("duplicate key"), None),
        (wrapped(sqlite3.OperationalError("no such table: chat_message")), None),
        (ValueError("a bug"), None),
    ],
)
def test_only_connection_errors_count_as_an_outage(error, storage_name):
    assert storage.connection_error(error) == storage_name


async def test_a_blip_is_retried_and_the_call_answers():
    flaky = Flaky(failures=3)
    assert await storage.retry(flaky) == "ok"
    assert flaky.calls == 4


async def test_any_other_error_is_raised_at_once():
    flaky = Flaky(failures=5, error=psycopg.errors.UniqueViolation("duplicate key"))
    with pytest.raises(psycopg.errors.UniqueViolation):
        await storage.retry(flaky)
    assert flaky.calls == 1


async def test_past_the_window_the_call_raises_unavailable(settings):
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.5
    flaky = Flaky(failures=10_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(storage.Unavailable) as raised:
        await storage.retry(flaky)
    assert 0.5 <= loop.time() - started < 1.0
    assert raised.value.storage == "database"
    # Backoff: a few attempts, not a busy loop (at once, then 0.05, 0.1, 0.2 s...).
    assert 3 <= flaky.calls <= 8, flaky.calls


async def test_a_write_that_took_effect_is_not_made_again():
    """The attempt that broke had committed: `recover` finds it, and its result is returned."""
    flaky = Flaky(failures=1)

    async def recover():
        return True, "found"

    assert await storage.retry(flaky, recover=recover) == "found"
    assert flaky.calls == 1


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    """Twenty calls wait through one outage: two WARNINGs, the second with its length and its count."""
    caplog.set_level(logging.WARNING, logger="chat.ops.storage")
    down = True

    async def call() -> str:
        if down:
            raise psycopg.OperationalError("connection refused")
        return "ok"

    waiting = [asyncio.ensure_future(storage.retry(call)) for _ in range(20)]
    await asyncio.sleep(0.3)
    down = False
    assert await asyncio.gather(*waiting) == ["ok"] * 20
    assert [r.getMessage() for r in caplog.records] == ["storage unavailable", "storage available again"]
    start, end = caplog.records
    assert (start.storage, start.error) == ("database", "OperationalError")
    assert end.waited == 20 and end.gave_up == 0 and 0.2 < end.seconds < 2.0


async def test_calls_that_gave_up_are_counted_in_the_end_line(settings, caplog):
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.2
    caplog.set_level(logging.WARNING, logger="chat.ops.storage")
    with pytest.raises(storage.Unavailable):
        await storage.retry(Flaky(failures=10_000))
    assert await storage.retry(Flaky(failures=0)) == "ok"
    end = caplog.records[-1]
    assert end.getMessage() == "storage available again" and (end.waited, end.gave_up) == (1, 1)


async def test_a_call_that_hangs_is_bounded_by_the_window(settings):
    """A connect to an address that no longer answers (a failover's old primary) waits no longer than the window."""
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.3
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        await asyncio.sleep(60)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(storage.Unavailable):
        await storage.retry(call)
    assert loop.time() - started < 1.0


async def test_a_deferred_write_lands_when_the_storage_answers_again(settings):
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.1  # shorter than the outage: `eventually` outlasts it
    flaky = Flaky(failures=8)
    storage.eventually(flaky, what="test")
    await asyncio.wait_for(storage.deferred_done(), 10)
    assert flaky.calls == 9


async def test_one_stale_pooled_connection_is_no_outage(caplog):
    """The first call after a restart meets a dead pooled connection; its immediate retry answers: nothing logged."""
    caplog.set_level(logging.WARNING, logger="chat.ops.storage")
    flaky = Flaky(failures=1, error=psycopg.errors.AdminShutdown("terminating connection"))
    assert await storage.retry(flaky) == "ok"
    assert caplog.records == [] and not storage.OUTAGES["database"].ongoing


async def test_a_first_attempt_that_hangs_is_bounded_by_the_window(settings):
    """The ORM's pool waits R2D2_DB_POOL_TIMEOUT (30 s) for a connection while the database is down: the client
    hears `storage_unavailable` after the window, not after the pool's timeout."""
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(storage.Unavailable):
        await storage.retry(lambda: asyncio.sleep(60))
    assert loop.time() - started < 1.0


async def test_a_call_the_window_cuts_short_is_unavailable_whatever_the_clock_says(monkeypatch):
    """The loop may fire the window's timer a clock tick before `within` has passed by time.monotonic(): a call
    still waiting then is `Unavailable` all the same (the client gets storage_unavailable, never internal_error)."""
    monkeypatch.setattr(storage, "time", SimpleNamespace(monotonic=lambda: 0.0))  # as if it fired early
    with pytest.raises(storage.Unavailable):
        await storage.retry(lambda: asyncio.sleep(10), within=0.05)


def test_a_write_uvloop_refuses_on_a_reset_redis_connection_is_a_redis_connection_error():
    """A `CLIENT KILL` landing while redis-py opens a connection: uvloop refuses its handshake's write with a
    RuntimeError, which redis-py lets out as it is (a post answered internal_error before)."""
    closed = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
    scope = {"__name__": "redis.asyncio.connection"}
    exec(f"def send():\n    raise RuntimeError({closed!r})", scope)
    with pytest.raises(RuntimeError) as raised:
        scope["send"]()
    assert storage.connection_error(raised.value) == "redis"
    with pytest.raises(RuntimeError) as elsewhere:  # a websocket's write, say: no storage's
        raise RuntimeError(closed)
    assert storage.connection_error(elsewhere.value) is None
