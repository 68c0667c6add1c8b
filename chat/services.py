"""Session and message persistence, and what the model is sent.

Writes are plain functions with keyword-only arguments, async through Django's
async ORM; a turn costs one INSERT for the user's message and one for the reply.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Sequence

from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role

# Identifies this server process in ChatSession.owner_process; unique across
# hosts and restarts (a reused pid gets a new suffix).
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def start_session(*, model: str, client_address: str | None, owner_channel: str) -> ChatSession:
    return await ChatSession.objects.acreate(
        model=model,
        client_address=client_address,
        owner_process=PROCESS_ID,
        owner_channel=owner_channel,
    )


async def end_session(*, session_id: uuid.UUID, reason: EndReason) -> bool:
    """Mark a live session ended; False if it had already ended."""
    updated = await ChatSession.objects.filter(id=session_id, ended_at__isnull=True).aupdate(
        ended_at=timezone.now(), end_reason=reason
    )
    return bool(updated)


async def end_sessions(*, session_ids: Sequence[uuid.UUID], reason: EndReason) -> None:
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
        await ChatSession.objects.filter(id__in=list(session_ids), ended_at__isnull=True).aupdate(
            ended_at=timezone.now(), end_reason=reason
        )
    except Exception as exc:
        done.set_exception(exc)
        done.exception()  # retrieved here too, so an unawaited failure is not reported twice
    else:
        done.set_result(None)


async def get_session(session_id: uuid.UUID) -> ChatSession | None:
    return await ChatSession.objects.filter(id=session_id).afirst()


async def add_user_message(*, session_id: uuid.UUID, content: str, system_message: str | None) -> ChatMessage:
    """Save the user's message (and a changed system message) before the model is called."""

    def save() -> ChatMessage:
        with transaction.atomic():
            if system_message is not None:
                ChatSession.objects.filter(id=session_id).update(system_message=system_message)
                ChatMessage.objects.create(session_id=session_id, role=Role.SYSTEM, content=system_message)
            return ChatMessage.objects.create(session_id=session_id, role=Role.USER, content=content)

    if system_message is None:
        return await ChatMessage.objects.acreate(session_id=session_id, role=Role.USER, content=content)
    return await sync_to_async(save)()


async def add_assistant_message(
    *,
    session_id: uuid.UUID,
    content: str,
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: int | None,
    cancelled: bool = False,
) -> ChatMessage:
    return await ChatMessage.objects.acreate(
        session_id=session_id,
        role=Role.ASSISTANT,
        content=content,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        status=MessageStatus.CANCELLED if cancelled else MessageStatus.COMPLETE,
    )


def assemble_messages(
    *,
    system_message: str,
    history: Sequence[tuple[str, str]],
    user_message: str,
    budget_chars: int,
) -> list[dict[str, str]]:
    """The request's messages: system, then as much recent history as fits, then the new message.

    History is dropped oldest first so the total content stays within
    `budget_chars`; the system message and the new message are always sent.
    """
    remaining = budget_chars - len(system_message) - len(user_message)
    kept: list[dict[str, str]] = []
    for role, content in reversed(history):
        remaining -= len(content)
        if remaining < 0:
            break
        kept.append({"role": role, "content": content})
    kept.reverse()
    messages = [{"role": Role.SYSTEM.value, "content": system_message}] if system_message else []
    return [*messages, *kept, {"role": Role.USER.value, "content": user_message}]
