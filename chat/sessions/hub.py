"""The hub: this process's own channel-layer channel, the `owner_channel` of every session it holds. A detached
session has no consumer to receive an operator's `session.end` or another process's `resume.handover`, so this
receives them for all of them and hands each to the session's holder (found by the `find` it is given, so that
this module needs no import of the holder's)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import get_channel_layer

from chat.models import EndReason
from chat.ops import storage
from chat.ops.tasks import Background
from chat.sessions import lifecycle
from chat.sessions.receiver import ProcessChannel

logger = logging.getLogger(__name__)

#: Run in the background, held until it ends, a failure logged.
spawn = Background("session hub task").spawn


class Hub:
    """A channel-layer channel of this process's own, the `owner_channel` of every session it holds:
    a detached session has no consumer to receive an operator's `session.end` or another process's
    `resume.handover`, so this receives them for all of them."""

    def __init__(self, find: Callable[[uuid.UUID], Any]) -> None:
        self._find = find  # the holder here of a session, or None (chat/sessions/holder.py's `local`)
        # A hand-over waits for turns to finish: each event is handled in a task of its own, never blocking the others.
        self._inbox = ProcessChannel("session hub", lambda event: spawn(self._handle(event)))

    async def channel(self) -> str:
        return await self._inbox.name()

    async def _handle(self, event: dict[str, Any]) -> None:
        session_id = uuid.UUID(event["session_id"])
        holder = self._find(session_id)
        kind = event["type"]
        if kind == "session.end":
            if holder is not None:
                await holder.end(EndReason(event.get("reason", EndReason.OPERATOR)))
        elif kind == "session.cancel":
            cancelled = holder is not None and holder.conversation.cancel()
            if event.get("reply_to"):
                answer = {"type": "session.cancelled", "session_id": str(session_id), "cancelled": cancelled}
                await storage.retry(lambda: get_channel_layer().send(event["reply_to"], answer))
        elif kind == "session.fenced":
            if holder is not None and holder.lease.fence < int(event["fence"]):
                await holder.lose()
        elif kind == "frames.check":
            if holder is not None and holder.log is not None:
                holder.log.check()  # a reader found the shared log short: it may have lost what we wrote
        elif kind == "resume.handover":
            if holder is not None:
                await holder.hand_over()
            else:
                await lifecycle.release(session_id)  # recorded as ours, but not held here: let it go
        elif kind in events:
            await events[kind](holder, event)


#: More events the hub takes for the sessions held here: `type` → handler(the holder here or None, event).
#: chat/sessions/watch.py registers its own (a watcher's snapshot, post, leave), so the holder needs no import of it.
events: dict[str, Callable[[Any, dict[str, Any]], Awaitable[None]]] = {}
