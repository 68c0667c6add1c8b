"""PostgreSQL connections on the event loop, for the writes of every turn.

The ORM's async API runs each query on a thread (asgiref's `sync_to_async`):
every turn paid two thread hops, two model instantiations and psycopg's
client-side parameter binding for its two writes, about a fifth of the
server's CPU under load (`bench/throughput.py --profile`). psycopg's
`AsyncConnection` runs the same statements on the loop itself. Only what every
turn or session does uses this (chat/turns/messages.py: a turn's messages;
chat/sessions/lifecycle.py: a session's start and end); everything else (the admin,
checks, the sweeps) stays on the ORM, and SQLite stays on the ORM's thread.

One small pool (R2D2_DB_TURN_POOL_MAX connections) per event loop: Daphne runs
one loop per process, but the test suite and management commands run many loops
one after another, so the idle connections of a loop that has closed are closed
when the next loop asks for its pool. Connections use the ORM's own connection settings
(`DATABASES["default"]`), in autocommit: each statement is its own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model


@functools.cache
def enabled() -> bool:
    """True on PostgreSQL: the turn's statements run here; elsewhere (SQLite) on the ORM's thread."""
    return settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def connection_params() -> dict[str, Any]:
    """What the ORM would connect with, minus what only its own cursors understand."""
    params = connections["default"].get_connection_params()
    for key in ("cursor_factory", "context"):
        params.pop(key, None)
    # Told apart from the ORM's connections in pg_stat_activity: the name libpq would
    # give them (PGAPPNAME), or "r2d2", and "-turns".
    base = params.get("application_name") or os.environ.get("PGAPPNAME") or "r2d2"
    params["application_name"] = f"{base}-turns"
    # A connect to an address that no longer answers (a failover's old primary) fails within this, not the
    # system's TCP timeout (minutes): the turn's retries (chat/ops/storage.py) then try the new one.
    params.setdefault("connect_timeout", 5)
    return params


class Pool:
    """At most `max_size` connections, reused; one that failed or was cancelled mid-statement is dropped."""

    def __init__(self, params: dict[str, Any], max_size: int, timeout: float) -> None:
        self._params = params
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(max_size)
        self._timeout = timeout

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._slots.locked():
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(**self._params, autocommit=True)
            try:
                yield conn
            except BaseException as exc:
                # Its state is unknown (a statement cut short, a dropped socket): never reuse it.
                conn.pgconn.finish()
                if isinstance(exc, psycopg.OperationalError):
                    # The server went away (a restart, a failover): the idle ones are gone too,
                    # so one turn fails, not one per pooled connection.
                    self.close_idle()
                raise
            if not conn.closed:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def close_idle(self) -> None:
        """Close the idle connections now, with no event loop needed (libpq closes its socket)."""
        while self._idle:
            self._idle.pop().pgconn.finish()


_pools: dict[asyncio.AbstractEventLoop, Pool] = {}


def pool() -> Pool:
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None:
        for stale in [other for other in _pools if other.is_closed()]:
            _pools.pop(stale).close_idle()
        options = connections["default"].settings_dict["OPTIONS"].get("pool") or {}
        found = _pools[loop] = Pool(
            connection_params(),
            max_size=max(1, settings.R2D2_DB_TURN_POOL_MAX),
            timeout=options.get("timeout", 30.0),  # R2D2_DB_POOL_TIMEOUT, as the ORM's pool waits
        )
    return found


def close_all() -> None:
    """Close every idle connection (a test run's end, before its database is dropped)."""
    while _pools:
        _pools.popitem()[1].close_idle()


async def execute(sql: str, params: Sequence[object]) -> int:
    """Run one statement; returns how many rows it changed."""
    async with pool().connection() as conn:
        cursor = await conn.execute(sql, params)
        return cursor.rowcount


@functools.cache
def _converter() -> BaseDatabaseWrapper:
    """A database wrapper of this module's own, for the ORM's conversion of values and quoting
    of names (it never connects). `connections["default"]` on the event loop would build one
    per task, since asgiref's Local is per context: +3.6 KiB per open socket (bench/memory.py)."""
    return connections.create_connection("default")


async def insert(instance: Model) -> None:
    """INSERT a new model instance whose primary key is already set (a UUID made in Python), as
    `instance.asave(force_insert=True)` would, with the ORM's own conversion of each field."""
    meta, connection = instance._meta, _converter()
    assert instance.pk is not None, "only for primary keys made in Python"
    fields = meta.concrete_fields
    quote = connection.ops.quote_name
    values = [field.get_db_prep_save(field.pre_save(instance, add=True), connection) for field in fields]
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(meta.db_table), ", ".join(quote(field.column) for field in fields), ", ".join(["%s"] * len(fields))
    )
    await execute(sql, values)
    instance._state.adding, instance._state.db = False, "default"


async def fetch_value(sql: str, params: Sequence[object]) -> object | None:
    """The first column of the first row, or None when there is no row."""
    async with pool().connection() as conn:
        cursor = await conn.execute(sql, params)
        row = await cursor.fetchone()
        return row[0] if row else None
