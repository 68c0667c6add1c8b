"""Saving what is said in a session: the user's messages and the model's replies.

Only `Conversation` (the owner of a turn) calls these. Each is one trip to the
database thread: a turn costs one for the user's message and one for the reply,
and (in the usual turn, with no new system message) one statement each.
"""

from __future__ import annotations

import uuid

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from chat.errors import ClientError, ErrorCode
from chat.models import ChatMessage, ChatSession, MessageStatus, Role


def _insert_if_live(session_id: uuid.UUID, role: str, content: str) -> bool:
    """Insert a message only while its session is live, in one statement; False when it has ended.

    The ORM would need two round trips (a SELECT for "still live?" then the INSERT): this is
    the hot path of every turn, so it is one INSERT ... SELECT ... WHERE EXISTS.
    """
    message, session = ChatMessage._meta, ChatSession._meta
    sql = (
        f"INSERT INTO {message.db_table} "
        "(session_id, role, content, created_at, status, model, prompt_tokens, completion_tokens, latency_ms) "
        "SELECT %s, %s, %s, %s, %s, '', NULL, NULL, NULL "
        f"WHERE EXISTS (SELECT 1 FROM {session.db_table} WHERE id = %s AND ended_at IS NULL)"
    )
    sid = session.pk.get_db_prep_value(session_id, connection)
    created = message.get_field("created_at").get_db_prep_value(timezone.now(), connection)
    with connection.cursor() as cursor:
        cursor.execute(sql, [sid, role, content, created, MessageStatus.COMPLETE.value, sid])
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
    await ChatMessage.objects.filter(id=row_id).aupdate(
        content=Concat(F("content"), Value(more)) if more else F("content"),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        status=status,
    )
