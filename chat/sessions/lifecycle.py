"""A session's life: started, claimed, released, ended; the only code that writes `ended_at`
and `fence`.

A live session is held by one holder (chat/sessions/holder.py) in one server process
(its `owner_process`, and `owner_channel`, that process's hub). Holding it is a lease:
`fence` grows at every claim, and a holder's writes are conditioned on the fence it
claimed, so of two processes that both think they hold a session only the newer can
write. Ending it from its holder is `end` (or `end_many` when sockets close). Ending it
from anywhere else (the admin, a management command, revocation, the heartbeat) is
`request_end`: it asks the holder over the channel layer, so the holder stops the
generation and tells its client, and ends it in the database directly when no holder
can answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from chat.accounts import reservations
from chat.accounts.principals import SessionLimit
from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus
from chat.ops import storage
from chat.sessions import liveness
from chat.turns import pgpool

logger = logging.getLogger(__name__)


async def start(
    *,
    model: str,
    client_address: str | None,
    owner_channel: str,
    resume_token_hash: str = "",
    user_id: int | None = None,
    api_key_id: int | None = None,
    continued_from_id: uuid.UUID | None = None,
    within: SessionLimit | None = None,
) -> ChatSession:
    """Record a new live session held here; `within`: its principal's limit of live sessions, held exactly."""
    session = ChatSession(
        model=model,
        client_address=client_address,
        owner_process=liveness.PROCESS_ID,
        owner_channel=owner_channel,
        resume_token_hash=resume_token_hash,
        user_id=user_id,
        api_key_id=api_key_id,
        continued_from_id=continued_from_id,
    )

    async def insert() -> None:
        if within is not None:
            await _insert_within(session, within)
        elif pgpool.enabled():
            await pgpool.insert(session)  # one per session, on the event loop like the turn's writes
        else:
            await session.asave(force_insert=True)

    async def inserted() -> tuple[bool, None]:
        # Its id is made here: a row with it is this INSERT's, committed before the connection dropped.
        return await ChatSession.objects.filter(id=session.id).aexists(), None

    await storage.retry(insert, recover=inserted, bounded=within is not None or not pgpool.enabled())
    session._state.adding, session._state.db = False, "default"
    return session


# A principal's limit of live sessions (issue 20) ------------------------------------
# Counting, then inserting, lets two starts in two processes both see one slot free. The
# count and the insert run in one transaction that first takes a lock named for the
# principal: on PostgreSQL a transaction-scoped advisory lock, on SQLite the write lock the
# transaction takes at its start (transaction_mode IMMEDIATE), which serialises every writer.


def _insert_within_sync(session: ChatSession, within: SessionLimit) -> None:
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [within.lock_id])
        live = ChatSession.objects.live().filter(within.live).count()
        if live >= within.limit:
            raise within.refusal(live)
        session.save(force_insert=True)


_insert_within = sync_to_async(_insert_within_sync)


async def release(session_id: uuid.UUID, *, fence: int | None = None) -> None:
    """This process stops holding a live resumable session (handed over, drained): any process may claim it.
    With `fence`, only while that lease is still the session's."""
    held = ChatSession.objects.filter(id=session_id, owner_process=liveness.PROCESS_ID, ended_at__isnull=True)
    if fence is not None:
        held = held.filter(fence=fence)
    now = timezone.now()
    write = lambda: storage.retry(lambda: held.aupdate(owner_process="", owner_channel="", released_at=now))  # noqa: E731
    await _now_or_later(write, "session release")


async def _now_or_later(write: Callable[[], Awaitable[int]], what: str) -> int:
    """A session's end or release, made by a holder that has already let go of the session here: past the
    retry window it is written once the database answers (storage.eventually, conditioned like the first try),
    never dropped. A live process's sessions are never swept, so one it let go of while the database was down
    would stay live, held by nobody, for as long as the process lives. Returns the rows changed (0 if deferred)."""
    try:
        return await write()
    except Exception as exc:
        if storage.connection_error(exc) is None:
            raise
        storage.eventually(write, what=what)
        return 0


_CLAIM = (
    f"UPDATE {ChatSession._meta.db_table} SET fence = fence + 1, owner_process = %s, owner_channel = %s, "
    "released_at = NULL WHERE id = %s AND owner_process = %s AND ended_at IS NULL RETURNING fence"
)


async def claim(session_id: uuid.UUID, *, from_owner: str, channel: str) -> int | None:
    """Become the holder of a live session still held by `from_owner` (released: ""): returns the new
    fence, or None when another process claimed it first, or it ended. One UPDATE, so of two claimants
    exactly one wins, and the fence it returns is larger than any earlier holder's."""
    recover = None
    if from_owner != liveness.PROCESS_ID:  # a claim that committed before the connection dropped left our name

        async def recover() -> tuple[bool, int | None]:
            row = (
                await ChatSession.objects.filter(id=session_id)
                .values("owner_process", "owner_channel", "fence")
                .afirst()
            )
            ours = row is not None and (row["owner_process"], row["owner_channel"]) == (liveness.PROCESS_ID, channel)
            return ours, row["fence"] if ours else None

    return await storage.retry(lambda: sync_to_async(_claim)(session_id, from_owner, channel), recover=recover)


def _claim(session_id: uuid.UUID, from_owner: str, channel: str) -> int | None:
    sid = ChatSession._meta.pk.get_db_prep_value(session_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM, [liveness.PROCESS_ID, channel, sid, from_owner])
        row = cursor.fetchone()
    return int(row[0]) if row else None


async def get(session_id: uuid.UUID) -> ChatSession | None:
    return await storage.retry(ChatSession.objects.filter(id=session_id).afirst)


_END = f"UPDATE {ChatSession._meta.db_table} SET ended_at = %s, end_reason = %s WHERE id = ANY(%s) AND ended_at IS NULL"


async def _end_live(session_ids: list[uuid.UUID], reason: EndReason, *, on_loop: bool = True) -> int:
    """End those of `session_ids` still live, in one statement; how many it ended.

    `on_loop`: on PostgreSQL, on the event loop's own connection (chat/turns/pgpool.py), as the
    consumers end their sessions. Otherwise through the ORM's connection, which sees what
    the caller's own transaction wrote (an operator's request: the admin, a command).
    """
    now = timezone.now()  # conditioned on `ended_at IS NULL`: a retry ends nothing twice
    if on_loop and pgpool.enabled():
        return await storage.retry(lambda: pgpool.execute(_END, (now, reason.value, session_ids)), bounded=False)
    live = ChatSession.objects.filter(id__in=session_ids, ended_at__isnull=True)
    return await storage.retry(lambda: live.aupdate(ended_at=now, end_reason=reason))


async def end(*, session_id: uuid.UUID, reason: EndReason, fence: int | None = None) -> bool:
    """Mark a live session ended; False if it had already ended (or, with `fence`, another holder has it)."""
    if fence is not None:
        held = ChatSession.objects.filter(id=session_id, ended_at__isnull=True, fence=fence)
        now = timezone.now()
        write = lambda: storage.retry(lambda: held.aupdate(ended_at=now, end_reason=reason))  # noqa: E731
        return bool(await _now_or_later(write, "session end"))
    return bool(await _now_or_later(lambda: _end_live([session_id], reason), "session end"))


async def end_many(*, session_ids: Sequence[uuid.UUID], reason: EndReason) -> None:
    """End live sessions; concurrent calls (a burst of closing sockets) share one UPDATE.

    Every async ORM call waits its turn on one thread. When 8,000 sockets closed at
    once, one UPDATE each took longer than Daphne's 10 s application close timeout,
    so Daphne killed most consumers before their sessions were ended. Calls made
    while an UPDATE is running join the next one instead.
    """
    if not session_ids:
        return
    loop = asyncio.get_running_loop()
    batch = _end_batches.get((loop, reason))
    if batch is None:
        batch = _end_batches[(loop, reason)] = (set(), loop.create_future())
        # The loop keeps only a weak reference to a task: hold it until it is done.
        task = loop.create_task(_end_batch(loop, reason))
        _end_batch_tasks.add(task)
        task.add_done_callback(_end_batch_tasks.discard)
    batch[0].update(session_ids)
    await asyncio.shield(batch[1])


_end_batches: dict[tuple[asyncio.AbstractEventLoop, EndReason], tuple[set[uuid.UUID], asyncio.Future]] = {}
_end_batch_tasks: set[asyncio.Task] = set()


async def _end_batch(loop: asyncio.AbstractEventLoop, reason: EndReason) -> None:
    await asyncio.sleep(0)  # let the other sockets closing in this loop turn join
    session_ids, done = _end_batches.pop((loop, reason))
    try:
        await _now_or_later(lambda: _end_live(list(session_ids), reason), "session end")
    except Exception as exc:
        done.set_exception(exc)
        done.exception()  # retrieved here too, so an unawaited failure is not reported twice
    else:
        done.set_result(None)


def end_orphaned(*, stale_after: float | None = None) -> int:
    """End every session whose process is gone (reason `orphaned`) and forget processes long gone.

    Returns how many sessions ended."""
    stale_after = settings.R2D2_PROCESS_STALE_SECONDS if stale_after is None else stale_after
    candidates = liveness.orphaned_sessions(stale_after=stale_after)
    abandoned = _release_or_abandon(candidates.exclude(resume_token_hash=""))
    orphaned = list(candidates.filter(resume_token_hash="").values_list("id", flat=True))
    # The fence grows too: a process judged gone by mistake (paused, cut off) can write nothing more.
    now = timezone.now()
    ended = candidates.filter(id__in=orphaned).update(ended_at=now, end_reason=EndReason.ORPHANED, fence=F("fence") + 1)
    # A reply that was streaming when its process died stays as far as it got.
    ChatMessage.objects.filter(session_id__in=orphaned, status=MessageStatus.INCOMPLETE).update(
        status=MessageStatus.INTERRUPTED
    )
    _drop_queued((_ended_at(now, EndReason.ORPHANED) if ended else []) + abandoned)
    # A gone process's row is kept a while so that `end_session` can say whose it was.
    liveness.forget_gone(stale_after=stale_after * 10)
    if ended:
        logger.warning("orphaned sessions ended", extra={"count": ended, "swept_by": liveness.PROCESS_ID})
    return ended


def _drop_queued(session_ids: list[uuid.UUID]) -> None:
    """Sessions ended with nobody holding them: their queued messages will never be answered. Each is marked
    `failed` (as a holder marks those it drops), and what it reserved of its principal's quota, which its dead
    holder kept in the shared counters, is given back once (chat/accounts/reservations.py)."""
    if not session_ids:
        return
    ChatMessage.objects.filter(session_id__in=session_ids, status=MessageStatus.ACCEPTED).update(
        status=MessageStatus.FAILED
    )
    try:
        async_to_sync(reservations.release_left)(session_ids)
    except Exception as exc:  # Redis is down: they stay held until their day's counter resets
        logger.warning("reservations of ended sessions not released", extra={"error": type(exc).__name__})


def _release_or_abandon(resumable) -> list[uuid.UUID]:
    """Resumable sessions nobody holds wait for their client to resume them elsewhere: those of a
    gone process are released (now, so the window starts now; a reply it was streaming is marked
    interrupted), and those released longer than R2D2_RESUME_WINDOW_SECONDS ago end as abandoned
    (returned)."""
    now = timezone.now()
    held_by_the_gone = resumable.exclude(owner_process="")
    gone_ids = list(held_by_the_gone.values_list("id", flat=True))
    if gone_ids:
        # Conditioned again in the UPDATE (a client may have claimed one meanwhile); the fence grows,
        # so a holder judged gone by mistake loses its lease, never the conversation.
        held_by_the_gone.filter(id__in=gone_ids).update(
            owner_process="", owner_channel="", released_at=now, fence=F("fence") + 1
        )
        ChatMessage.objects.filter(session_id__in=gone_ids, status=MessageStatus.INCOMPLETE).update(
            status=MessageStatus.INTERRUPTED
        )
        logger.warning("resumable sessions of a gone process released", extra={"count": len(gone_ids)})
    horizon = now - timedelta(seconds=settings.R2D2_RESUME_WINDOW_SECONDS)
    abandoned = resumable.filter(owner_process="").filter(Q(released_at__lt=horizon) | Q(released_at__isnull=True))
    count = abandoned.update(ended_at=now, end_reason=EndReason.ABANDONED)
    if count:
        logger.info("released resumable sessions abandoned", extra={"count": count})
    return _ended_at(now, EndReason.ABANDONED) if count else []


def _ended_at(moment, reason: EndReason) -> list[uuid.UUID]:
    """The sessions one sweep's UPDATE ended (its moment is its own): not those a client claimed meanwhile."""
    return list(ChatSession.objects.filter(ended_at=moment, end_reason=reason).values_list("id", flat=True))


# Ending a session from outside its consumer ---------------------------------------


class Ended(enum.Enum):
    """How `request_end` went."""

    NOT_FOUND = "not found"
    ALREADY = "had already ended"
    REQUESTED = "asked its owner (not waited for)"
    BY_OWNER = "ended by its owner, which told its client"
    OWNER_GONE = "owner process gone: ended in the database"
    OWNER_UNREACHABLE = "owner unreachable (in-memory channel layer): ended in the database"
    NO_CONFIRMATION = "owner did not confirm in time: ended in the database"

    @property
    def in_database(self) -> bool:
        return self in {Ended.OWNER_GONE, Ended.OWNER_UNREACHABLE, Ended.NO_CONFIRMATION}


async def request_end(
    session_id: uuid.UUID | str, reason: EndReason = EndReason.OPERATOR, *, wait: float = 0.0
) -> Ended:
    """End a live session wherever it is held.

    The owner, reached over the channel layer, stops any generation, records
    `reason` and sends its client `session_end`; with `wait` > 0 this waits that
    long for it to confirm. When the owner cannot answer (its process stopped
    beating, or an in-memory channel layer cannot reach another process) or does
    not confirm in time, the session is ended in the database directly: its next
    message is then refused as `session_ended` wherever it arrives.
    """
    session_id = uuid.UUID(str(session_id))
    session = await get(session_id)
    if session is None:
        return Ended.NOT_FOUND
    if not session.is_live:
        return Ended.ALREADY
    outcome = await _ask_owner(session, reason, wait)
    if outcome.in_database:
        if not await _end_live([session_id], reason, on_loop=False):
            return Ended.ALREADY  # its owner ended it meanwhile
        await sync_to_async(_left_open)([session_id])
    return outcome


def _left_open(session_ids: list[uuid.UUID]) -> None:
    """Sessions ended in the database, their holder gone or silent: a reply it left streaming stays as far as it
    got, marked interrupted (never `incomplete` in an ended session), and its queued messages are failed."""
    ChatMessage.objects.filter(session_id__in=session_ids, status=MessageStatus.INCOMPLETE).update(
        status=MessageStatus.INTERRUPTED
    )
    _drop_queued(session_ids)


async def _ask_owner(session: ChatSession, reason: EndReason, wait: float) -> Ended:
    here = session.owner_process == liveness.PROCESS_ID
    if isinstance(get_channel_layer(), InMemoryChannelLayer) and not here:
        return Ended.OWNER_UNREACHABLE
    if not here and not await _alive(session.owner_process):
        if not liveness.own_view.clear():
            # Its beats may have stopped with ours (an outage this process saw): if it is alive, it tells its client.
            await tell_holder(session, reason)
        return Ended.OWNER_GONE
    await tell_holder(session, reason)
    if wait <= 0:
        return Ended.REQUESTED
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        if await ChatSession.objects.filter(id=session.id, ended_at__isnull=False).aexists():
            return Ended.BY_OWNER
        # Killed after it was asked: judged by its heartbeat, so this ends as soon as it goes stale.
        if not here and liveness.own_view.clear() and not await _alive(session.owner_process):
            return Ended.OWNER_GONE
    return Ended.NO_CONFIRMATION


async def tell_holder(session: ChatSession, reason: EndReason) -> None:
    """Ask the holder of `session` to end it: it stops any generation, records `reason` (unless the
    session already ended) and sends its client `session_end`.

    The event goes to the owner's channel, its process's hub, saved on the session: a channel
    name routes across a Redis restart, where group membership would be gone.
    """
    if session.owner_channel:
        event = {"type": "session.end", "session_id": str(session.id), "reason": reason.value}
        await get_channel_layer().send(session.owner_channel, event)


_alive = sync_to_async(liveness.is_alive)


def request_end_now(session_id: uuid.UUID | str, reason: EndReason = EndReason.OPERATOR, *, wait: float = 0.0) -> Ended:
    """Sync entry point for the admin and management commands."""
    return async_to_sync(request_end)(session_id, reason, wait=wait)


def end_withdrawn(sender, session_ids: Sequence[uuid.UUID], **kwargs) -> None:
    """`auth.sessions_withdrawn` (a key revoked, a user deactivated): end those sessions, reason `revoked`."""
    async_to_sync(_end_withdrawn)(session_ids)


async def _end_withdrawn(session_ids: Sequence[uuid.UUID]) -> None:
    # Each holder is asked over the channel layer; one that does not confirm within 3 s (or is gone)
    # has its session ended in the database, so a resume is refused as `session_ended` either way.
    await asyncio.gather(
        *(request_end(session_id, EndReason.REVOKED, wait=3.0) for session_id in session_ids),
        return_exceptions=True,
    )
