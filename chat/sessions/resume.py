"""Resuming a session from another socket: `chatbot_session_resume` (issue 12, issue 19).

The client sends the session's token and the last seq it has. Everything that can
refuse the resume is checked before it is answered, so a resume gets exactly one
answer: `session_resumed` (then the frames after last_seq, then live frames) or
one `error`.

- Held by this process: the holder replays from its own memory and the socket
  takes over; the old socket, if still open, is told `resumed_elsewhere`.
- Held elsewhere, or by nobody (released by a drain, or its process died): the
  shared log (chat/sessions/framelog.py, Redis) must cover the frames after
  last_seq, else `resume_unavailable`. The frames are replayed and the log tailed
  while the holder, asked over the channel layer, finishes the turns it accepted
  and releases the session; then this process claims it (the fence grows: the old
  holder can write nothing more) and reconciles from the database: a reply left
  streaming is marked interrupted (the client gets `turn_interrupted` and
  `processing_end` for the turn it saw start), and messages saved but not answered
  are answered here, in order. A holder that does not let go in time is fenced out.

Resumes of one session on this process run one at a time; across processes the
claim is one conditional UPDATE, so exactly one wins.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
import weakref

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from chat import protocol
from chat.accounts import auth
from chat.accounts.principals import Principal
from chat.models import ChatSession
from chat.ops import throttle
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import framelog, holder, lifecycle, liveness
from chat.sessions.holder import Holder, unavailable
from chat.sessions.socket import SessionSocket
from chat.turns import messages

logger = logging.getLogger(__name__)

#: How long a claimant waits for a live holder to finish its turns and let go before fencing it out.
HANDOVER_SECONDS = 30.0

_locks: weakref.WeakValueDictionary[uuid.UUID, asyncio.Lock] = weakref.WeakValueDictionary()


def token_matches(session: ChatSession, token: str) -> bool:
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return session.is_resumable and hmac.compare_digest(session.resume_token_hash, holder.token_hash(token))


async def resume(
    socket: SessionSocket, principal: Principal, session_id: uuid.UUID, token: str, last_seq: int
) -> Holder | None:
    """Attach `socket` to a resumable session, wherever it is held; ClientError says why not. None when
    the session ended while it was being taken over (the client was sent its end)."""
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
        held = holder.local(session_id)
        if held is not None:
            await held.attach(socket, last_seq)
            return held
        return await _take_over(socket, session, last_seq)


def _same_principal(principal: Principal, session: ChatSession) -> bool:
    """Only the principal a session was started for resumes it (it is charged for its turns)."""
    return (principal.user_id, principal.api_key_id) == (session.user_id, session.api_key_id) or principal.owns(
        session
    )


async def _take_over(socket: SessionSocket, session: ChatSession, last_seq: int) -> Holder | None:
    """Resume a session this process does not hold (see the module docstring)."""
    log = framelog.shared()
    if log is None:
        raise unavailable("This session is held by another server process that this one cannot reach.")
    session_id = session.id
    frames = await log.after(session_id, last_seq)
    last = frames[-1][0] if frames else await log.last_seq(session_id)
    if last_seq > last:
        # Beyond the last frame produced, or the log lost them (expired, or Redis restarted).
        raise unavailable(f"last_seq {last_seq} is beyond the last frame this server has for it ({last}).")
    if frames and frames[0][0] != last_seq + 1:
        raise unavailable("The frames after that last_seq are no longer kept.")
    principal = await _principal_of(session)
    cursor = frames[-1][0] if frames else last_seq
    await socket.send_frame(protocol.session_resumed(session_id, cursor))
    for _, text in frames:
        await socket.send_frame(text)

    # Answered: whatever fails from here is retried, and never becomes a second answer.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDOVER_SECONDS
    asked = False
    while True:
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
                fence = await lifecycle.claim(session_id, from_owner=row.owner_process, channel=channel)
                if fence is not None:
                    if row.owner_process and row.owner_process != liveness.PROCESS_ID:
                        await _tell_fenced(row, fence)
                    break
                continue  # another process claimed it first: ask that one
            if not asked:
                await _ask_to_hand_over(row)
                asked = True
            cursor = await _forward(socket, log, session_id, cursor, block_ms=250)
        except Exception as exc:  # PostgreSQL or Redis blinked: try again, the client is already answered
            logger.warning("take-over step failed", extra={"session_id": str(session_id), "error": type(exc).__name__})
            if loop.time() > deadline + HANDOVER_SECONDS:
                # Down for longer than any blink: the client is told, and may resume again later.
                await socket.send_frame(protocol.session_ended_by_server(session_id, "resume_failed"))
                return None
            await asyncio.sleep(0.5)

    # This process holds it now: the last frames its old holder wrote, then its own.
    cursor = await _forward(socket, log, session_id, cursor)
    last = max(cursor, await log.last_seq(session_id))
    new = Holder(
        session_id=session_id,
        fence=fence,
        model=row.model,
        principal=principal,
        resumable=True,
        socket=socket,
        next_seq=last + 1,
    )
    logger.info("session taken over", extra={"session_id": str(session_id), "from": row.owner_process or "released"})
    await _reconcile(new, log, row)
    return new


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
    conversation.requeue(pending, new.charge_only)
    if pending:
        extra = {"session_id": str(lease.session_id), "count": len(pending)}
        logger.info("unanswered messages taken over", extra=extra)


async def _turn_left_open(log: framelog.SharedLog, session_id: uuid.UUID) -> bool:
    """Whether the log's last turn has a processing_start and no processing_end (the client saw it start)."""
    for _, text in reversed(await log.after(session_id, 0)):
        kind = protocol.frame_type(text)
        if kind in {"processing_start", "processing_end"}:
            return kind == "processing_start"
    return False


async def _free(row: ChatSession) -> bool:
    """Whether nobody holds the session: released, or its process is gone (or was this one and let go)."""
    owner = row.owner_process
    if not owner:
        return True
    if owner == liveness.PROCESS_ID:
        return holder.local(row.id) is None
    return not await _alive(owner)


async def _ask_to_hand_over(row: ChatSession) -> None:
    if row.owner_channel:
        await get_channel_layer().send(row.owner_channel, {"type": "resume.handover", "session_id": str(row.id)})


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
    """Send the client the shared log's frames after `cursor` (waiting up to block_ms for one); the new cursor."""
    frames = await (log.tail(session_id, cursor, block_ms) if block_ms else log.after(session_id, cursor))
    for seq, text in frames:
        if seq > cursor:
            await socket.send_frame(text)
            cursor = seq
    return cursor


async def _principal_of(session: ChatSession) -> Principal:
    """Who the session is charged to, with that principal's limits today."""
    return await sync_to_async(auth.principal_of_session)(session)


_alive = sync_to_async(liveness.is_alive)
