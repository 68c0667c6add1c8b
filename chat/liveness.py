"""Which server processes are alive, and ending the sessions of those that are not.

A live session exists only in the memory of the process that started it
(`ChatSession.owner_process` names it). Every server process keeps a
`ServerProcess` row fresh with a heartbeat; a process that stops beating for
`R2D2_PROCESS_STALE_SECONDS` (SIGKILL, crash, lost instance) is gone, and its
sessions, which nobody can answer or end any more, are ended as `orphaned`.

The heartbeat task starts with the process's first request (Daphne has no
start-up hook; on Elastic Beanstalk the load balancer's health check is that
first request) and sweeps for orphans at once and then every
`R2D2_ORPHAN_SWEEP_SECONDS`, so with several live processes each one cleans up
after the dead, and `manage.py end_orphaned_sessions` does it on demand.

Correct with several live processes because a process is judged only by its
own heartbeat, never by "not me": a session is orphaned when its owner has no
fresh row and the session is older than the staleness window (so a process
that has just started, and not yet written its first beat, is never swept).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from chat.models import ChatSession, EndReason, ServerProcess
from chat.operator import request_session_end
from chat.services import PROCESS_ID

logger = logging.getLogger(__name__)


def beat(process_id: str = PROCESS_ID) -> bool:
    """Record that this process is alive now; True when its row was (re)created."""
    _, created = ServerProcess.objects.update_or_create(
        process_id=process_id,
        defaults={"last_seen_at": timezone.now()},
        create_defaults={"last_seen_at": timezone.now(), "host": socket.gethostname(), "pid": os.getpid()},
    )
    return created


def is_alive(process_id: str, *, stale_after: float | None = None) -> bool:
    """Whether the process holding a session still beats (an empty id never does)."""
    stale_after = settings.R2D2_PROCESS_STALE_SECONDS if stale_after is None else stale_after
    return bool(process_id) and ServerProcess.objects.alive(stale_after=stale_after).filter(pk=process_id).exists()


def orphaned_sessions(*, stale_after: float | None = None):
    """Live sessions whose owning process has not beaten within `stale_after` seconds."""
    stale_after = settings.R2D2_PROCESS_STALE_SECONDS if stale_after is None else stale_after
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    fresh_owner = ServerProcess.objects.filter(pk=OuterRef("owner_process"), last_seen_at__gte=cutoff)
    return ChatSession.objects.live().filter(created_at__lt=cutoff).exclude(Exists(fresh_owner))


def sweep_orphans(*, stale_after: float | None = None) -> int:
    """End every orphaned session (reason `orphaned`) and forget processes long gone; returns how many ended."""
    stale_after = settings.R2D2_PROCESS_STALE_SECONDS if stale_after is None else stale_after
    ended = orphaned_sessions(stale_after=stale_after).update(ended_at=timezone.now(), end_reason=EndReason.ORPHANED)
    # A gone process's row is kept a while so that `end_session` can say whose it was.
    ServerProcess.objects.gone(stale_after=stale_after * 10).delete()
    if ended:
        logger.warning("orphaned sessions ended", extra={"count": ended, "swept_by": PROCESS_ID})
    return ended


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
        while True:
            try:
                now = timezone.now()
                if last_beat is not None and (now - last_beat).total_seconds() >= stale_after:
                    # Frozen (SIGSTOP, a paused VM) or cut off from the database for longer than the
                    # staleness window: other processes may have ended our sessions as orphaned.
                    silent_since, rechecks = last_beat, 3
                await database_sync_to_async(beat)()
                last_beat = now
                if rechecks:
                    # A sweep that began before this beat may still land: look again on the next ticks.
                    rechecks -= 1
                    await self._close_orphaned_here(silent_since)
                loop_time = asyncio.get_running_loop().time()
                if sweep_every > 0 and loop_time - last_sweep >= sweep_every:
                    last_sweep = loop_time
                    await database_sync_to_async(sweep_orphans)()
            except Exception as exc:  # the database may be down: keep beating, the health check reports it
                logger.warning("heartbeat failed", extra={"error": type(exc).__name__, "process": PROCESS_ID})
            await asyncio.sleep(interval)

    @staticmethod
    async def _close_orphaned_here(since: datetime) -> None:
        """Sessions this process still holds but that were ended as orphaned while it was silent:
        close them here too, so their clients get `session_end` (reason `orphaned`) instead of a
        conversation the database says is over."""
        orphaned = [
            session_id
            async for session_id in ChatSession.objects.filter(
                owner_process=PROCESS_ID, end_reason=EndReason.ORPHANED, ended_at__gte=since
            ).values_list("id", flat=True)
        ]
        for session_id in orphaned:
            await request_session_end(session_id, EndReason.ORPHANED)
        if orphaned:
            logger.warning("sessions found orphaned after a silence", extra={"count": len(orphaned)})


heartbeat = Heartbeat()

Scope = dict
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class HeartbeatMiddleware:
    """ASGI middleware: the process's first HTTP request or WebSocket starts the heartbeat."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] in {"http", "websocket"}:
            heartbeat.ensure_started()
        await self.app(scope, receive, send)
