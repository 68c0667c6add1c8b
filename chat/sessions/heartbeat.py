"""This process's heartbeat: the background task that keeps its `ServerProcess` row fresh
and sweeps for orphaned sessions (see chat/sessions/liveness.py for what those are).

It starts with the process's first request (Daphne has no start-up hook; on
Elastic Beanstalk the load balancer's health check is that first request). It
sweeps every `R2D2_ORPHAN_SWEEP_SECONDS`, but only once its own beats have reached
the database without a gap for `R2D2_PROCESS_STALE_SECONDS` (`liveness.own_view`):
after start-up, and after any outage or freeze of its own, the other processes'
rows may be stale for the same reason its own was, and they are alive.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus
from chat.ops import storage
from chat.sessions import lifecycle, liveness
from chat.sessions.liveness import PROCESS_ID
from chat.turns import draft

logger = logging.getLogger(__name__)


class Heartbeat:
    """The background task that keeps this process's row fresh and sweeps for orphans."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ensure_started(self) -> None:
        """Start the task on the running loop unless it already runs there (cheap: called per connection)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if settings.R2D2_HEARTBEAT_SECONDS <= 0:
            return
        self._loop = loop
        self._task = loop.create_task(self._run(), name="r2d2-heartbeat")

    async def _run(self) -> None:
        interval = settings.R2D2_HEARTBEAT_SECONDS
        stale_after = settings.R2D2_PROCESS_STALE_SECONDS
        sweep_every = settings.R2D2_ORPHAN_SWEEP_SECONDS
        last_sweep = float("-inf")
        last_beat: datetime | None = None  # the last beat that reached the database
        silent_since: datetime | None = None
        rechecks = 0
        failures = 0  # beats in a row that met a connection error
        while True:
            try:
                now = timezone.now()
                if last_beat is not None and (now - last_beat).total_seconds() >= stale_after:
                    # Frozen (SIGSTOP, a paused VM) or cut off from the database for longer than the
                    # staleness window: other processes may have ended our sessions as orphaned.
                    silent_since, rechecks = last_beat, 3
                try:
                    await database_sync_to_async(liveness.beat)()
                except Exception:
                    liveness.own_view.missed()
                    raise
                liveness.own_view.reached()
                storage.answered()  # a database outage this process saw has ended
                last_beat, failures = now, 0
                release_free_memory()
                if rechecks:
                    # A sweep that began before this beat may still land: look again on the next ticks.
                    rechecks -= 1
                    await self._close_orphaned_here(silent_since)
                loop_time = asyncio.get_running_loop().time()
                # Never at once after a gap in our own beats: the sweep stays due until they have been steady.
                if sweep_every > 0 and loop_time - last_sweep >= sweep_every and liveness.own_view.steady():
                    last_sweep = loop_time
                    await database_sync_to_async(lifecycle.end_orphaned)()
                    await database_sync_to_async(interrupt_stale_replies)(*draft.streaming())
            except Exception as exc:  # the database may be down: keep beating, the health check reports it
                if storage.connection_error(exc) is not None:
                    # Logged once, as the outage (chat/ops/storage.py), when a second beat in a row fails:
                    # the first after a restart may only have met a dead pooled connection.
                    failures += 1
                    if failures >= 2:
                        storage.failed(exc)
                    await asyncio.sleep(interval)
                    continue
                # `extra` never names a LogRecord attribute ("process" is one): logging would raise
                # KeyError here and the heartbeat would die (tests/test_boundaries.py checks).
                logger.warning("heartbeat failed", extra={"error": type(exc).__name__, "process_id": PROCESS_ID})
            await asyncio.sleep(interval)

    @staticmethod
    async def _close_orphaned_here(since: datetime) -> None:
        """Sessions this process still holds but that were ended as orphaned while it was silent:
        close them here too, so their clients get `session_end` (reason `orphaned`) instead of a
        conversation the database says is over."""
        orphaned = [
            session
            async for session in ChatSession.objects.filter(
                owner_process=PROCESS_ID, end_reason=EndReason.ORPHANED, ended_at__gte=since
            )
        ]
        for session in orphaned:
            await lifecycle.tell_holder(session, EndReason.ORPHANED)
        if orphaned:
            logger.warning("sessions found orphaned after a silence", extra={"count": len(orphaned)})


def interrupt_stale_replies(streaming: set[int], since: datetime | None = None) -> int:
    """Replies this process's sessions left `incomplete` that no turn here is writing (the last save of
    their turn failed: PostgreSQL restarted mid-turn) are marked interrupted. `streaming`, `since`: the rows
    this process's turns are writing, and the moment from which rows made may be theirs (chat/turns/draft.py).

    The status is a condition on the updated row itself, not in a subquery (as a filter across the session
    would make it): a turn's final save that commits while this statement runs (it waits for the row's lock,
    or its snapshot predates the commit) is re-checked against it, so a reply saved `complete`, which its
    client then receives whole, stays complete."""
    held = ChatSession.objects.filter(owner_process=PROCESS_ID, ended_at__isnull=True).values("id")
    stale = ChatMessage.objects.filter(status=MessageStatus.INCOMPLETE, session_id__in=held)
    if since is not None:
        stale = stale.filter(created_at__lt=since)
    stale = stale.exclude(id__in=streaming)
    count = stale.update(status=MessageStatus.INTERRUPTED)
    if count:
        logger.warning("replies left incomplete marked interrupted", extra={"count": count})
    return count


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_trim = _malloc_trim()


def release_free_memory() -> None:
    """Hand memory freed since the last beat back to the operating system.

    A long reply is held whole while it streams; after it, glibc keeps the freed
    pages in its arenas (one per thread that touched them), so a burst of long
    replies or slow readers would leave the process's RSS high for good.
    """
    if _trim is not None:
        _trim(0)


heartbeat = Heartbeat()

Scope = dict
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class HeartbeatMiddleware:
    """ASGI middleware: the process's first HTTP request or WebSocket starts the heartbeat."""

    # ASGI 3 (one call), though __call__ is not a coroutine function (asgiref checks this hint).
    _asgi_single_callable = True

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Callable, send: Callable) -> Awaitable[None]:
        # Returns the inner application's coroutine instead of awaiting it in one of its own:
        # a middleware's coroutine stays alive as long as its connection, about 0.3 KiB per
        # open socket and layer (bench/memory.py).
        if scope["type"] in {"http", "websocket"}:
            heartbeat.ensure_started()
        return self.app(scope, receive, send)
