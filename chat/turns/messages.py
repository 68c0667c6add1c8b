"""Saving what is said in a session: the user's messages and the model's replies.

Only `Conversation` (the owner of a turn) calls these. In the usual turn (no new
system message) each is one statement: on PostgreSQL it runs on the event loop
(chat/turns/pgpool.py), elsewhere on the ORM's database thread.
"""

from __future__ import annotations

import uuid

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.protocol.errors import ClientError, ErrorCode
from chat.turns import pgpool

_MESSAGES, _SESSIONS = ChatMessage._meta.db_table, ChatSession._meta.db_table

# The ORM would need two round trips (a SELECT for "still live?" then the INSERT): this is
# the hot path of every turn, so it is one INSERT ... SELECT ... WHERE EXISTS.
_INSERT_IF_LIVE = (
    f"INSERT INTO {_MESSAGES} "
    "(session_id, role, content, created_at, status, model, prompt_tokens, completion_tokens, latency_ms, "
    "client_message_id) "
    "SELECT %s, %s, %s, %s, %s, '', NULL, NULL, NULL, '' "
    f"WHERE EXISTS (SELECT 1 FROM {_SESSIONS} WHERE id = %s AND ended_at IS NULL)"
)
_INSERT_REPLY = (
    f"INSERT INTO {_MESSAGES} "
    "(session_id, role, content, created_at, status, model, prompt_tokens, completion_tokens, latency_ms, "
    "client_message_id) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '') RETURNING id"
)
_EXTEND_REPLY = (
    f"UPDATE {_MESSAGES} SET content = content || %s, "
    "prompt_tokens = %s, completion_tokens = %s, latency_ms = %s, status = %s WHERE id = %s"
)


def _insert_if_live(session_id: uuid.UUID, role: str, content: str) -> bool:
    """Insert a message only while its session is live, in one statement; False when it has ended."""
    sid = ChatSession._meta.pk.get_db_prep_value(session_id, connection)
    created = ChatMessage._meta.get_field("created_at").get_db_prep_value(timezone.now(), connection)
    with connection.cursor() as cursor:
        cursor.execute(_INSERT_IF_LIVE, [sid, role, content, created, MessageStatus.COMPLETE.value, sid])
        return cursor.rowcount == 1


def _save_user_message(session_id: uuid.UUID, content: str, system_message: str | None) -> None:
    if system_message is None:
        # Ended elsewhere (an operator's command on another process, the orphan sweep):
        # the database is the authority, whichever path ended it.
        if not _insert_if_live(session_id, Role.USER.value, content):
            raise session_ended()
        return
    live = ChatSession.objects.live().filter(id=session_id)
    with transaction.atomic():
        if not live.update(system_message=system_message):
            raise session_ended()
        ChatMessage.objects.create(session_id=session_id, role=Role.SYSTEM, content=system_message)
        ChatMessage.objects.create(session_id=session_id, role=Role.USER, content=content)


def session_ended() -> ClientError:
    return ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")


async def save_user_message(*, session_id: uuid.UUID, content: str, system_message: str | None) -> None:
    """Save the user's message (and a changed system message) when it is accepted, before the model is called.

    Raises ClientError(session_ended) when the database says the session is over.
    """
    if system_message is None and pgpool.enabled():
        params = (session_id, Role.USER.value, content, timezone.now(), MessageStatus.COMPLETE.value, session_id)
        if not await pgpool.execute(_INSERT_IF_LIVE, params):
            raise session_ended()
        return
    return await sync_to_async(_save_user_message)(session_id, content, system_message)


async def save_reply(
    *,
    session_id: uuid.UUID,
    content: str,
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: int | None,
    status: MessageStatus = MessageStatus.COMPLETE,
) -> int:
    """Save the model's reply as a new row; returns its id."""
    if pgpool.enabled():
        params = (session_id, Role.ASSISTANT.value, content, timezone.now(), status.value, model)
        return await pgpool.fetch_value(_INSERT_REPLY, (*params, prompt_tokens, completion_tokens, latency_ms))
    row = await ChatMessage.objects.acreate(
        session_id=session_id,
        role=Role.ASSISTANT,
        content=content,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        status=status,
    )
    return row.id


async def extend_reply(
    *,
    row_id: int,
    more: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: int | None,
    status: MessageStatus,
) -> None:
    """Append `more` to a reply saved earlier (a checkpoint) and update its status.

    Appending in the database keeps each statement as small as the text added
    since the last save: rewriting a long reply once a second would send it
    whole each time (and the database driver keeps buffers the size of the
    largest statement it sent).
    """
    if pgpool.enabled():
        await pgpool.execute(_EXTEND_REPLY, (more, prompt_tokens, completion_tokens, latency_ms, status.value, row_id))
        return
    await ChatMessage.objects.filter(id=row_id).aupdate(
        content=Concat(F("content"), Value(more)) if more else F("content"),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        status=status,
    )
