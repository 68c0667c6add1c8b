"""Saving what is said in a session, and a turn's state on its rows.

Only `Conversation` (the owner of a turn) and the holder that takes a session over
call these. Every write of a turn is conditioned on the holder's fence
(`ChatSession.fence`, chat/sessions/lifecycle.py): a holder that lost the session
(taken over, judged dead by mistake, paused) writes nothing more and gets `Fenced`.
In the usual turn (no new system message) each write is one statement: on
PostgreSQL it runs on the event loop (chat/turns/pgpool.py), elsewhere on the ORM's
database thread.

Every call here is retried across a storage outage (chat/ops/storage.py), so each write is safe to run
twice: an INSERT is looked for (by its session and its `created_at`, made once before the first attempt)
before it is tried again, an append to a reply rewrites the text after what was saved (`substr`), and a
status is set, not toggled.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
from asgiref.sync import sync_to_async
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.ops import storage
from chat.protocol.errors import ClientError, ErrorCode
from chat.turns import pgpool, tree

_MESSAGES, _SESSIONS = ChatMessage._meta.db_table, ChatSession._meta.db_table
_HELD = f"EXISTS (SELECT 1 FROM {_SESSIONS} WHERE id = %s AND fence = %s)"
_HELD_LIVE = f"EXISTS (SELECT 1 FROM {_SESSIONS} WHERE id = %s AND fence = %s AND ended_at IS NULL)"
_COLUMNS = (
    "(session_id, role, content, created_at, status, model, prompt_tokens, completion_tokens, latency_ms, "
    "reply_to_id, client_message_id, stream, requested_model, parent_id)"
)

# The ORM would need two round trips (a SELECT for "still ours?" then the INSERT): this is
# the hot path of every turn, so each write is one statement that checks the fence itself.
_INSERT_USER = (
    f"INSERT INTO {_MESSAGES} {_COLUMNS[:-1]}, version_of_id) "
    f"SELECT %s, %s, %s, %s, %s, '', NULL, NULL, NULL, NULL, %s, %s, '', %s, %s WHERE {_HELD_LIVE} RETURNING id"
)
_INSERT_REPLY = (
    f"INSERT INTO {_MESSAGES} {_COLUMNS} "
    f"SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '', FALSE, %s, %s WHERE {_HELD} RETURNING id"
)
# The text after the `saved` characters the row held is rewritten, so a retried append (its first
# attempt committed just before the connection dropped) does not add the text twice.
_EXTEND_REPLY = (
    f"UPDATE {_MESSAGES} SET content = substr(content, 1, %s) || %s, "
    f"prompt_tokens = %s, completion_tokens = %s, latency_ms = %s, status = %s WHERE id = %s AND {_HELD}"
)
_SET_STATUS = f"UPDATE {_MESSAGES} SET status = %s WHERE id = %s AND {_HELD}"
# An INSERT whose connection broke may have committed: before it is tried again, its row is looked for.
_WRITTEN = f"SELECT id FROM {_MESSAGES} WHERE session_id = %s AND role = %s AND created_at = %s"
# A turn starts: its message takes its place in the tree (a post's parent is the leaf now; an edit's was set).
# Only a message still waiting (or started by this same statement, retried): one an earlier holder failed is not.
_START = (
    f"UPDATE {_MESSAGES} SET status = %s, parent_id = COALESCE(parent_id, %s) "
    f"WHERE id = %s AND status IN ('{MessageStatus.ACCEPTED.value}', %s) AND {_HELD}"
)
# A turn that failed for want of storage: under the lease as any status; without it (the session changed hands
# before the database came back) only while nobody has started the message.
_FAIL = (
    f"UPDATE {_MESSAGES} SET status = '{MessageStatus.FAILED.value}' "
    f"WHERE id = %s AND session_id = %s AND (status = '{MessageStatus.ACCEPTED.value}' OR {_HELD})"
)
# A regeneration waits as an empty reply row (so that it is queued, resent and taken over as a post is).
_INSERT_REGENERATION = (
    f"INSERT INTO {_MESSAGES} {_COLUMNS} "
    f"SELECT %s, %s, '', %s, %s, %s, NULL, NULL, NULL, %s, %s, %s, '', %s WHERE {_HELD_LIVE} RETURNING id"
)
_MOVE_ANCHOR = f"UPDATE {_SESSIONS} SET branch_anchor = %s WHERE id = %s AND fence = %s AND ended_at IS NULL"


class Fenced(Exception):
    """This process no longer holds the session (another took it over): it may write nothing more."""


class Duplicate(Exception):
    """The session already has a message with that `client_message_id` (a resend)."""


def session_ended() -> ClientError:
    return ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")


@dataclass(frozen=True, slots=True)
class Lease:
    """Who may write a session's turns: its id and the holder's fence."""

    session_id: uuid.UUID
    fence: int


async def _run(
    sql: str, params: Sequence[object], *, returning: bool, written: tuple[uuid.UUID, str, object] | None = None
) -> object | None:
    """One statement, retried across a storage outage: on the loop's own connection on PostgreSQL, else on
    the ORM's thread. `written`: an INSERT's (session, role, created_at), looked for before it is retried."""
    recover = None
    if written is not None:

        async def recover() -> tuple[bool, object | None]:
            row_id = await _once(_WRITTEN, written, returning=True)
            return row_id is not None, row_id

    call = lambda: _once(sql, params, returning=returning)  # noqa: E731
    return await storage.retry(call, recover=recover, bounded=not pgpool.enabled())


async def _once(sql: str, params: Sequence[object], *, returning: bool) -> object | None:
    if pgpool.enabled():
        if returning:
            return await pgpool.fetch_value(sql, params)
        return await pgpool.execute(sql, params)
    return await sync_to_async(_run_on_orm)(sql, params, returning)


def _run_on_orm(sql: str, params: Sequence[object], returning: bool) -> object | None:
    prepared = [_prepare(value) for value in params]
    with connection.cursor() as cursor:
        cursor.execute(sql, prepared)
        if returning:
            row = cursor.fetchone()
            return row[0] if row else None
        return cursor.rowcount


def _prepare(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return ChatSession._meta.pk.get_db_prep_value(value, connection)
    if hasattr(value, "tzinfo"):
        return ChatMessage._meta.get_field("created_at").get_db_prep_value(value, connection)
    return value


async def _why_not(lease: Lease) -> Exception:
    """A conditioned write changed nothing: the session ended, or another holder has it."""
    rows = ChatSession.objects.filter(id=lease.session_id).values("fence", "ended_at")
    row = await storage.retry(rows.afirst)
    if row is not None and row["fence"] != lease.fence:
        return Fenced()
    return session_ended()


async def save_user_message(
    lease: Lease,
    *,
    content: str,
    system_message: str | None,
    client_message_id: str = "",
    stream: bool = False,
    started: bool = False,
    parent_id: int | None = None,
    version_of: int | None = None,
) -> int:
    """Save the user's message as `accepted` (`started` when its turn begins at once), and a changed
    system message, before the model is called; returns its row id. Raises ClientError(session_ended)
    when the session is over, `Fenced` when it is no longer this holder's. `parent_id`: its place in the
    tree when known now (a turn starting at once, an edit); else its turn's start sets it. `version_of`: the
    message an edit is a new version of."""
    try:
        if system_message is None:
            status = MessageStatus.STARTED if started else MessageStatus.ACCEPTED
            now = timezone.now()
            params = (lease.session_id, Role.USER.value, content, now, status.value)
            params += (client_message_id, stream, parent_id, version_of, lease.session_id, lease.fence)
            row_id = await _run(_INSERT_USER, params, returning=True, written=(lease.session_id, Role.USER.value, now))
        else:
            since = timezone.now()
            save = sync_to_async(_save_with_system_message)

            async def recover() -> tuple[bool, int | None]:
                # Its transaction committed before the connection dropped: this holder's only user row since.
                rows = ChatMessage.objects.filter(
                    session_id=lease.session_id, role=Role.USER, content=content, created_at__gte=since
                )
                row = await rows.values_list("id", flat=True).afirst()
                return row is not None, row

            call = lambda: save(lease, content, system_message, client_message_id, stream, started, parent_id)  # noqa: E731
            row_id = await storage.retry(call, recover=recover)
    except (IntegrityError, psycopg.errors.UniqueViolation):
        # Two resends raced past `original()`: the unique index on (session, client_message_id) decides.
        raise Duplicate() from None
    if row_id is None:
        raise await _why_not(lease)
    return int(row_id)


def _save_with_system_message(
    lease: Lease,
    content: str,
    system_message: str,
    client_message_id: str,
    stream: bool,
    started: bool,
    parent_id: int | None,
) -> int | None:
    held = ChatSession.objects.live().filter(id=lease.session_id, fence=lease.fence)
    with transaction.atomic():
        if not held.update(system_message=system_message):
            return None
        ChatMessage.objects.create(session_id=lease.session_id, role=Role.SYSTEM, content=system_message)
        row = ChatMessage.objects.create(
            session_id=lease.session_id,
            role=Role.USER,
            content=content,
            status=MessageStatus.STARTED if started else MessageStatus.ACCEPTED,
            client_message_id=client_message_id,
            stream=stream,
            parent_id=parent_id,
        )
        return row.id


async def save_reply(
    lease: Lease,
    *,
    reply_to: int | None,
    content: str,
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: int | None,
    status: MessageStatus = MessageStatus.COMPLETE,
    requested_model: str = "",
    created_at: datetime | None = None,
) -> int:
    """Save the model's reply to the user message `reply_to` as a new row; returns its id. `model`: the
    model that answered; `requested_model`: the one asked for (they differ when a fallback chain moved on).
    `created_at`: the same for every attempt of one reply's first save, so that an attempt that committed
    unanswered is found."""
    now = created_at or timezone.now()
    params = (lease.session_id, Role.ASSISTANT.value, content, now, status.value, model)
    usage = (prompt_tokens, completion_tokens, latency_ms, reply_to, requested_model, reply_to)  # parent: its message
    written = (lease.session_id, Role.ASSISTANT.value, now)
    row_id = await _run(
        _INSERT_REPLY, (*params, *usage, lease.session_id, lease.fence), returning=True, written=written
    )
    if row_id is None:
        raise Fenced()
    return int(row_id)


async def extend_reply(
    lease: Lease,
    *,
    row_id: int,
    saved: int,
    more: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: int | None,
    status: MessageStatus,
) -> None:
    """Append `more` to a reply saved earlier (a checkpoint) whose row holds `saved` characters, and update its
    status (safe to retry: the row ends as its first `saved` characters and `more`, however often it runs).

    Appending in the database keeps each statement as small as the text added
    since the last save: rewriting a long reply once a second would send it
    whole each time (and the database driver keeps buffers the size of the
    largest statement it sent).
    """
    params = (saved, more, prompt_tokens, completion_tokens, latency_ms, status.value, row_id)
    params += (lease.session_id, lease.fence)
    if not await _run(_EXTEND_REPLY, params, returning=False):
        raise Fenced()


async def set_status(lease: Lease, row_id: int, status: MessageStatus) -> None:
    """A turn ended without a reply row (failed, cancelled or interrupted before a word): its user message says so."""
    if not await _run(_SET_STATUS, (status.value, row_id, lease.session_id, lease.fence), returning=False):
        raise Fenced()


async def written(session_id: uuid.UUID, role: Role, created_at: datetime) -> int | None:
    """The row an INSERT made with that `created_at` in that session, if it committed (its connection broke
    before it said so, and the retries ran out of time)."""
    row_id = await _run(_WRITTEN, (session_id, role.value, created_at), returning=True)
    return int(row_id) if row_id is not None else None
async def start_turn(lease: Lease, row_id: int, parent_id: int | None, status: MessageStatus) -> bool:
    """A waiting message's turn begins: recorded as `status` (a user message `started`, a regeneration
    `incomplete`), and placed in the tree under `parent_id` unless it was placed when saved (an edit).
    False when the message no longer waits: an earlier holder told its client that its turn failed
    (`storage_unavailable`) and marked it so (`fail_turn`); it is never answered after that."""
    params = (status.value, parent_id, row_id, status.value, lease.session_id, lease.fence)
    if await _run(_START, params, returning=False):
        return True
    rows = ChatSession.objects.filter(id=lease.session_id, fence=lease.fence)
    if not await storage.retry(rows.aexists):
        raise Fenced()
    return False


async def fail_turn(lease: Lease, row_id: int) -> None:
    """A message whose turn failed before the model was called, the storage down past the retry window (its
    client was told `storage_unavailable`, "send it again"), is marked `failed`, so that nobody answers it
    later: under the lease whatever its status; without it (the session changed hands before the database
    came back) only while nobody has started it."""
    await _run(_FAIL, (row_id, lease.session_id, lease.session_id, lease.fence), returning=False)


async def save_regeneration(
    lease: Lease, *, answering: int, model: str, client_message_id: str = "", stream: bool = False, started: bool
) -> int:
    """A regeneration accepted: an empty reply to `answering`, its sibling replies' new version, `accepted` until
    its turn starts (`incomplete` when it starts at once); its turn writes the text into it. Returns its id."""
    status = MessageStatus.INCOMPLETE if started else MessageStatus.ACCEPTED
    params = (lease.session_id, Role.ASSISTANT.value, timezone.now(), status.value, model, answering)
    params += (client_message_id, stream, answering, lease.session_id, lease.fence)
    try:
        row_id = await _run(_INSERT_REGENERATION, params, returning=True)
    except (IntegrityError, psycopg.errors.UniqueViolation):
        raise Duplicate() from None
    if row_id is None:
        raise await _why_not(lease)
    return int(row_id)


async def move_anchor(lease: Lease, message_id: int | None) -> None:
    """The current branch is now the one below `message_id` (chat/turns/tree.py)."""
    if not await _run(_MOVE_ANCHOR, (message_id, lease.session_id, lease.fence), returning=False):
        raise await _why_not(lease)


def _tree_of(session_id: uuid.UUID) -> tuple[list[tree.Node], int | None]:
    anchor = ChatSession.objects.filter(id=session_id).values_list("branch_anchor", flat=True).first()
    rows = ChatMessage.objects.filter(session_id=session_id).exclude(role=Role.SYSTEM).order_by("id")
    fields = ("id", "parent_id", "role", "content", "status")
    return [tree.Node(*row) for row in rows.values_list(*fields)], anchor


#: A session's messages as tree nodes and its branch anchor: one query for all its messages, whatever their number.
tree_of = sync_to_async(_tree_of)


@dataclass(frozen=True, slots=True)
class Original:
    """The message a resend repeats: its row, its status, and its reply's status if it has one."""

    row_id: int
    status: str
    reply_status: str | None


async def original(session_id: uuid.UUID, client_message_id: str) -> Original | None:
    """The session's message with that `client_message_id`, if any: one lookup on a unique index."""
    rows = ChatMessage.objects.filter(session_id=session_id, client_message_id=client_message_id)
    row = await storage.retry(rows.values("id", "status", "role").afirst)
    if row is None:
        return None
    if row["role"] == Role.ASSISTANT:  # a regeneration: its own row is the reply
        waiting = row["status"] == MessageStatus.ACCEPTED
        return Original(row["id"], row["status"], None if waiting else row["status"])
    replies = ChatMessage.objects.filter(reply_to_id=row["id"]).order_by("-id").values("status")
    reply = await storage.retry(replies.afirst)
    return Original(row["id"], row["status"], reply["status"] if reply else None)


# A session taken over: what its last holder left -----------------------------------


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A user message saved but not answered: the new holder answers it."""

    row_id: int
    content: str
    stream: bool
    role: str = Role.USER.value  # an assistant row is a regeneration of the reply to `reply_to`
    parent_id: int | None = None  # set for an edit, and for a regeneration
    reply_to: int | None = None
    version_of: int | None = None  # an edit: the message it is a new version of


async def interrupt_open_turns(lease: Lease) -> None:
    """What a dead, fenced or drained holder left open is interrupted: replies left streaming, and
    messages whose turn started but left no reply (even a failure it could not record: the database
    was down). They are never answered twice."""

    def mark() -> None:
        with transaction.atomic():
            if not ChatSession.objects.filter(id=lease.session_id, fence=lease.fence).exists():
                raise Fenced()
            rows = ChatMessage.objects.filter(session_id=lease.session_id)
            rows.filter(status=MessageStatus.INCOMPLETE).update(status=MessageStatus.INTERRUPTED)
            replies = ChatMessage.objects.filter(reply_to=OuterRef("pk"))
            started = rows.filter(role=Role.USER, status=MessageStatus.STARTED).filter(~Exists(replies))
            started.update(status=MessageStatus.INTERRUPTED)

    await storage.retry(sync_to_async(mark))  # the same statements again change nothing more


async def unanswered(session_id: uuid.UUID) -> list[Unanswered]:
    """The session's user messages and regenerations still waiting (`accepted`, never started), oldest first."""
    replies = ChatMessage.objects.filter(reply_to=OuterRef("pk"))
    rows = ChatMessage.objects.filter(session_id=session_id, status=MessageStatus.ACCEPTED).filter(
        (Q(role=Role.USER) & ~Exists(replies)) | Q(role=Role.ASSISTANT)
    )

    async def read() -> list[Unanswered]:
        return [
            Unanswered(r.id, r.content, r.stream, r.role, r.parent_id, r.reply_to_id, r.version_of_id)
            async for r in rows.order_by("id")
        ]

    return await storage.retry(read)
