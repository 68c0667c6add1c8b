"""Saving what is said in a session: the user's messages and the model's replies.

Only `Conversation` (the owner of a turn) calls these. Each is one trip to the
database thread: a turn costs one for the user's message and one for the reply.
"""

from __future__ import annotations

import uuid

from asgiref.sync import sync_to_async
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat

from chat.errors import ClientError, ErrorCode
from chat.models import ChatMessage, ChatSession, MessageStatus, Role


def _save_user_message(session_id: uuid.UUID, content: str, system_message: str | None) -> ChatMessage:
    live = ChatSession.objects.live().filter(id=session_id)
    if system_message is None:
        # Ended elsewhere (an operator's command on another process, the orphan sweep):
        # the database is the authority, whichever path ended it.
        if not live.exists():
            raise session_ended()
        return ChatMessage.objects.create(session_id=session_id, role=Role.USER, content=content)
    with transaction.atomic():
        if not live.update(system_message=system_message):
            raise session_ended()
        ChatMessage.objects.create(session_id=session_id, role=Role.SYSTEM, content=system_message)
        return ChatMessage.objects.create(session_id=session_id, role=Role.USER, content=content)


def session_ended() -> ClientError:
    return ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")


async def save_user_message(*, session_id: uuid.UUID, content: str, system_message: str | None) -> ChatMessage:
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
