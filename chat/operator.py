"""What operators do to live sessions from outside the socket: the admin and management commands call this."""

from __future__ import annotations

import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chat.models import ChatSession, EndReason


def session_group(session_id: uuid.UUID | str) -> str:
    """The channel-layer group that reaches whichever consumer, in whatever process, holds a session."""
    return f"session.{uuid.UUID(str(session_id)).hex}"


async def request_session_end(session_id: uuid.UUID | str, reason: EndReason = EndReason.OPERATOR) -> None:
    """Ask the consumer holding the session to end it: it stops any generation, records `reason`
    and sends its client `session_end`.

    The event goes to the session's group and also straight to the owner's
    channel: group membership lives only in Redis and is gone after a Redis
    restart, while the owner's channel name (saved on the session) still routes.
    The consumer ignores the second copy.
    """
    layer = get_channel_layer()
    event = {"type": "session.end", "session_id": str(session_id), "reason": reason.value}
    await layer.group_send(session_group(session_id), event)
    live = ChatSession.objects.live().filter(id=session_id)
    owner_channel = await live.values_list("owner_channel", flat=True).afirst()
    if owner_channel:
        await layer.send(owner_channel, event)


def end_session_now(session_id: uuid.UUID | str, reason: EndReason = EndReason.OPERATOR) -> None:
    """Sync entry point for the admin and management commands."""
    async_to_sync(request_session_end)(session_id, reason)
