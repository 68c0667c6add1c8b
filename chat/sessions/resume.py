"""Resumable sessions: conversations that outlive a socket (issue 12).

A session started with `"resumable": true` is held by this process in a `Held`,
not by the socket that started it. Every frame about it gets the next seq, is
kept (chat/sessions/framelog.py) and goes to the socket attached, if any. When the socket
closes the conversation carries on detached (its turns finish and are saved, its
queue is answered, its frames are kept) and a timer ends it as `abandoned` after
R2D2_RESUME_WINDOW_SECONDS unless a client resumes it.

`chatbot_session_resume` (with the token and the last seq the client has) attaches
the new socket:

- on the process that holds the session: the old socket, if still open, is told
  `resumed_elsewhere`; the frames after last_seq are replayed from memory, then
  live frames follow.
- on another process (Redis): the holder is asked over the channel layer to hand
  the session over. It detaches its socket, lets its running and queued turns
  finish (their frames go to the shared log, which this side tails to its client
  meanwhile), then releases the session in the database. This side then claims it
  (a conditional UPDATE, so only one claimant wins) and becomes the holder,
  continuing the seqs after the log's last. A holder that is gone (killed,
  drained) is not asked: its session is claimed at once, and a turn it left open
  is closed with `turn_interrupted` and `processing_end`.

The database stays the authority on who holds a session (`owner_process`,
`owner_channel`, here this process's `hub` channel) and whether it has ended
(chat/sessions/lifecycle.py writes that).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chat import protocol
from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import framelog, lifecycle, liveness
from chat.turns.conversation import Conversation

if TYPE_CHECKING:
    from chat.websocket.consumer import ChatConsumer

logger = logging.getLogger(__name__)

#: Resumable sessions this process holds, attached to a socket or not.
_held: dict[uuid.UUID, Held] = {}


def local(session_id: uuid.UUID) -> Held | None:
    """The resumable session this process holds under that id, if any (and still in use)."""
    held = _held.get(session_id)
    return held if held is not None and not held.leaving else None


def held_here() -> list[Held]:
    """Every resumable session this process holds (for draining)."""
    return [held for held in _held.values() if not held.leaving]


# Tokens -----------------------------------------------------------------------


def new_token() -> tuple[str, str]:
    """A fresh resume token and the hash that is stored (the token itself never is)."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(session: ChatSession, token: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return session.is_resumable and hmac.compare_digest(session.resume_token_hash, token_hash(token))


def unavailable(why: str) -> ClientError:
    return ClientError(ErrorCode.RESUME_UNAVAILABLE, f"{why} Its transcript is kept; start a new session.")


# A session held here -----------------------------------------------------------


class Held:
    """One resumable session held by this process: its conversation, its seqs, its socket if any."""

    def __init__(self, *, session_id: uuid.UUID, model: str, consumer: ChatConsumer | None, next_seq: int = 1) -> None:
        self.session_id = session_id
        self.conversation = Conversation(session_id=session_id, model=model, send=self.send)
        self.consumer = consumer
        self.next_seq = next_seq
        self.delivered = next_seq - 1  # the last seq that went through `send` to its socket and the logs
        self.frames = framelog.LocalFrames()
        self.leaving = False  # ended, handed over or released: no longer this process's to resume
        # Socket writes and shared-log appends in seq order: asyncio.Lock wakes waiters first come first served.
        self._lock = asyncio.Lock()
        self._window: asyncio.TimerHandle | None = None

    async def send(self, frame: str) -> None:
        """The conversation's `send`: number the frame, keep it, deliver it to the socket attached."""
        seq = self.next_seq
        self.next_seq += 1
        text = protocol.sequenced(frame, self.session_id, seq)
        self.frames.append(seq, text)
        async with self._lock:
            log = framelog.shared()
            if log is not None:
                await log.append(self.session_id, seq, text)
            self.delivered = seq
            if self.consumer is not None:
                try:
                    await self.consumer.send_frame(text)
                except Exception:  # the socket is going: the frame is kept for the resume
                    logger.info("frame not delivered", extra={"session_id": str(self.session_id), "seq": seq})

    # The socket ----------------------------------------------------------------

    def detach(self, consumer: ChatConsumer) -> None:
        """The socket closed: carry on without it, for the resume window."""
        if self.consumer is not consumer:
            return
        self.consumer = None
        self._cancel_window()
        loop = asyncio.get_running_loop()
        self._window = loop.call_later(settings.R2D2_RESUME_WINDOW_SECONDS, self._window_passed)
        logger.info("resumable session detached", extra={"session_id": str(self.session_id)})

    def _window_passed(self) -> None:
        logger.info("resumable session abandoned", extra={"session_id": str(self.session_id)})
        spawn(self.end(EndReason.ABANDONED))

    def _cancel_window(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._window = None

    async def attach(self, consumer: ChatConsumer, last_seq: int) -> None:
        """A client resumes on this process: replay what it lacks, then it gets the live frames."""
        async with self._lock:  # no frame goes out between the replay and the first live one
            if last_seq > self.delivered:
                raise unavailable(f"last_seq {last_seq} is beyond this session's last frame ({self.delivered}).")
            frames = self.frames.after(last_seq, self.delivered)
            if frames is None:
                raise unavailable("The frames after that last_seq are no longer kept.")
            old, self.consumer = self.consumer, consumer
            self._cancel_window()
            if old is not None and old is not consumer:
                await old.resumed_elsewhere(self.session_id)
            consumer.conversations[self.session_id] = self.conversation
            await consumer.send_frame(protocol.session_resumed(self.session_id, self.delivered))
            for _, text in frames:
                await consumer.send_frame(text)
        logger.info("session resumed", extra={"session_id": str(self.session_id), "from_seq": last_seq})

    # Leaving -------------------------------------------------------------------

    async def end(self, reason: EndReason | None, frame: str | None = None) -> None:
        """End the session here: stop its conversation, record `reason` (None: it already ended
        elsewhere) and send `frame` (by default `session_end` with the reason) to the socket and the log."""
        if not await self._leave():
            return
        if reason is not None:
            await lifecycle.end(session_id=self.session_id, reason=reason)
            frame = frame or protocol.session_ended_by_server(self.session_id, reason.value)
        if frame is not None:
            await self.send(frame)
        await hub.leave(self.session_id)

    async def _leave(self) -> bool:
        """Stop holding the session here (its conversation stopped, its socket told nothing); False if already."""
        if self.leaving:
            return False
        self.leaving = True
        self._cancel_window()
        _held.pop(self.session_id, None)
        if self.consumer is not None:
            self.consumer.conversations.pop(self.session_id, None)
        await self.conversation.close()
        return True

    async def hand_over(self) -> None:
        """Another process's client resumes this session: drop the socket, finish the turns
        accepted so far (their frames go to the shared log, which the new holder replays),
        then release the session so that the new holder can claim it."""
        if self.leaving:
            return
        self._cancel_window()
        old, self.consumer = self.consumer, None
        if old is not None:
            await old.resumed_elsewhere(self.session_id)
        # Polled: a turn ends in many ways (reply, error, cancel) and none of them is worth a hook here.
        while self.conversation.busy and not self.leaving:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.release()

    async def release(self) -> None:
        """Stop holding the session without ending it (its turns are done): any process may claim it."""
        if not await self._leave():
            return
        await lifecycle.release(self.session_id)
        await hub.leave(self.session_id)
        logger.info("resumable session released", extra={"session_id": str(self.session_id)})


async def start(consumer: ChatConsumer, *, model: str, **principal: Any) -> tuple[ChatSession, str]:
    """Start a resumable session held by this process, attached to `consumer`; returns it and its token.

    `principal`: who it is for (chat/accounts/auth.py), recorded on the session."""
    token, hashed = new_token()
    session = await lifecycle.start(
        model=model,
        client_address=consumer.client_address,
        owner_channel=await hub.channel(),
        resume_token_hash=hashed,
        **principal,
    )
    held = Held(session_id=session.id, model=model, consumer=consumer)
    _held[session.id] = held
    consumer.conversations[session.id] = held.conversation
    await hub.join(session.id)
    return session, token


# Resuming --------------------------------------------------------------------


async def resume(consumer: ChatConsumer, session_id: uuid.UUID, token: str, last_seq: int) -> None:
    """Attach `consumer` to a resumable session, wherever it is held; ClientError says why not."""
    session = await lifecycle.get(session_id)
    if session is None:
        raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
    if not token_matches(session, token):
        logger.warning("resume refused: wrong token", extra={"session_id": str(session_id)})
        raise ClientError(ErrorCode.RESUME_TOKEN_INVALID, "That resume_token does not resume this session.")
    if not session.is_live:
        raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
    held = local(session_id)
    if held is not None:
        await held.attach(consumer, last_seq)
    else:
        await _take_over(consumer, session, last_seq)


async def _take_over(consumer: ChatConsumer, session: ChatSession, last_seq: int) -> None:
    """Resume a session this process does not hold: replay and tail the shared log until its
    holder has released it (or is gone), then claim it and become its holder."""
    log = framelog.shared()
    if log is None:
        raise unavailable("This session is held by another server process that this one cannot reach.")
    session_id = session.id
    frames = await log.after(session_id, last_seq)
    if frames and frames[0][0] != last_seq + 1:
        raise unavailable("The frames after that last_seq are no longer kept.")
    cursor = frames[-1][0] if frames else last_seq
    await consumer.send_frame(protocol.session_resumed(session_id, cursor))
    for _, text in frames:
        await consumer.send_frame(text)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.R2D2_DRAIN_SECONDS + settings.R2D2_UPSTREAM_TIMEOUT + 10
    asked = False
    while True:
        row = await lifecycle.get(session_id)
        if row is None or not row.is_live:
            # Ended meanwhile (an operator, the window on the old holder): the client gets the rest, its end included.
            await _forward(consumer, log, session_id, cursor)
            return
        if await _free(row):
            if await lifecycle.claim(session_id, from_owner=row.owner_process, channel=await hub.channel()):
                break
            continue  # another process claimed it first: ask that one
        if not asked:
            await _ask_to_hand_over(row)
            asked = True
        cursor = await _forward(consumer, log, session_id, cursor, block_ms=250)
        if loop.time() > deadline:
            raise unavailable("The server holding this session did not hand it over in time; try again.")

    # This process holds it now: the last frames its old holder wrote, then its own.
    cursor = await _forward(consumer, log, session_id, cursor)
    last = max(cursor, await log.last_seq(session_id))
    held = Held(session_id=session_id, model=row.model, consumer=consumer, next_seq=last + 1)
    held.conversation.system_message = row.system_message
    held.conversation.history = await _history(session_id)
    _held[session_id] = held
    consumer.conversations[session_id] = held.conversation
    await hub.join(session_id)
    logger.info("session taken over", extra={"session_id": str(session_id), "from": row.owner_process or "released"})
    if await _turn_left_open(log, session_id):
        # Its holder died mid-turn: the client gets an end to that turn, the partial reply is marked.
        await _mark_interrupted(session_id)
        await held.send(
            protocol.error(ErrorCode.TURN_INTERRUPTED, "The server answering this message stopped; send it again.")
        )
        await held.send(protocol.processing_end())


async def _free(row: ChatSession) -> bool:
    """Whether nobody holds the session: released, or its process is gone (or was this one and let go)."""
    owner = row.owner_process
    if not owner:
        return True
    if owner == liveness.PROCESS_ID:
        return row.id not in _held
    return not await _alive(owner)


async def _ask_to_hand_over(row: ChatSession) -> None:
    layer = get_channel_layer()
    event = {"type": "resume.handover", "session_id": str(row.id)}
    await layer.group_send(lifecycle.group(row.id), event)  # the holder's hub ignores the second copy
    if row.owner_channel:
        await layer.send(row.owner_channel, event)


async def _forward(
    consumer: ChatConsumer, log: framelog.SharedLog, session_id: uuid.UUID, cursor: int, block_ms: int = 0
) -> int:
    """Send the client the shared log's frames after `cursor` (waiting up to block_ms for one); the new cursor."""
    frames = await (log.tail(session_id, cursor, block_ms) if block_ms else log.after(session_id, cursor))
    for seq, text in frames:
        if seq > cursor:
            await consumer.send_frame(text)
            cursor = seq
    return cursor


async def _turn_left_open(log: framelog.SharedLog, session_id: uuid.UUID) -> bool:
    """Whether the log's last turn has a processing_start and no processing_end."""
    for _, text in reversed(await log.after(session_id, 0)):
        kind = protocol.frame_type(text)
        if kind in {"processing_start", "processing_end"}:
            return kind == "processing_start"
    return False


async def _history(session_id: uuid.UUID) -> list[tuple[str, str]]:
    """The conversation so far, as the new holder's Conversation keeps it."""
    rows = ChatMessage.objects.filter(session_id=session_id, role__in=[Role.USER, Role.ASSISTANT])
    return [(row.role, row.content) async for row in rows.order_by("created_at", "id")]


async def _mark_interrupted(session_id: uuid.UUID) -> None:
    await ChatMessage.objects.filter(session_id=session_id, status=MessageStatus.INCOMPLETE).aupdate(
        status=MessageStatus.INTERRUPTED
    )


_alive = sync_to_async(liveness.is_alive)


# The hub: this process's channel for its resumable sessions ---------------------


class Hub:
    """A channel-layer channel of this process's own, the `owner_channel` of every resumable
    session it holds: a detached session has no consumer to receive an operator's `session.end`
    or another process's `resume.handover`, so this receives them for all of them."""

    def __init__(self) -> None:
        self._channel: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def channel(self) -> str:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop or self._task is None or self._task.done():
            name = await get_channel_layer().new_channel()
            if self._loop is not loop or self._task is None or self._task.done():  # nobody started it meanwhile
                self._channel, self._loop = name, loop
                self._task = loop.create_task(self._run(name), name="r2d2-resume-hub")
        return self._channel

    async def join(self, session_id: uuid.UUID) -> None:
        await get_channel_layer().group_add(lifecycle.group(session_id), await self.channel())

    async def leave(self, session_id: uuid.UUID) -> None:
        if self._channel is not None:
            await get_channel_layer().group_discard(lifecycle.group(session_id), self._channel)

    async def _run(self, channel: str) -> None:
        layer = get_channel_layer()
        while True:
            try:
                event = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("resume hub receive failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1)
                continue
            spawn(self._handle(event))  # a hand-over waits for turns to finish: never block the others

    @staticmethod
    async def _handle(event: dict[str, Any]) -> None:
        session_id = uuid.UUID(event["session_id"])
        held = _held.get(session_id)
        if event["type"] == "session.end":
            if held is not None:
                await held.end(EndReason(event.get("reason", EndReason.OPERATOR)))
        elif event["type"] == "resume.handover":
            if held is not None:
                await held.hand_over()
            else:
                await lifecycle.release(session_id)  # recorded as ours, but not held here: let it go


hub = Hub()

_tasks: set[asyncio.Task] = set()


def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run in the background, holding a reference (the loop keeps only a weak one), logging failures."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)
    task.add_done_callback(_finished)


def _finished(task: asyncio.Task) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("resume task failed", exc_info=task.exception())
