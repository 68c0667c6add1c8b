"""This process's one Redis subscription to the frames of the sessions its sockets watch (issue 28): a watched
session's holder publishes each frame once to the session's channel (chat/sessions/feed.py), and each process with
watching sockets subscribes to it once and hands every frame to its watches (chat/sessions/watch.py).

A subscription dies with its connection (Redis restarting, a failover, `CLIENT KILL TYPE pubsub`), and what is
published until it is made again never reaches it. So:

- the reader (chat/sessions/receiver.py's loop) connects again after a failure, with backoff; as the connection
  comes back, redis-py subscribes it again to every channel it had (its `on_connect`);
- every reconnect of that connection, whichever call made it (redis-py also reconnects inside a command that
  failed, a SUBSCRIBE or a read), is heard (`_reconnected`) and calls `resubscribed`: each watch then fetches
  what it missed meanwhile (chat/sessions/watch.py's catch-up), from the frame log or the holder's recent frames.

The connection is made once, before any SUBSCRIBE (two first watches at once would otherwise each take a
connection from the pool, and the reader read only one of them).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from chat.ops import storage, store
from chat.sessions import feed
from chat.sessions.receiver import receive_forever

#: How long a read of the subscription waits before it is made again (a pause in the frames is no failure).
READ_SECONDS = 1.0


class Subscription:
    """The subscription, per event loop; `deliver(session_id, seq, text)` gets each frame (without waiting), and
    `resubscribed()` runs after each reconnect (without waiting)."""

    def __init__(self, deliver: Callable[[uuid.UUID, int, str], None], resubscribed: Callable[[], None]) -> None:
        self._deliver = deliver
        self._resubscribed = resubscribed
        self._pubsub: Any = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    def forget(self) -> None:
        """A new event loop (tests): the old one's subscription went with it."""
        self._pubsub = self._connecting = self._reader = None

    async def add(self, session_id: uuid.UUID) -> None:
        """Hear the session's frames from now on: SUBSCRIBE, with Redis; tried again within the storage retry
        window (chat/ops/storage.py), past which it raises `Unavailable`."""
        if not store.shared():
            return  # one process: the frames are handed over directly (chat/sessions/feed.py)
        channel = feed.channel(session_id)

        async def subscribe() -> None:
            pubsub = await self._connected()
            await pubsub.subscribe(channel)

        await storage.retry(subscribe)

    async def remove(self, session_id: uuid.UUID) -> None:
        if self._pubsub is not None and self._connecting is not None and self._connecting.done():
            await self._pubsub.unsubscribe(feed.channel(session_id))

    async def _connected(self) -> Any:
        """The subscription's connection, made once (those asking meanwhile wait for the same), and its reader."""
        if self._connecting is None or (self._connecting.done() and self._connecting.exception() is not None):
            if self._pubsub is None:
                self._pubsub = store.client(decode=True).pubsub()
            self._connecting = asyncio.get_running_loop().create_task(self._connect(self._pubsub))
        await asyncio.shield(self._connecting)
        return self._pubsub

    async def _connect(self, pubsub: Any) -> None:
        await pubsub.connect()
        pubsub.connection.register_connect_callback(self._reconnected)  # after the first connect: each one after it
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                receive_forever(
                    "watch frames",
                    lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_SECONDS),
                    self._on_message,
                    reconnect=lambda: self._reconnect(pubsub),
                ),
                name="r2d2-watch-frames",
            )

    @staticmethod
    async def _reconnect(pubsub: Any) -> None:
        """After a failed read: connect again (raises while Redis is away). redis-py may have done it already,
        inside the command that failed; either way `_reconnected` hears it."""
        if not pubsub.connection.is_connected:
            await pubsub.connect()

    def _reconnected(self, connection: Any) -> None:
        """redis-py's connect callback: the subscription's connection is back, subscribed again."""
        self._resubscribed()

    def _on_message(self, message: dict[str, Any] | None) -> None:
        if message is None or message.get("type") != "message":
            return
        seq, _, text = message["data"].partition(" ")
        self._deliver(uuid.UUID(hex=message["channel"][-32:]), int(seq), text)
