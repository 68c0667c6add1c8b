"""A held session's frames for its watchers (issue 28): the holder's side of `chatbot_session_watch`.

The holder numbers every frame it sends (a resumable session's `seq`; a plain session's own
counter, which its socket never sees) and notes where each turn's reply stands. Once a
session has a watcher, anywhere, its holder gets a `Feed`, and each frame is published
once, whatever the number of watchers: with Redis, one PUBLISH to the session's channel
(`channel(session_id)`), which each process with watching sockets subscribes to once and
delivers from to its own sockets (chat/sessions/watch.py); on the embedded defaults (one
process) it is handed to this process's watches directly. A session nobody watches has no
Feed and pays one `is None` per frame (bench/throughput.py). A PUBLISH, not a channel-layer
group_send: channels_redis's takes three round trips and a Lua script, and doubled the
holder's CPU per frame (bench/watchers.py: 495 µs with no watcher, 1,122 with one).
Control messages (a take-over's `moved`) go to the session's channel-layer group (`group`).

Publishing never waits on the holder's send path: the frames go through a queue that one
task empties, in order, so a slow channel layer delays the watchers, never the turn.

A snapshot (`snapshot`) is taken on the holder's process, so that it and the frame number
it corresponds to are one: the saved conversation without the reply being written, that
reply as the holder's socket has seen it so far (`partial`), and `seq`, the last frame
the snapshot covers. Watchers drop live frames at or below it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from channels.layers import get_channel_layer

from chat import protocol
from chat.models import ChatMessage, MessageStatus, Role
from chat.ops import storage, store

logger = logging.getLogger(__name__)

#: How the frames that open and close a turn's reply begin, as the conversation sends them (chat/protocol/__init__.py):
#: by their beginning, for a turn asked `with_ids` and a `processing_end` naming its model carry more keys.
_START = protocol.processing_start()[:-15]  # '{"type": "processing_start"'
_END = protocol.processing_end()[:-15]  # '{"type": "processing_end"'
_MESSAGE = protocol.message("")[:-3]  # '{"type": "message", "data": '


#: Frames a watched session's holder keeps for watchers that missed one: at most this many, and this many bytes
#: (a reply's `message` frame may be megabytes; the last frame is kept whatever its size).
RECENT_FRAMES = 1000
RECENT_BYTES = 1 << 20


#: With no Redis (one process): hands a frame to this process's watches, without waiting (set by watch.py).
deliver_here: Callable[[uuid.UUID, int, str], None] | None = None


def group(session_id: uuid.UUID) -> str:
    """The channel-layer group of a session's watching processes (for control messages: a take-over)."""
    return f"watch.{session_id.hex}"


def channel(session_id: uuid.UUID) -> str:
    """The Redis channel a session's frames are published to (one per session)."""
    return store.key("watch", session_id.hex)


class Marks:
    """Where a session's frames stand: the last frame numbered, and whether a reply is open (its
    `processing_start` sent, neither its `message` nor its `processing_end` yet), with a count of
    those turning points (a snapshot read while one passed is read again)."""

    __slots__ = ("sent", "open", "epoch")

    def __init__(self, sent: int = 0) -> None:
        self.sent = sent
        self.open = False
        self.epoch = 0

    def note(self, frame: str) -> int:
        """Number `frame` (the next one) and note whether it opens or closes a reply; returns its number."""
        self.sent += 1
        if frame.startswith(_START):
            self.open, self.epoch = True, self.epoch + 1
        elif self.open and (frame.startswith(_END) or frame.startswith(_MESSAGE)):
            self.open, self.epoch = False, self.epoch + 1
        elif frame.startswith(_END):
            self.epoch += 1
        return self.sent


class Feed:
    """A watched session's publisher: one group message per frame, sent in order by one task at a time.

    `watchers`: the watching sockets (their ids), wherever they are, for `chatbot_sessions`."""

    __slots__ = ("session_id", "watchers", "recent", "_recent_bytes", "_queue", "_task")

    def __init__(self, session_id: uuid.UUID) -> None:
        self.session_id = session_id
        self.watchers: set[str] = set()
        # The last frames published, for a watcher whose process missed one (channels_redis can lose a message
        # when another receive on the same process is cancelled: measured, one frame in 600 as a socket closed).
        self.recent: collections.deque[tuple[int, str]] = collections.deque()
        self._recent_bytes = 0
        self._queue: collections.deque[tuple[int, str]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def publish(self, seq: int, text: str) -> None:
        """Frame `seq` (its text carries session_id and seq) for the session's watchers, wherever they are."""
        self.recent.append((seq, text))
        self._recent_bytes += len(text)
        while len(self.recent) > 1 and (len(self.recent) > RECENT_FRAMES or self._recent_bytes > RECENT_BYTES):
            self._recent_bytes -= len(self.recent.popleft()[1])
        if not store.shared():
            if deliver_here is not None:
                deliver_here(self.session_id, seq, text)
            return
        self._queue.append((seq, text))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="r2d2-watch-feed")

    def after(self, seq: int, upto: int) -> list[tuple[int, str]]:
        """The frames kept with seq+1 … upto (a watcher's gap)."""
        return [(s, text) for s, text in self.recent if seq < s <= upto]

    async def _drain(self) -> None:
        """Publish what is queued, in order: one PUBLISH per frame, those queued together in one round trip; a
        batch that fails (Redis restarting, the connection killed) is sent again within the storage retry window,
        later frames waiting behind it (a frame published twice is dropped by its watchers)."""
        name = channel(self.session_id)

        async def publish(batch: list[tuple[int, str]]) -> None:
            async with store.client(decode=True).pipeline(transaction=False) as pipe:
                for seq, text in batch:
                    pipe.publish(name, f"{seq} {text}")
                await pipe.execute()

        try:
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                try:
                    await storage.retry(lambda batch=batch: publish(batch))
                except Exception as exc:  # past the window: each watcher asks for what it missed (watch.replay)
                    extra = {"session_id": str(self.session_id), "error": type(exc).__name__}
                    logger.info("watch frames not published", extra=extra)
        finally:
            self._task = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    messages: list[dict[str, Any]]
    partial: str | None
    seq: int


class Watched(Protocol):
    """What a snapshot needs of a holder (chat/sessions/holder.py's Holder)."""

    session_id: uuid.UUID
    marks: Marks
    feed: Feed | None

    def partial(self) -> str: ...

    def answering(self) -> int | None: ...


async def snapshot(held: Watched, watcher: str) -> Snapshot:
    """The conversation as `held`'s socket has seen it, and the number of the last frame that covers;
    from now on its frames are published, and `watcher` counts as one of its watchers.

    The saved messages are read while no reply opens or closes (read again otherwise): a reply saved
    just before its `message` frame is then either in the snapshot or in the live frames, never both."""
    while True:
        epoch = held.marks.epoch
        rows = await saved_messages(held.session_id)
        if held.marks.epoch == epoch:
            break
    # From here to the return nothing awaits: the snapshot and its frame number are one moment.
    if held.feed is None:
        held.feed = Feed(held.session_id)
    held.feed.watchers.add(watcher)
    partial: str | None = None
    if held.marks.open:
        answering = held.answering()
        rows = [row for row in rows if row["reply_to"] is None or row["reply_to"] != answering]
        partial = held.partial()
    # Never a reply still being written: a regeneration's row is `incomplete` (and empty) from just before its
    # processing_start, which the live frames bring.
    rows = [row for row in rows if row["status"] != MessageStatus.INCOMPLETE]
    messages = [{"role": row["role"], "content": row["content"], "status": row["status"]} for row in rows]
    return Snapshot(messages=messages, partial=partial, seq=held.marks.sent)


async def saved_messages(session_id: uuid.UUID) -> list[dict[str, Any]]:
    """The session's conversation as saved: its users' messages and the replies, in order."""
    rows = ChatMessage.objects.filter(session_id=session_id, role__in=[Role.USER, Role.ASSISTANT]).order_by(
        "created_at", "id"
    )
    return [row async for row in rows.values("role", "content", "status", "reply_to")]


def leave(held: Watched, watcher: str) -> None:
    """`watcher` stopped watching: with none left, the holder stops publishing."""
    if held.feed is not None:
        held.feed.watchers.discard(watcher)
        if not held.feed.watchers:
            held.feed = None


async def announce(session_id: uuid.UUID, owner: str) -> None:
    """This process took the session over (its hub is `owner`): its watchers, wherever they are, join it
    (chat/sessions/watch.py). One group message per take-over."""
    try:
        await get_channel_layer().group_send(
            group(session_id), {"type": "watch.moved", "session_id": str(session_id), "owner": owner}
        )
    except Exception as exc:
        logger.info("watch move not announced", extra={"session_id": str(session_id), "error": type(exc).__name__})
