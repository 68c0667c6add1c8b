"""One conversation, many sockets (issue 28): watch a live session from any socket of its principal,
post into it, cancel its turn, and list what is running.

The watcher's side of `chatbot_session_watch`, on whichever process its socket is:

1. the process subscribes to the session's frames (a Redis channel, chat/sessions/feed.py) and
   to its channel-layer group (a take-over's notice), once for all its watching sockets, and the
   watch buffers what arrives;
2. then it asks the holder, wherever it runs, over the channel layer (its process's hub), for
   a snapshot: the saved messages, the reply as written so far, and the number of the last
   frame these cover. Subscribed first, so nothing falls between the two;
3. the socket gets `session_watching`, then every frame numbered above the snapshot, in order,
   each once (a frame numbered at or below what the socket has is dropped).

A watch is kept by session, not by holder: when a resumable session's holder moves (a resume
elsewhere, a take-over after a kill or a drain), the new holder announces itself to the group
(`moved`), each watching process joins it again, and a watch that finds a gap in the seqs
fills it from the session's frame log (chat/sessions/framelog.py) or its holder's recent frames
before going on; so does every watch of a process whose subscription came back after Redis
restarted or its connection was killed (chat/sessions/delivery.py).

Delivery never waits on the holder: each watch has its own queue and its own task, which sends
through the socket's flow control; a socket that stops reading is closed with 4408 by it
(chat/edge/flow.py) while the holder and the other watchers go on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from channels.layers import get_channel_layer
from django.conf import settings
from django.db.models import Max, Q

from chat import protocol
from chat.accounts.principals import Principal
from chat.models import ChatSession
from chat.ops import storage
from chat.protocol import Cancel, PostMessage
from chat.protocol import watching as watch_frames
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import feed, holder, lifecycle
from chat.sessions.delivery import (  # the tests and the consumer find them here too
    Watch,
    WatchingSocket,
    forget_watch,
    take_snapshot,
    unreachable,
    watched_by,
    watches_of,
    watching,
)
from chat.sessions.holder_events import ask, figures

__all__ = ["Watch", "WatchingSocket", "watched_by", "watches_of", "watching"]

logger = logging.getLogger(__name__)

#: How long `chatbot_sessions` waits for each holder's figures (a released session has none).
STATUS_SECONDS = 1.0


def may_watch(principal: Principal, session: ChatSession) -> bool:
    """A signed-in person and their keys count as one: each watches what any of them started."""
    if principal.owns(session):
        return True
    return principal.user_id is not None and session.user_id == principal.user_id


# Actions --------------------------------------------------------------------------


async def watch(socket: WatchingSocket, principal: Principal, session_id: uuid.UUID) -> None:
    """`chatbot_session_watch`: the socket gets `session_watching`, then the session's frames."""
    session = await _session_of(principal, session_id)
    if watched_by(socket, session_id) is None and len(watches_of(socket)) >= settings.R2D2_MAX_WATCHES_PER_SOCKET:
        raise ClientError(
            ErrorCode.TOO_MANY_WATCHES,
            f"This connection already watches {settings.R2D2_MAX_WATCHES_PER_SOCKET} sessions; unwatch one first.",
        )
    again = watched_by(socket, session_id)
    if again is not None:  # watched again: a new snapshot (the holder counts this socket once all the same)
        again.closed = True
        forget_watch(again, tell_holder=False)
    new = Watch(socket, session_id, session.is_resumable)
    receiver = await watching.channel()
    watching.by_session.setdefault(session_id, {})[socket.channel_name] = new
    try:
        await watching.subscription.add(session_id)  # first: nothing falls between it and the snapshot
        await storage.retry(lambda: get_channel_layer().group_add(feed.group(session_id), receiver))
        snapshot = await take_snapshot(new, session, socket.channel_name)
    except BaseException:
        forget_watch(new)
        raise
    new.begin(snapshot)
    watching.keep_checking()


def unwatch_quietly(socket: WatchingSocket, session_id: uuid.UUID) -> bool:
    found = watched_by(socket, session_id)
    if found is None:
        return False
    found.closed = True
    forget_watch(found)
    return True


async def unwatch(socket: WatchingSocket, session_id: uuid.UUID) -> None:
    """`chatbot_session_unwatch`: no more of its frames; answered `session_unwatched`."""
    if not unwatch_quietly(socket, session_id):
        raise ClientError(ErrorCode.SESSION_NOT_FOUND, "This connection does not watch that session.")
    await socket.send_frame(watch_frames.session_unwatched(session_id))


def forget(socket: WatchingSocket) -> None:
    """The socket closed: its watches end."""
    for found in watches_of(socket):
        found.closed = True
        forget_watch(found)


async def post(socket: WatchingSocket, request: PostMessage) -> None:
    """A watching socket posts: its holder, wherever it runs, admits and queues the message (charged to the
    session's principal); every attached socket sees the turn. A refusal comes back as the holder's."""
    session = await lifecycle.get(request.session_id)
    if session is None or not session.is_live:
        raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
    here = holder.local(request.session_id)
    if here is not None:
        await here.post(request)
        return
    if not session.owner_channel:
        raise unreachable()
    event = {
        "type": "watch.post",
        "session_id": str(request.session_id),
        "user_message": request.user_message,
        "system_message": request.system_message,
        "stream": request.stream,
        "client_message_id": request.client_message_id,
    }
    answer = await ask(session.owner_channel, event)
    if answer is None or answer.get("moved"):
        raise unreachable()
    if answer.get("code"):
        raise ClientError(ErrorCode(answer["code"]), answer["message"])


async def cancel(socket: WatchingSocket, request: Cancel) -> None:
    """A watching socket cancels the session's turn: answered `cancelled`, or `nothing_to_cancel`."""
    session = await lifecycle.get(request.session_id)
    here = holder.local(request.session_id)
    stopped: bool | None
    if here is not None:
        stopped = here.conversation.cancel()
    elif session is not None and session.owner_channel:
        answer = await ask(session.owner_channel, {"type": "session.cancel", "session_id": str(request.session_id)})
        stopped = None if answer is None else bool(answer.get("cancelled"))
    else:
        stopped = False
    if stopped is None:
        raise unreachable()
    if not stopped:
        raise ClientError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")
    await socket.send_frame(protocol.cancelled(request.session_id))


async def sessions(principal: Principal) -> list[watch_frames.LiveSession]:
    """`chatbot_sessions`: the principal's live sessions (a person's and their keys'), newest first."""
    if principal.is_anonymous:
        return []
    mine = (
        principal.own_sessions()
        if principal.user_id is None
        else Q(user_id=principal.user_id) | Q(api_key__user_id=principal.user_id)
    )
    rows = [
        row
        async for row in ChatSession.objects.live()
        .filter(mine)
        .annotate(last_message=Max("messages__created_at"))
        .order_by("-created_at")
    ]
    figures = await asyncio.gather(*(_status(row) for row in rows))
    return [
        watch_frames.LiveSession(
            session_id=row.id,
            model=row.model,
            resumable=row.is_resumable,
            answering=answering,
            watchers=watchers,
            started_at=row.created_at,
            last_activity=row.last_message or row.created_at,
        )
        for row, (answering, watchers) in zip(rows, figures, strict=True)
    ]


async def watchers(session: ChatSession) -> int:
    """How many sockets watch a live session, wherever it is held (the admin's session page)."""
    return (await _status(session))[1] if session.is_live else 0


async def _status(row: ChatSession) -> tuple[bool, int]:
    here = holder.local(row.id)
    if here is not None:
        return figures(here)
    if not row.owner_channel:
        return False, 0
    answer = await ask(row.owner_channel, {"type": "watch.status", "session_id": str(row.id)}, timeout=STATUS_SECONDS)
    if answer is None or "answering" not in answer:
        return False, 0
    return bool(answer["answering"]), int(answer["watchers"])


async def _session_of(principal: Principal, session_id: uuid.UUID) -> ChatSession:
    session = await lifecycle.get(session_id)
    if session is None:
        raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
    if not may_watch(principal, session):
        raise ClientError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to someone else.")
    if not session.is_live:
        raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
    return session
