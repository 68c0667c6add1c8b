"""What a session's holder answers other sockets of its principal over the channel layer (issue 28): a watcher's
snapshot, its post, its leaving, a process joining after a take-over, the figures `chatbot_sessions` lists.

These reach the holder's process through its hub (chat/sessions/holder.py's `events`, registered here), so the
holder needs no import of this module; chat/sessions/watch.py is the asking side (`ask`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer

from chat.ops import storage
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError
from chat.sessions import feed, hub
from chat.sessions.holder import Holder

#: How long the asking process waits for the holder's answer (a snapshot, a post's admission).
ASK_SECONDS = 10.0


async def ask(channel: str, event: dict[str, Any], *, timeout: float = ASK_SECONDS) -> dict[str, Any] | None:
    """Send `event` to a process's hub and wait for its one answer (None: none in time)."""
    layer = get_channel_layer()
    reply_to = await layer.new_channel()
    await layer.send(channel, {**event, "reply_to": reply_to})
    try:
        return await asyncio.wait_for(layer.receive(reply_to), timeout)
    except TimeoutError:
        return None


def figures(held: Holder) -> tuple[bool, int]:
    """Whether it is answering (a turn running, or messages waiting), and how many sockets watch it."""
    return held.conversation.busy, len(held.feed.watchers) if held.feed is not None else 0


async def _answer(event: dict[str, Any], answer: dict[str, Any]) -> None:
    """Send the asking process its answer; tried again within the storage retry window (a channel layer's pooled
    connection that Redis's restart broke fails once)."""
    message = {"session_id": event["session_id"], **answer}
    await storage.retry(lambda: get_channel_layer().send(event["reply_to"], message))


async def _on_snapshot(held: Holder | None, event: dict[str, Any]) -> None:
    if held is None:
        await _answer(event, {"type": "watch.snapshot", "moved": True})
        return
    snap = await feed.snapshot(held, event["watcher"])
    await _answer(
        event, {"type": "watch.snapshot", "messages": snap.messages, "partial": snap.partial, "seq": snap.seq}
    )


async def _on_leave(held: Holder | None, event: dict[str, Any]) -> None:
    if held is not None:
        feed.leave(held, event["watcher"])


async def _on_join(held: Holder | None, event: dict[str, Any]) -> None:
    """Watchers of a session this process took over: publish to them, and tell them where its frames are."""
    if held is None:
        return
    if held.feed is None:
        held.feed = feed.Feed(held.session_id)
    held.feed.watchers.update(event["watchers"])
    await _answer(event, {"type": "watch.at", "seq": held.marks.sent})


async def _on_post(held: Holder | None, event: dict[str, Any]) -> None:
    if held is None:
        await _answer(event, {"type": "watch.posted", "moved": True})
        return
    request = PostMessage(
        session_id=held.session_id,
        user_message=event["user_message"],
        system_message=event["system_message"],
        stream=event["stream"],
        client_message_id=event["client_message_id"],
    )
    try:
        await held.post(request)
    except ClientError as exc:
        await _answer(event, {"type": "watch.posted", "code": exc.code.value, "message": exc.message})
        return
    await _answer(event, {"type": "watch.posted", "code": ""})


async def _on_replay(held: Holder | None, event: dict[str, Any]) -> None:
    """A watcher's gap: the frames kept for watchers in it (those a plain session's watchers have no log for)."""
    if held is None:
        await _answer(event, {"type": "watch.replay", "moved": True})
        return
    frames = held.feed.after(event["after"], event["upto"]) if held.feed is not None else []
    await _answer(event, {"type": "watch.replay", "frames": frames})


async def _on_status(held: Holder | None, event: dict[str, Any]) -> None:
    if held is None:
        await _answer(event, {"type": "watch.status", "moved": True})
        return
    answering, watchers = figures(held)
    await _answer(event, {"type": "watch.status", "answering": answering, "watchers": watchers})


_HANDLERS: dict[str, Callable[[Holder | None, dict[str, Any]], Any]] = {
    "watch.snapshot": _on_snapshot,
    "watch.leave": _on_leave,
    "watch.join": _on_join,
    "watch.post": _on_post,
    "watch.status": _on_status,
    "watch.replay": _on_replay,
}
hub.events.update(_HANDLERS)
