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

import os
import socket
import uuid
from datetime import timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from chat.models import ChatSession, ServerProcess

# Identifies this server process in ChatSession.owner_process; unique across
# hosts and restarts (a reused pid gets a new suffix).
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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


def forget_gone(*, stale_after: float) -> None:
    """Delete the rows of processes silent for longer than `stale_after` seconds."""
    ServerProcess.objects.gone(stale_after=stale_after).delete()
