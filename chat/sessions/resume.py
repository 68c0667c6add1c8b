"""Resuming a session from another socket: `chatbot_session_resume` (issue 12, issue 19).

The client sends the session's token and the last seq it has. Everything that can
refuse the resume is checked before it is answered, so a resume gets exactly one
answer: `session_resumed` (then the frames after last_seq, then live frames) or
one `error`.

- Held by this process: the holder replays from its own memory and the socket
  takes over; the old socket, if still open, is told `resumed_elsewhere`.
- Held elsewhere, or by nobody (released by a drain, or its process died): the
  shared log (chat/sessions/framelog.py, Redis) must hold every frame after
  last_seq, else `resume_unavailable`. A log that ends before last_seq while its
  holder lives (behind a Redis outage, or lost in a restart) is waited for, up to
  CATCH_UP_SECONDS, the holder asked to check it (`frames.check`): it writes back
  from its memory what the log lacks. The frames are replayed and the log tailed
  while the holder, asked over the channel layer, finishes the turns it accepted
  and releases the session; then this process claims it (the fence grows: the old
  holder can write nothing more, to the database or, once this process has fenced
  the log, to the log) and reconciles from the database: a reply left
  streaming is marked interrupted (the client gets `turn_interrupted` and
  `processing_end` for the turn it saw start), and messages saved but not answered
  are answered here, in order. A holder that does not let go in time is fenced out.

Every frame replayed or forwarded follows the one before it (`first_missing`):
a hole found before `session_resumed` is `resume_unavailable`, after it `session_end`
with reason `resume_failed` (the transcript stays in the database).

Resumes of one session on this process are answered one at a time; across processes
the claim is one conditional UPDATE, so exactly one wins. The wait for a live holder
elsewhere (up to HANDOVER_SECONDS) runs as a task (`TakeOver`) once the resume is
answered, so the socket goes on handling frames meanwhile; its close, the client's end
or another resume of the session stops the wait (the old holder still lets go: the
session is released, for the next resume to claim).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from chat import protocol
from chat.accounts import auth
from chat.accounts.principals import Principal
from chat.models import ChatSession
from chat.ops import storage, throttle
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import feed, framelog, holder, lifecycle, liveness
from chat.sessions.frames import first_missing
from chat.sessions.holder import Holder, unavailable
from chat.sessions.socket import SessionSocket
from chat.turns import messages

logger = logging.getLogger(__name__)

#: How long a claimant waits for a live holder to finish its turns and let go before fencing it out.
HANDOVER_SECONDS = 30.0
#: How long a resume elsewhere waits for a live holder's frame log to hold what its client lacks (it lags
#: behind a Redis outage, or Redis lost it) before `resume_unavailable`: the holder retries within a second
#: of Redis coming back (chat/sessions/framelog.py's MAX_BACKOFF_SECONDS).
CATCH_UP_SECONDS = 5.0

_locks: weakref.WeakValueDictionary[uuid.UUID, asyncio.Lock] = weakref.WeakValueDictionary()


class TakeOver:
    """A resume answered on `socket` whose session another process holds, while that process finishes the
    session's turns and lets go: `task` waits, claims the session and returns its new holder here (None when
    the wait was stopped, or the session ended meanwhile: the client got the rest of its frames)."""

    def __init__(self, socket: SessionSocket, session_id: uuid.UUID) -> None:
        self.socket = socket
        self.session_id = session_id
        self.claiming = False  # claiming it: too late to stop, the take-over completes
        self.task: asyncio.Task[Holder | None] | None = None

    def start(self, work: Coroutine[Any, Any, Holder | None]) -> None:
        self.task = asyncio.get_running_loop().create_task(work, name=f"take-over-{self.session_id}")
        _waiting[self.session_id] = self  # held until it ends (the loop keeps only a weak reference)
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if _waiting.get(self.session_id) is self:
            del _waiting[self.session_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error("take-over failed", exc_info=task.exception(), extra={"session_id": str(self.session_id)})

    def stop(self) -> None:
        """Stop waiting (the socket closed, the client ended the session or resumed it again), unless claiming."""
        if self.task is not None and not self.claiming:
            self.task.cancel()

    async def result(self) -> Holder | None:
        """The session's holder here once taken over; None if the wait was stopped or failed, or the session ended."""
        assert self.task is not None
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if self.task.cancelled():
                return None
            raise
        except Exception:  # logged when it ended
            return None


#: The take-overs this process is waiting on, by session.
_waiting: dict[uuid.UUID, TakeOver] = {}


def token_matches(session: ChatSession, token: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return session.is_resumable and hmac.compare_digest(session.resume_token_hash, holder.token_hash(token))


async def resume(
    socket: SessionSocket, principal: Principal, session_id: uuid.UUID, token: str, last_seq: int
) -> Holder | TakeOver:
    """Attach `socket` to a resumable session, wherever it is held; ClientError says why not. Held elsewhere,
    the resume is answered and a `TakeOver` waits for the session in the background."""
    lock = _locks.get(session_id)
    if lock is None:
        lock = _locks[session_id] = asyncio.Lock()
    async with lock:
        session = await lifecycle.get(session_id)
        if session is None:
            raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
        if not _same_principal(principal, session):
            raise ClientError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to someone else.")
        if not token_matches(session, token):
            # A client can send wrong tokens at will: one line per client address per minute, with a count.
            extra = {"session_id": str(session_id)}
            throttle.warn_throttled(logger, "resume refused: wrong token", key=throttle.client(), extra=extra)
            raise ClientError(ErrorCode.RESUME_TOKEN_INVALID, "That resume_token does not resume this session.")
        if not session.is_live:
            raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        waiting = _waiting.get(session_id)
        if waiting is not None:  # resumed again meanwhile: this resume replaces that one
            waiting.stop()
            await waiting.result()
            if waiting.socket is not socket and holder.local(session_id) is None:
                await holder.tell_resumed_elsewhere(waiting.socket, session_id)
        held = holder.local(session_id)
        if held is not None:
            await held.attach(socket, last_seq)
            return held
        return await _take_over(socket, session, last_seq)


def _same_principal(principal: Principal, session: ChatSession) -> bool:
    """Only the principal a session was started for resumes it (it is charged for its turns)."""
    return (principal.user_id, principal.api_key_id) == (session.user_id, session.api_key_id) or principal.owns(session)


async def _take_over(socket: SessionSocket, session: ChatSession, last_seq: int) -> TakeOver:
    """Resume a session this process does not hold (see the module docstring): answered here, taken over
    in the background."""
    log = framelog.shared()
    if log is None:
        raise unavailable("This session is held by another server process that this one cannot reach.")
    session_id = session.id
    frames = await _replay(log, session, last_seq)
    principal = await _principal_of(session)
    cursor = frames[-1][0] if frames else last_seq
    await socket.send_frame(protocol.session_resumed(session_id, cursor))
    for _, text in frames:
        await socket.send_frame(text)
    # The holder is asked now, so that it lets go even if this socket closes before the wait begins.
    asked = False
    try:
        if not await _free(session):
            await _ask(session, "resume.handover")
            asked = True
    except Exception as exc:  # PostgreSQL or Redis blinked: the wait asks again
        logger.info("hand-over not asked", extra={"session_id": str(session_id), "error": type(exc).__name__})
    waiting = TakeOver(socket, session_id)
    waiting.start(_hand_over(waiting, log, principal, cursor, asked))
    return waiting


async def _hand_over(
    waiting: TakeOver, log: framelog.SharedLog, principal: Principal, cursor: int, asked: bool
) -> Holder | None:
    """Forward the holder's frames while it finishes and lets go (or is fenced out), then claim the session."""
    socket, session_id = waiting.socket, waiting.session_id
    # Answered: whatever fails from here is retried, and never becomes a second answer.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDOVER_SECONDS
    fence: int | None = None
    try:
        while fence is None:
            try:
                row = await lifecycle.get(session_id)
                if row is None or not row.is_live:
                    # Ended meanwhile (an operator, the window on the old holder): the client gets the
                    # rest, its end included.
                    await _forward(socket, log, session_id, cursor)
                    return None
                late = loop.time() > deadline
                if late or await _free(row):
                    channel = await holder.hub.channel()
                    waiting.claiming = True  # too late to stop: the take-over completes
                    fence = await lifecycle.claim(session_id, from_owner=row.owner_process, channel=channel)
                    waiting.claiming = fence is not None
                    if fence is not None and row.owner_process and row.owner_process != liveness.PROCESS_ID:
                        await _tell_fenced(row, fence)
                    continue  # claimed; or another process claimed it first: ask that one
                if not asked:
                    await _ask(row, "resume.handover")
                    asked = True
                cursor = await _forward(socket, log, session_id, cursor, block_ms=250)
            except _Hole:
                raise
            except Exception as exc:  # PostgreSQL or Redis blinked: try again, the client is already answered
                _step_failed(session_id, exc)
                if loop.time() > deadline + HANDOVER_SECONDS:
                    # Down for longer than any blink: the client is told, and may resume again later.
                    await socket.send_frame(protocol.session_ended_by_server(session_id, "resume_failed"))
                    return None
                await asyncio.sleep(0.5)

        # This process holds it now. The log is fenced first (the old holder's late appends are refused
        # from here), then its last frames are forwarded, then this process's own follow.
        while True:
            try:
                last = await log.fence(session_id, fence)
                cursor = await _forward(socket, log, session_id, cursor)
                break
            except (_Hole, framelog.Fenced):
                raise
            except Exception as exc:
                _step_failed(session_id, exc)
                if loop.time() > deadline + HANDOVER_SECONDS:
                    await lifecycle.release(session_id, fence=fence)
                    await socket.send_frame(protocol.session_ended_by_server(session_id, "resume_failed"))
                    return None
                await asyncio.sleep(0.5)
    except (_Hole, framelog.Fenced) as exc:
        # The log lacks frames the client needs and no holder has them any more (or the session was
        # claimed again meanwhile): never forward a hole; the client is told, its transcript is saved.
        logger.warning("resume failed", extra={"session_id": str(session_id), "why": str(exc)})
        await socket.send_frame(protocol.session_ended_by_server(session_id, "resume_failed"))
        if fence is not None:  # let another resume claim it (from a seq past the hole)
            try:
                await lifecycle.release(session_id, fence=fence)
            except Exception as error:  # left to the orphan sweep, as if this process had died
                _step_failed(session_id, error)
        return None

    new = Holder(
        session_id=session_id,
        fence=fence,
        model=row.model,
        principal=principal,
        resumable=True,
        socket=socket,
        next_seq=max(cursor, last) + 1,
    )
    logger.info("session taken over", extra={"session_id": str(session_id), "from": row.owner_process or "released"})
    await feed.announce(session_id, channel)  # its watchers join this holder (issue 28)
    await _reconcile(new, log, row)
    return new


async def _replay(log: framelog.SharedLog, session: ChatSession, last_seq: int) -> list[framelog.Frame]:
    """The log's frames after last_seq, every one of them, or ClientError `resume_unavailable`. A log that
    ends before last_seq while its holder lives (it lags, or Redis lost it) is waited for, up to
    CATCH_UP_SECONDS: the holder is asked to check it, and writes back from its memory what it lacks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATCH_UP_SECONDS
    asked = False
    while True:
        kept = await log.after(session.id, last_seq)
        missing = first_missing(kept.frames, last_seq)
        if kept.last >= last_seq and missing is None:
            return kept.frames
        if kept.start > last_seq + 1:
            raise unavailable("The frames after that last_seq are no longer kept.")
        if missing is not None:  # the holder appends only the seq after the log's last: no check mends this
            raise unavailable(f"The frames after that last_seq are incomplete (seq {missing} is missing).")
        why = f"last_seq {last_seq} is beyond the last frame this server has for it ({kept.last})."
        if not asked:
            if await _free(session):
                raise unavailable(why)  # nobody has the frames the log lacks
            try:
                await _ask(session, "frames.check")
            except Exception as exc:  # its next frame, or its pump, may still bring the log up to date
                _step_failed(session.id, exc)
            asked = True
        elif loop.time() > deadline:
            raise unavailable(why)
        await asyncio.sleep(0.1)


def _step_failed(session_id: uuid.UUID, exc: Exception) -> None:
    logger.warning("take-over step failed", extra={"session_id": str(session_id), "error": type(exc).__name__})


async def _reconcile(new: Holder, log: framelog.SharedLog, row: ChatSession) -> None:
    """What the last holder left, from the database: what it left open is interrupted (a reply left
    streaming; a message whose turn started and left no reply, never answered twice); a turn the client
    saw start and not end is ended for it (`turn_interrupted`, `processing_end`); messages saved and
    never started are answered here, in order, as they were asked."""
    lease = new.lease
    await messages.interrupt_open_turns(lease)
    pending = await messages.unanswered(lease.session_id)
    if await _turn_left_open(log, lease.session_id):
        stopped = "The server answering this message stopped; what it had said is saved. Send it again."
        await new.send(protocol.error(ErrorCode.TURN_INTERRUPTED, stopped))
        await new.send(protocol.processing_end())
    conversation = new.conversation
    conversation.system_message = row.system_message
    nodes, anchor = await messages.tree_of(lease.session_id)
    conversation.restore(nodes, anchor)  # the messages it is to answer wait unplaced
    conversation.requeue(pending, await new.charges([p.row_id for p in pending]))
    if pending:
        extra = {"session_id": str(lease.session_id), "count": len(pending)}
        logger.info("unanswered messages taken over", extra=extra)


async def _turn_left_open(log: framelog.SharedLog, session_id: uuid.UUID) -> bool:
    """Whether the log's last turn has a processing_start and no processing_end (the client saw it start)."""
    for _, text in reversed((await log.after(session_id, 0)).frames):
        kind = protocol.frame_type(text)
        if kind in {"processing_start", "processing_end"}:
            return kind == "processing_start"
    return False


async def _free(row: ChatSession) -> bool:
    """Whether nobody holds the session: released, or its process is gone (or was this one and let go).

    A holder whose heartbeat looks stale while this process's own view of the database is not `clear`
    (its own beats came back less than two heartbeats ago: the same outage stopped everyone's) is taken
    for alive: it is asked to hand over, and the wait claims the session once this process can tell."""
    owner = row.owner_process
    if not owner:
        return True
    if owner == liveness.PROCESS_ID:
        return holder.local(row.id) is None
    return liveness.own_view.clear() and not await _alive(owner)


async def _ask(row: ChatSession, event: str) -> None:
    """Send the session's holder `event` (`resume.handover`, `frames.check`) on its process's hub."""
    if row.owner_channel:
        await get_channel_layer().send(row.owner_channel, {"type": event, "session_id": str(row.id)})


async def _tell_fenced(row: ChatSession, fence: int) -> None:
    """Best effort: the old holder stops at once instead of at its next write."""
    if row.owner_channel:
        event = {"type": "session.fenced", "session_id": str(row.id), "fence": fence}
        try:
            await get_channel_layer().send(row.owner_channel, event)
        except Exception as exc:  # it finds out at its next write all the same
            logger.info("fencing notice not sent", extra={"session_id": str(row.id), "error": type(exc).__name__})


async def _forward(
    socket: SessionSocket, log: framelog.SharedLog, session_id: uuid.UUID, cursor: int, block_ms: int = 0
) -> int:
    """Send the client the shared log's frames after `cursor` (waiting up to block_ms for one); the new
    cursor. Raises _Hole, having sent nothing after it, when a frame is missing."""
    if block_ms:
        frames = await log.tail(session_id, cursor, block_ms)
    else:
        frames = (await log.after(session_id, cursor)).frames
    frames = [(seq, text) for seq, text in frames if seq > cursor]
    missing = first_missing(frames, cursor)
    for seq, text in frames if missing is None else frames[: missing - cursor - 1]:
        await socket.send_frame(text)
        cursor = seq
    if missing is not None:
        raise _Hole(f"seq {missing} is missing from the frame log")
    return cursor


class _Hole(Exception):
    """The shared log lacks a frame that the client needs next."""


async def _principal_of(session: ChatSession) -> Principal:
    """Who the session is charged to, with that principal's limits today."""
    return await storage.retry(lambda: sync_to_async(auth.principal_of_session)(session))


_alive = sync_to_async(liveness.is_alive)
