"""A watched session's frames delivered to this process's watching sockets (issue 28; the actions are
chat/sessions/watch.py's): each socket's `Watch`, and the process's `Watching` of them all.

- A `Watch` sends its socket the snapshot, then every frame numbered above it, in order, once each, through
  its own queue and task (a socket that stops reading is closed with 4408 by its flow control, chat/edge/flow.py,
  and holds up nobody else). A gap in the seqs is filled before going on, from the session's frame log
  (resumable) or the frames its holder keeps for watchers (`watch.replay`, chat/sessions/feed.py's `recent`),
  asked again within the storage retry window while Redis or the holder does not answer. Never a hole: when the
  frames cannot be had, the socket gets a fresh `session_watching` and goes on from there (`_start_over`), and
  when that cannot be had either, an `error` naming the session, then `session_unwatched`.
- `Watching` keeps the process's one subscription to the watched sessions' frames (chat/sessions/subscription.py)
  and its channel-layer channel for a holder's `moved` (chat/sessions/receiver.py). Whenever this process may
  have missed frames (its subscription came back after Redis restarted or its connection was killed; the holder
  moved), each watched session catches up (`_catch_up`): its holder, wherever it runs now, is asked where its
  frames stand, and each watch fills its gap up to there, so that a frame published while nobody here listened
  (a turn's last ones included) still reaches every watcher, once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any, Protocol

from channels.layers import get_channel_layer
from django.conf import settings

from chat.models import ChatSession, MessageStatus
from chat.ops import storage
from chat.protocol import watching as watch_frames
from chat.protocol.errors import ClientError, ErrorCode, storage_unavailable
from chat.sessions import feed, framelog, holder, lifecycle
from chat.sessions.frames import Frame
from chat.sessions.holder_events import ask
from chat.sessions.receiver import ProcessChannel
from chat.sessions.subscription import Subscription

logger = logging.getLogger(__name__)

#: How long a watch waits for its holder's answer (its recent frames, where its frames stand) before asking again.
ASK_HOLDER_SECONDS = 2.0
#: What `Watch.catch_up` asks for when where the holder stands is not known: as far as the log goes.
FAR = 2**62
#: What `Watch.gone` asks for: every frame there is, the session having ended (its `session_end` last).
GONE = FAR + 1


class WatchingSocket(Protocol):
    """A client's socket, as a watch sees it (chat/websocket/consumer.py)."""

    channel_name: str

    async def send_frame(self, text: str) -> None: ...


class Watch:
    """One socket watching one session: `session_watching`, then the frames numbered above it, in order, once each."""

    __slots__ = (
        "socket", "session_id", "resumable", "last", "owner", "_early", "_queue", "_task", "closed", "_restarted",
        "ending",
    )  # fmt: skip

    def __init__(self, socket: WatchingSocket, session_id: uuid.UUID, resumable: bool) -> None:
        self.socket = socket
        self.session_id = session_id
        self.resumable = resumable
        self.last: int | None = None  # the last frame the socket has (None: its snapshot has not come)
        self.owner = ""  # the holder's process channel, as last known
        self._early: list[tuple[int, str | None]] = []  # what came before the snapshot
        self._queue: collections.deque[tuple[int, str | None]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self._restarted = -1  # the frame a fresh snapshot was last sent for (`_start_over`)
        self.ending = False  # the session ended without its `session_end` reaching this watch (`gone`)

    def begin(self, snapshot: feed.Snapshot) -> None:
        """The holder's snapshot: the socket gets it first, then what came meanwhile above it."""
        self._queue.append(
            (snapshot.seq, watch_frames.session_watching(self.session_id, snapshot.messages, snapshot.partial))
        )
        self.last = snapshot.seq
        early, self._early = self._early, []
        self._queue.extend(item for item in early if item[0] > snapshot.seq)
        self._wake()

    def offer(self, seq: int, text: str | None) -> None:
        """A frame of the session (None: only "the socket needs every frame below `seq`": a holder that moved,
        a subscription that came back). Never waits."""
        if self.closed:
            return
        if self.last is None:
            self._early.append((seq, text))
            return
        self._queue.append((seq, text))
        self._wake()

    def catch_up(self, at: int | None) -> None:
        """Frames up to `at` (where the holder is; None: not known, then as far as the log goes) were published
        while this process heard nothing: the socket gets those it lacks, in turn with the live frames."""
        self.offer(FAR if at is None else at + 1, None)

    def gone(self) -> None:
        """The session has ended, and its `session_end` has not reached this watch (its holder's process died,
        or the frame was lost): the socket gets the frames it lacks, that one last, or is told the session ended
        (`_start_over`)."""
        if not self.ending:
            self.ending = True
            self.offer(GONE, None)

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
                    continue  # the snapshot covers it, or it came twice (a holder that moved, a catch-up)
                if seq > self.last + 1 and not await self._fill(seq) and seq != FAR and not self.closed:
                    if not await self._start_over(seq):
                        return
                    self._queue.appendleft((seq, text))  # judged again against the fresh snapshot
                    continue
                if text is not None and seq == self.last + 1:
                    await self._send(seq, text)
        except Exception:  # the socket is going (closed, or closed as a non-reader): it watches no more
            self.closed = True
            forget_watch(self)
        finally:
            self._task = None
            if self._queue and not self.closed:
                self._wake()

    async def _send(self, seq: int, text: str) -> None:
        self.last = seq
        await self.socket.send_frame(text)
        if text.startswith('{"type": "session_end"'):  # the session ended: so does the watch
            self.closed = True
            forget_watch(self)

    async def _fill(self, upto: int) -> bool:
        """Send frames last+1 … upto-1, which this process did not hear: from the session's frame log (resumable),
        then from the frames its holder keeps for watchers; asked again while Redis or the holder does not answer,
        within the storage retry window (chat/ops/storage.py). Whether they all came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + storage.window()
        delay = storage.FIRST_DELAY
        while not self.closed:
            try:
                frames, answered = await self._missed(upto)
            except Exception as exc:
                if storage.connection_error(exc) is None:  # a bug: logged, and the watch starts over
                    logger.exception("watch gap not filled", extra={"session_id": str(self.session_id)})
                    return False
                frames, answered = [], False
            for seq, text in frames:
                if seq == self.last + 1 and not self.closed:
                    await self._send(seq, text)
            if self.last >= upto - 1:
                return True
            if answered or loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, storage.MAX_DELAY)
        return False

    async def _missed(self, upto: int) -> tuple[list[Frame], bool]:
        """One try: the frames after the socket's last (below `upto`) that the log and then the holder have, and
        whether each source asked answered (False: ask again)."""
        assert self.last is not None
        frames: list[Frame] = []
        log = framelog.shared() if self.resumable else None
        if log is not None:
            frames = _running_on((await log.after(self.session_id, self.last)).frames, self.last, upto)
        after = frames[-1][0] if frames else self.last
        if after >= upto - 1 or upto == FAR:  # (GONE: all the holder has, though it has likely gone too)
            return frames, True
        if not self.owner:
            self.owner = await _owner(self.session_id)
            if not self.owner:
                return frames, True  # nobody holds it: nobody keeps its recent frames
        event = {"type": "watch.replay", "session_id": str(self.session_id), "after": after, "upto": upto - 1}
        answer = await ask(self.owner, event, timeout=ASK_HOLDER_SECONDS)
        if answer is None or answer.get("moved"):  # it moved, or its process is gone: ask where it is now
            self.owner = await _owner(self.session_id)
            return frames, False
        return frames + _running_on(answer.get("frames", []), after, upto), True

    async def _start_over(self, seq: int) -> bool:
        """Frames last+1 … seq-1 cannot be had (gone from the holder's recent frames and from the log, or
        nobody answers): never a hole. The socket gets a fresh `session_watching` and, after it, the frames above
        it, as a watch begun now would; when that cannot be had either (or a fresh one did not help), one `error`
        naming the session, then `session_unwatched`: the watch ends. Whether it goes on."""
        assert self.last is not None
        # How many frames are missing, when known (FAR and GONE stand for "up to wherever the holder is").
        extra = {"session_id": str(self.session_id), "missing": seq - self.last - 1 if seq < FAR else None}
        refusal = unreachable()  # a fresh snapshot did not help: its holder does not answer
        if self._restarted != seq:
            self._restarted = seq
            try:
                fresh = await self._fresh_snapshot()
            except Exception as exc:
                if storage.connection_error(exc) is None:
                    logger.exception("watch not started over", extra=extra)
                    fresh = ClientError(ErrorCode.INTERNAL_ERROR, "R2D2 failed to go on with this watch.")
                else:
                    fresh = storage_unavailable()
            if isinstance(fresh, feed.Snapshot):
                logger.warning("watch started over", extra=extra)
                self.last = fresh.seq
                await self.socket.send_frame(
                    watch_frames.session_watching(self.session_id, fresh.messages, fresh.partial)
                )
                return True
            refusal = fresh
        logger.warning("watch ended: frames lost", extra={**extra, "code": refusal.code.value})
        self.closed = True
        forget_watch(self)
        await self.socket.send_frame(watch_frames.watch_ended(self.session_id, refusal.code, refusal.message))
        await self.socket.send_frame(watch_frames.session_unwatched(self.session_id))
        return False

    async def _fresh_snapshot(self) -> feed.Snapshot | ClientError:
        """A fresh snapshot of the session, or why there is none."""
        assert self.last is not None
        session = await lifecycle.get(self.session_id)
        if session is None or not session.is_live:
            return ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        try:
            fresh = await take_snapshot(self, session, self.socket.channel_name)
        except ClientError as exc:
            return exc
        if fresh.seq < self.last:  # its holder did not answer, and what the database and log say is older
            return unreachable()
        return fresh


def _running_on(frames: list[Frame], after: int, upto: int) -> list[Frame]:
    """Those of `frames` that run on from `after` (after+1, after+2, …) below `upto`: a hole is never forwarded."""
    run: list[Frame] = []
    for seq, text in frames:
        if seq >= upto or seq > after + 1:
            break
        if seq == after + 1:
            run.append((seq, text))
            after = seq
    return run


async def _listed(query: Any) -> list[Any]:
    return [row async for row in query]


async def _owner(session_id: uuid.UUID) -> str:
    """The process channel of the session's holder now, from the database ("": ended, or nobody holds it)."""
    session = await lifecycle.get(session_id)
    return session.owner_channel if session is not None and session.is_live else ""


# This process's watches ---------------------------------------------------------


class Watching:
    """Every watch of this process's sockets, by session; the channel-layer channel their control messages arrive
    on (a holder that moved), and (with Redis) the one subscription their frames arrive on."""

    def __init__(self) -> None:
        self.by_session: dict[uuid.UUID, dict[str, Watch]] = {}
        self.subscription = Subscription(self.deliver, self.resubscribed)
        self._inbox = ProcessChannel("watch control", self._handle, fresh=self._fresh)
        self._catching_up: asyncio.Task[None] | None = None
        self._again = False
        self._checking: asyncio.Task[None] | None = None

    def _fresh(self) -> None:
        self.by_session.clear()  # a new loop (tests): the old one's watches went with it
        self.subscription.forget()
        self._catching_up = self._checking = None

    def keep_checking(self) -> None:
        """While this process has watches, look their sessions up now and then (`_check`)."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(self._check_all(), name="r2d2-watch-check")

    async def _check_all(self) -> None:
        """A safety net under the messages a watch waits for: a plain session whose holder's process died ends
        (the orphan sweep) with no `session_end` published, and a take-over's `moved` is lost if Redis is away
        when it is announced. Every R2D2_ORPHAN_SWEEP_SECONDS (at least 1 s), one query: each watch of a session
        that ended is told (`Watch.gone`), each of a session held elsewhere than it knows catches up."""
        while self.by_session:
            await asyncio.sleep(max(1.0, float(settings.R2D2_ORPHAN_SWEEP_SECONDS)))
            ids = list(self.by_session)
            query = ChatSession.objects.filter(id__in=ids).values_list("id", "ended_at", "owner_channel")
            try:
                rows = await storage.retry(lambda query=query: _listed(query))
            except Exception as exc:
                logger.info("watched sessions not checked", extra={"error": type(exc).__name__})
                continue
            for session_id, ended_at, owner in rows:
                watches = [w for w in self.by_session.get(session_id, {}).values() if w.last is not None]
                if ended_at is not None:
                    for watch in watches:
                        watch.gone()
                elif owner and watches and all(w.owner != owner for w in watches):
                    holder.spawn(_catch_up(session_id, owner))

    def deliver(self, session_id: uuid.UUID, seq: int, text: str) -> None:
        """A frame of a watched session: each of this process's watches of it queues it (never waits)."""
        for watch in list(self.by_session.get(session_id, {}).values()):
            watch.offer(seq, text)

    async def channel(self) -> str:
        return await self._inbox.name()

    def _handle(self, event: dict[str, Any]) -> None:
        """In order, without waiting: each watch queues what it is offered."""
        session_id = uuid.UUID(event["session_id"])
        watches = self.by_session.get(session_id)
        if watches and event["type"] == "watch.moved":
            holder.spawn(_catch_up(session_id, event["owner"]))

    def resubscribed(self) -> None:
        """The subscription came back (chat/sessions/subscription.py): every session watched here catches up,
        once at a time (reconnects close together make one more round, not one each)."""
        self._again = True
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.get_running_loop().create_task(self._catch_up_all(), name="r2d2-watch-catch-up")

    async def _catch_up_all(self) -> None:
        while self._again:
            self._again = False
            done = await asyncio.gather(*(_catch_up(s) for s in list(self.by_session)), return_exceptions=True)
            for failed in (d for d in done if isinstance(d, BaseException)):
                logger.error("watch catch-up failed", exc_info=failed)


watching = Watching()
feed.deliver_here = watching.deliver


async def _catch_up(session_id: uuid.UUID, owner: str | None = None) -> None:
    """Frames of the session were published while this process did not hear them (its subscription was down, or
    the holder moved): the holder, wherever it runs now, is asked where its frames stand (`watch.join`: from then
    on it publishes to these watchers, as after a move), and each watch fetches those it lacks, from the log or
    the holder. The session's group is joined again first (a restarted Redis forgot it). Asked again while Redis
    or the holder does not answer, within the storage retry window; past it, a resumable session's watches take
    what its log has, and a later frame's gap is filled, or the watch starts over (`Watch._start_over`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + storage.window()
    delay = storage.FIRST_DELAY
    at: int | None = None
    while (watches := watching.by_session.get(session_id)) and loop.time() < deadline:
        try:
            receiver = await watching.channel()
            await get_channel_layer().group_add(feed.group(session_id), receiver)
            owner = owner or await _owner(session_id)
            if not owner:
                break  # ended, or nobody holds it now (a resume or a take-over will announce its new holder)
            event = {"type": "watch.join", "session_id": str(session_id), "watchers": list(watches)}
            answer = await ask(owner, event, timeout=ASK_HOLDER_SECONDS)
        except Exception as exc:
            if storage.connection_error(exc) is None:
                raise
            answer = None
        if answer is not None and "seq" in answer:
            at = answer["seq"]
            for watch in watches.values():
                watch.owner = owner
            break
        owner = None  # it did not answer: where is it now?
        await asyncio.sleep(delay)
        delay = min(2 * delay, storage.MAX_DELAY)
    for watch in list(watching.by_session.get(session_id, {}).values()):
        watch.catch_up(at)


def forget_watch(watch: Watch, *, tell_holder: bool = True) -> None:
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
            await watching.subscription.remove(watch.session_id)
        if watch.owner and tell_holder:
            event = {"type": "watch.leave", "session_id": str(watch.session_id), "watcher": watch.socket.channel_name}
            await layer.send(watch.owner, event)
    except Exception as exc:  # Redis restarting: the group's entry expires; the holder's count stays high
        logger.info("watch not left", extra={"session_id": str(watch.session_id), "error": type(exc).__name__})


def watches_of(socket: WatchingSocket) -> list[Watch]:
    name = socket.channel_name
    return [w for watches in watching.by_session.values() if (w := watches.get(name)) is not None]


def watched_by(socket: WatchingSocket, session_id: uuid.UUID) -> Watch | None:
    return watching.by_session.get(session_id, {}).get(socket.channel_name)


async def take_snapshot(new: Watch, session: ChatSession, watcher: str) -> feed.Snapshot:
    """The holder's snapshot, wherever it runs; a session nobody holds now (released) from the database."""
    for _ in range(3):
        if not session.owner_channel:
            break
        here = holder.local(session.id)
        if here is not None:
            new.owner = session.owner_channel
            return await feed.snapshot(here, watcher)
        event = {"type": "watch.snapshot", "session_id": str(session.id), "watcher": watcher}
        # Bounded by its own wait for the answer (a killed holder's is its whole length), not the retry window's.
        answer = await storage.retry(lambda owner=session.owner_channel, event=event: ask(owner, event), bounded=False)
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
    # Without the reply a holder was writing (`incomplete`: its text is its last checkpoint, not what was said,
    # and whoever takes the session over settles it): `messages` is only ever what is saved for good.
    rows = [r for r in await feed.saved_messages(session.id) if r["status"] != MessageStatus.INCOMPLETE]
    messages = [{"role": r["role"], "content": r["content"], "status": r["status"]} for r in rows]
    return feed.Snapshot(messages=messages, partial=None, seq=seq)


def unreachable() -> ClientError:
    return ClientError(
        ErrorCode.HOLDER_UNREACHABLE,
        "No server process answers for that session now (it is being taken over, or resumed); try again.",
    )
