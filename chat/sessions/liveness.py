"""Which server processes are alive, and ending the sessions of those that are not.

A live session exists only in the memory of the process that started it
(`ChatSession.owner_process` names it). Every server process keeps a
`ServerProcess` row fresh with a heartbeat; a process that stops beating for
`R2D2_PROCESS_STALE_SECONDS` (SIGKILL, crash, lost instance) is gone, and its
sessions, which nobody can answer or end any more, are ended as `orphaned`.

The heartbeat task starts with the process's first request (Daphne has no
start-up hook; on Elastic Beanstalk the load balancer's health check is that
first request) and sweeps for orphans every `R2D2_ORPHAN_SWEEP_SECONDS` (the
first time once its own beats are steady, below), so with several live processes
each one cleans up after the dead, and `manage.py end_orphaned_sessions` does it
on demand.

Correct with several live processes because a process is judged only by its
own heartbeat, never by "not me": a session is orphaned when its owner has no
fresh row and the session is older than the staleness window (so a process
that has just started, and not yet written its first beat, is never swept).

A stale row is evidence only if the judge's own view of the database does not
explain it (`OwnView`): a database outage stops every process's beats at once, so
the first process whose beat gets through afterwards sees every other process
stale, though they are alive and beat again a moment later. A process judges
others gone only once its own beats have reached the database without a gap for
the staleness window (`steady`: the sweep, which ends or releases every session of
the processes it judges gone), or for two heartbeats, by which time every live
process has beaten again (`clear`: one resume's or one end's judgement, which a
client is waiting for). Liveness lives in the database only: a Redis outage makes
nobody look gone.
"""

from __future__ import annotations

import os
import socket
import time
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


class OwnView:
    """Whether this process's own view of the database lets it judge others by their heartbeats.

    Another process's row goes stale when that process stops beating, and also when nobody could
    write: the same outage (or the same frozen host) that stopped its beats stopped ours. So after
    any gap in our own beats (a beat that failed, or one that came more than half the staleness
    window, and two heartbeats, after the last) we wait until ours have reached the database without a gap for the
    staleness window: by then every live process has beaten again. A process without a heartbeat
    (a management command, R2D2_HEARTBEAT_SECONDS=0) reads the rows once, as they are: `clear`.
    """

    def __init__(self) -> None:
        self.since: float | None = None  # when the present run of beats without a gap began (monotonic)
        self.last: float | None = None  # the last beat that reached the database
        self.troubled = False  # a beat failed or came late since this process started

    def reached(self, now: float | None = None) -> None:
        """A beat reached the database."""
        now = time.monotonic() if now is None else now
        late = max(settings.R2D2_PROCESS_STALE_SECONDS / 2, 2 * settings.R2D2_HEARTBEAT_SECONDS)
        if self.last is not None and now - self.last > late:
            self.missed()  # frozen, or the event loop stalled: everyone's rows may have aged with ours
        if self.since is None:
            self.since = now
        self.last = now

    def missed(self) -> None:
        """A beat did not reach the database (it failed, or came late)."""
        self.since, self.troubled = None, True

    def steady(self, stale_after: float | None = None, now: float | None = None) -> bool:
        """Our beats have reached the database without a gap for the staleness window (the sweep's rule:
        the first sweep after start-up or after an outage waits that long)."""
        stale_after = settings.R2D2_PROCESS_STALE_SECONDS if stale_after is None else stale_after
        now = time.monotonic() if now is None else now
        return self.since is not None and now - self.since >= stale_after

    def clear(self, now: float | None = None) -> bool:
        """Nothing has cut us off since we started, or our beats have gone through for two heartbeats since (a
        live process beats within one of the database answering again): a stale row is not our doing. Shorter
        than `steady`: a client waits on this judgement (its resume of a dead process's session)."""
        window = min(settings.R2D2_PROCESS_STALE_SECONDS, 2 * settings.R2D2_HEARTBEAT_SECONDS)
        return not self.troubled or self.steady(window, now)


#: This process's own view, kept by its heartbeat (chat/sessions/heartbeat.py).
own_view = OwnView()


def is_alive(process_id: str, *, stale_after: float | None = None) -> bool:
    """Whether the process holding a session still beats (an empty id never does). A False is evidence
    only while `own_view.clear()`."""
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
