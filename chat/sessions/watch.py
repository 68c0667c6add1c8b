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
fills it from the session's frame log (chat/sessions/framelog.py) before going on.

Delivery never waits on the holder: each watch has its own queue and its own task, which sends
through the socket's flow control; a socket that stops reading is closed with 4408 by it
(chat/edge/flow.py) while the holder and the other watchers go on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any, Protocol

from channels.layers import get_channel_layer
from django.conf import settings
from django.db.models import Max, Q

from chat import protocol
from chat.accounts.principals import Principal
from chat.models import ChatSession
from chat.ops import store
from chat.protocol import Cancel, PostMessage
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import feed, framelog, holder, lifecycle
from chat.sessions.holder_events import ask, figures

logger = logging.getLogger(__name__)

#: How long `chatbot_sessions` waits for each holder's figures (a released session has none).
STATUS_SECONDS = 1.0


class WatchingSocket(Protocol):
    """A client's socket, as a watch sees it (chat/websocket/consumer.py)."""

    channel_name: str

    async def send_frame(self, text: str) -> None: ...


def may_watch(principal: Principal, session: ChatSession) -> bool:
    """A signed-in person and their keys count as one: each watches what any of them started."""
    if principal.owns(session):
        return True
    return principal.user_id is not None and session.user_id == principal.user_id


class Watch:
    """One socket watching one session: `session_watching`, then the frames numbered above it, in order, once each."""

    __slots__ = ("socket", "session_id", "resumable", "last", "owner", "_early", "_queue", "_task", "closed")

    def __init__(self, socket: WatchingSocket, session_id: uuid.UUID, resumable: bool) -> None:
        self.socket = socket
        self.session_id = session_id
        self.resumable = resumable
        self.last: int | None = None  # the last frame the socket has (None: its snapshot has not come)
        self.owner = ""  # the holder's process channel, as last known
        self._early: list[tuple[int, str]] = []  # frames that came before the snapshot
        self._queue: collections.deque[tuple[int, str | None]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def begin(self, snapshot: feed.Snapshot) -> None:
        """The holder's snapshot: the socket gets it first, then what came meanwhile above it."""
        self._queue.append(
            (snapshot.seq, protocol.session_watching(self.session_id, snapshot.messages, snapshot.partial))
        )
        self.last = snapshot.seq
        early, self._early = self._early, []
        self._queue.extend(item for item in early if item[0] > snapshot.seq)
        self._wake()

    def offer(self, seq: int, text: str | None) -> None:
        """A frame of the session (None: only "the holder is at `seq`", after a move). Never waits."""
        if self.closed:
            return
        if self.last is None:
            if text is not None:
                self._early.append((seq, text))
            return
        self._queue.append((seq, text))
        self._wake()

    def _wake(self) -> None:
        if self._task is None and self._queue:
            self._task = asyncio.get_running_loop().create_task(self._deliver(), name="r2d2-watch")

    async def _deliver(self) -> None:
        try:
            while self._queue and not self.closed:
                seq, text = self._queue.popleft()
                assert self.last is not None
                if text is not None and text.startswith('{"type": "session_watching"'):
                    await self.socket.send_frame(text)
                    continue
                if seq <= self.last:
                    continue  # the snapshot covers it, or it came twice (a holder that moved)
                if seq > self.last + 1:
                    await self._fill(seq)
                if text is None:
                    continue
                if seq > self.last + 1:
                    logger.warning(
                        "watch gap", extra={"session_id": str(self.session_id), "missing": seq - self.last - 1}
                    )
                self.last = seq
                await self.socket.send_frame(text)
                if text.startswith('{"type": "session_end"'):  # the session ended: so does the watch
                    self.closed = True
                    _forget(self)
        except Exception:  # the socket is going (closed, or closed as a non-reader): it watches no more
            self.closed = True
            _forget(self)
        finally:
            self._task = None
            if self._queue and not self.closed:
                self._wake()

    async def _fill(self, upto: int) -> None:
        """Frames last+1 … upto-1, which this process did not hear: from the session's frame log (resumable),
        else from the frames its holder keeps for watchers."""
        assert self.last is not None
        log = framelog.shared() if self.resumable else None
        if log is not None:
            frames = [(seq, text) for seq, text in (await log.after(self.session_id, self.last)).frames if seq < upto]
        else:
            frames = []
        if (not frames or frames[0][0] != self.last + 1) and self.owner:
            event = {"type": "watch.replay", "session_id": str(self.session_id), "after": self.last, "upto": upto - 1}
            answer = await ask(self.owner, event, timeout=2.0)
            frames = [(seq, text) for seq, text in (answer or {}).get("frames", [])]
        for seq, text in frames:
            if seq == self.last + 1:
                self.last = seq
                await self.socket.send_frame(text)


# This process's watches ---------------------------------------------------------


class Watching:
    """Every watch of this process's sockets, by session; the channel-layer channel their control messages arrive
    on, and (with Redis) the one subscription their frames arrive on."""

    def __init__(self) -> None:
        self.by_session: dict[uuid.UUID, dict[str, Watch]] = {}
        self._channel: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    def deliver(self, session_id: uuid.UUID, seq: int, text: str) -> None:
        """A frame of a watched session: each of this process's watches of it queues it (never waits)."""
        for watch in list(self.by_session.get(session_id, {}).values()):
            watch.offer(seq, text)

    async def subscribe(self, session_id: uuid.UUID) -> None:
        """Hear the session's frames (with Redis: SUBSCRIBE, once per process; without, they are handed here)."""
        if not store.shared():
            return
        if self._pubsub is None or (self._reader is not None and self._reader.done()):
            self._pubsub, self._reader = store.client(decode=True).pubsub(), None  # made before any await: one
        pubsub = self._pubsub
        await pubsub.subscribe(feed.channel(session_id))
        if self._reader is None and pubsub is self._pubsub:  # redis-py reads nothing before a first SUBSCRIBE
            self._reader = asyncio.get_running_loop().create_task(self._read(pubsub), name="r2d2-watch-frames")

    async def unsubscribe(self, session_id: uuid.UUID) -> None:
        if self._pubsub is not None:
            await self._pubsub.unsubscribe(feed.channel(session_id))

    async def _read(self, pubsub: Any) -> None:
        start = len(feed.channel(uuid.UUID(int=0))) - 32  # where a channel's session hex begins
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: redis-py subscribes again when it reconnects
                logger.warning("watch frames not read", extra={"error": type(exc).__name__})
                await asyncio.sleep(1)
                continue
            if message is None or message.get("type") != "message":
                continue
            seq, _, text = message["data"].partition(" ")
            self.deliver(uuid.UUID(hex=message["channel"][start:]), int(seq), text)

    async def channel(self) -> str:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop or self._task is None or self._task.done():
            name = await get_channel_layer().new_channel()
            if self._loop is not loop or self._task is None or self._task.done():
                self._channel, self._loop = name, loop
                self.by_session.clear()  # a new loop (tests): the old one's watches went with it
                self._pubsub = self._reader = None
                self._task = loop.create_task(self._run(name), name="r2d2-watch-receiver")
        assert self._channel is not None
        return self._channel

    async def _run(self, channel: str) -> None:
        layer = get_channel_layer()
        while True:
            try:
                event = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("watch receive failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1)
                continue
            try:
                self._handle(event)
            except Exception:
                logger.exception("watch event failed")

    def _handle(self, event: dict[str, Any]) -> None:
        """In order, without waiting: each watch queues what it is offered."""
        session_id = uuid.UUID(event["session_id"])
        watches = self.by_session.get(session_id)
        if not watches:
            return
        kind = event["type"]
        if kind == "watch.moved":
            for watch in watches.values():
                watch.owner = event["owner"]
            holder.spawn(_join(session_id, event["owner"], list(watches)))
        elif kind == "watch.at":
            for watch in list(watches.values()):
                watch.offer(event["seq"] + 1, None)  # fills up to the holder's last frame


watching = Watching()
feed.deliver_here = watching.deliver


def _forget(watch: Watch, *, tell_holder: bool = True) -> None:
    watches = watching.by_session.get(watch.session_id)
    if watches is not None and watches.get(watch.socket.channel_name) is watch:
        del watches[watch.socket.channel_name]
        holder.spawn(_left(watch, tell_holder))


async def _left(watch: Watch, tell_holder: bool) -> None:
    """Unsubscribe this process when its last watch of the session goes, and tell the holder."""
    layer = get_channel_layer()
    try:
        if not watching.by_session.get(watch.session_id):
            watching.by_session.pop(watch.session_id, None)
            await layer.group_discard(feed.group(watch.session_id), await watching.channel())
            await watching.unsubscribe(watch.session_id)
        if watch.owner and tell_holder:
            event = {"type": "watch.leave", "session_id": str(watch.session_id), "watcher": watch.socket.channel_name}
            await layer.send(watch.owner, event)
    except Exception as exc:  # Redis restarting: the group's entry expires; the holder's count stays high
        logger.info("watch not left", extra={"session_id": str(watch.session_id), "error": type(exc).__name__})


async def _join(session_id: uuid.UUID, owner: str, watchers: list[str]) -> None:
    event = {
        "type": "watch.join",
        "session_id": str(session_id),
        "watchers": watchers,
        "reply_to": await watching.channel(),
    }
    await get_channel_layer().send(owner, event)


def watches_of(socket: WatchingSocket) -> list[Watch]:
    name = socket.channel_name
    return [w for watches in watching.by_session.values() if (w := watches.get(name)) is not None]


def watched_by(socket: WatchingSocket, session_id: uuid.UUID) -> Watch | None:
    return watching.by_session.get(session_id, {}).get(socket.channel_name)


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
        _forget(again, tell_holder=False)
    new = Watch(socket, session_id, session.is_resumable)
    receiver = await watching.channel()
    watching.by_session.setdefault(session_id, {})[socket.channel_name] = new
    try:
        await watching.subscribe(session_id)  # first: nothing falls between it and the snapshot
        await get_channel_layer().group_add(feed.group(session_id), receiver)
        snapshot = await _snapshot(new, session, socket.channel_name)
    except BaseException:
        _forget(new)
        raise
    new.begin(snapshot)


async def _snapshot(new: Watch, session: ChatSession, watcher: str) -> feed.Snapshot:
    """The holder's snapshot, wherever it runs; a session nobody holds now (released) from the database."""
    for _ in range(3):
        if not session.owner_channel:
            break
        here = holder.local(session.id)
        if here is not None:
            new.owner = session.owner_channel
            return await feed.snapshot(here, watcher)
        answer = await ask(
            session.owner_channel, {"type": "watch.snapshot", "session_id": str(session.id), "watcher": watcher}
        )
        if answer is not None and "seq" in answer:
            new.owner = session.owner_channel
            return feed.Snapshot(messages=answer["messages"], partial=answer["partial"], seq=answer["seq"])
        refreshed = await lifecycle.get(session.id)  # it moved, or its process is gone
        if refreshed is None or not refreshed.is_live:
            raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        if answer is None and refreshed.owner_channel == session.owner_channel:
            break  # its holder does not answer (killed): the saved conversation until one takes it over
        session = refreshed
    log = framelog.shared()
    seq = (await log.after(session.id, 2**62)).last if (log is not None and session.is_resumable) else 0
    rows = await feed.saved_messages(session.id)
    messages = [{"role": r["role"], "content": r["content"], "status": r["status"]} for r in rows]
    return feed.Snapshot(messages=messages, partial=None, seq=seq)


def unwatch_quietly(socket: WatchingSocket, session_id: uuid.UUID) -> bool:
    found = watched_by(socket, session_id)
    if found is None:
        return False
    found.closed = True
    _forget(found)
    return True


async def unwatch(socket: WatchingSocket, session_id: uuid.UUID) -> None:
    """`chatbot_session_unwatch`: no more of its frames; answered `session_unwatched`."""
    if not unwatch_quietly(socket, session_id):
        raise ClientError(ErrorCode.SESSION_NOT_FOUND, "This connection does not watch that session.")
    await socket.send_frame(protocol.session_unwatched(session_id))


def forget(socket: WatchingSocket) -> None:
    """The socket closed: its watches end."""
    for found in watches_of(socket):
        found.closed = True
        _forget(found)


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
        raise _unreachable()
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
        raise _unreachable()
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
        raise _unreachable()
    if not stopped:
        raise ClientError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")
    await socket.send_frame(protocol.cancelled(request.session_id))


async def sessions(principal: Principal) -> list[protocol.LiveSession]:
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
        protocol.LiveSession(
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


def _unreachable() -> ClientError:
    return ClientError(
        ErrorCode.HOLDER_UNREACHABLE,
        "No server process answers for that session now (it is being taken over, or resumed); try again.",
    )
