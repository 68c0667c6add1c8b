"""Holding a live session: one path for every session, resumable or not.

Every live session is held by exactly one `Holder`, in exactly one server process
(the database names it: `owner_process`, and `owner_channel`, this process's hub).
The holder owns the session's `Conversation`, its lease (the session's `fence`:
every write of a turn is conditioned on it, chat/turns/messages.py), the principal
it charges, and the socket attached to it, if any.

`resumable` decides three things only:

- whether the client gets a resume token (chat/sessions/resume.py);
- whether its frames carry `session_id` and `seq` and are kept (chat/sessions/framelog.py);
- whether the session outlives its socket: detached, a resumable session carries on
  (its turns finish and are saved, its queue is answered, its frames kept) and ends
  as `abandoned` after R2D2_RESUME_WINDOW_SECONDS unless a client resumes it; any
  other session ends with its socket (`disconnect`).

The hub is this process's own channel on the channel layer: an operator's end, a
cancel from another socket, a hand-over request and a fencing notice reach the
holder there, attached to a socket or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import uuid
from collections.abc import Callable

from django.conf import settings

from chat import protocol
from chat.accounts import counters, quotas, reservations
from chat.accounts.principals import Principal
from chat.models import EndReason, MessageStatus
from chat.ops import metrics, storage, throttle
from chat.ops.tasks import Background
from chat.protocol import EditMessage, PostMessage, Regenerate, Turn, branches
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import feed, framelog, lifecycle
from chat.sessions.frames import LocalFrames
from chat.sessions.history import Memory
from chat.sessions.hub import Hub
from chat.sessions.socket import SessionSocket
from chat.turns import messages
from chat.turns.conversation import Conversation
from chat.turns.messages import Lease

logger = logging.getLogger(__name__)

#: A socket's own check before a message is admitted (its rate limit): raises ClientError to refuse it.
Gate = Callable[[], None]

#: The sessions this process holds, attached to a socket or not.
_held: dict[uuid.UUID, Holder] = {}


def local(session_id: uuid.UUID) -> Holder | None:
    """The session this process holds under that id, if any (and still in use)."""
    holder = _held.get(session_id)
    return holder if holder is not None and not holder.leaving else None


def held_here() -> list[Holder]:
    """Every session this process holds (for draining)."""
    return [holder for holder in _held.values() if not holder.leaving]


def new_token() -> tuple[str, str]:
    """A fresh resume token and the hash that is stored (the token itself never is)."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Holder:
    """One live session held by this process: its conversation, its lease, its principal, its socket if any."""

    __slots__ = (
        "session_id",
        "principal",
        "resumable",
        "lease",
        "conversation",
        "socket",
        "next_seq",
        "delivered",
        "frames",
        "log",
        "leaving",
        "marks",
        "feed",
        "_lock",
        "_window",
    )

    def __init__(
        self,
        *,
        session_id: uuid.UUID,
        fence: int,
        model: str,
        principal: Principal,
        resumable: bool,
        socket: SessionSocket | None,
        next_seq: int = 1,
        memory: Memory | None = None,
    ) -> None:
        self.session_id = session_id
        self.principal = principal
        self.resumable = resumable
        self.lease = Lease(session_id, fence)
        self.conversation = Conversation(lease=self.lease, model=model, send=self.send, on_fenced=self._fenced)
        if memory is not None:
            self.conversation.system_message = memory.system_message
            self.conversation.carried = memory.history
        self.socket = socket
        self.next_seq = next_seq
        self.delivered = next_seq - 1  # the last seq that went through `send` to its socket (the log may lag)
        self.frames = LocalFrames() if resumable else None
        # Its writer to the shared log, with Redis: in seq order, fenced, retried (chat/sessions/framelog.py).
        self.log = (
            framelog.writer(session_id, fence, self.frames, logged=next_seq - 1, on_fenced=self._fenced)
            if self.frames is not None
            else None
        )
        self.leaving = False  # ended, handed over, released or fenced: no longer this process's
        # Every frame numbered (a resumable session's seq; a plain session's own count) and, once the
        # session is watched, published to its watchers (chat/sessions/feed.py).
        self.marks = feed.Marks(next_seq - 1)
        self.feed: feed.Feed | None = None
        # A resumable session's socket writes and shared-log appends in seq order (asyncio.Lock wakes waiters
        # first come first served). A plain session's frames go straight to its socket: no lock to keep per
        # idle session (bench/memory.py).
        self._lock = asyncio.Lock() if resumable else None
        self._window: asyncio.TimerHandle | None = None
        _held[session_id] = self
        metrics.LIVE_SESSIONS.inc()

    # Frames --------------------------------------------------------------------

    async def send(self, frame: str) -> None:
        """The conversation's `send`: to the socket attached; for a resumable session numbered and kept too."""
        number = self.marks.note(frame)
        if self.frames is None:
            if self.feed is not None:
                self.feed.publish(number, protocol.sequenced(frame, self.session_id, number))
            if self.socket is not None:
                await self.socket.send_frame(frame)
            return
        seq = self.next_seq
        self.next_seq += 1
        text = protocol.sequenced(frame, self.session_id, seq)
        self.frames.append(seq, text)
        assert self._lock is not None  # resumable
        async with self._lock:
            if self.log is not None:  # back once the log holds it, or at once while the log lags
                await self.log.wrote(seq, text)
            self.delivered = seq
            if self.feed is not None:
                self.feed.publish(seq, text)
            if self.socket is not None:
                try:
                    await self.socket.send_frame(text)
                except Exception:  # the socket is going: the frame is kept for the resume
                    logger.info("frame not delivered", extra={"session_id": str(self.session_id), "seq": seq})

    def partial(self) -> str:
        return self.conversation.streamed

    def answering(self) -> int | None:
        return self.conversation.running

    # The socket ----------------------------------------------------------------

    async def detach(self, socket: SessionSocket) -> None:
        """The socket closed: a resumable session carries on without it for the resume window; any
        other ends (a socket that lost the session to another resume changes nothing)."""
        if self.socket is not socket or self.leaving:
            return
        self.socket = None
        if not self.resumable:
            if await self._leave():
                await lifecycle.end_many(session_ids=[self.session_id], reason=EndReason.DISCONNECT)
                if self.feed is not None:  # its watchers are told (its socket is gone)
                    await self.send(protocol.session_ended_by_server(self.session_id, EndReason.DISCONNECT.value))
                logger.info("session ended", extra={"session_id": str(self.session_id), "reason": "disconnect"})
            return
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

    async def attach(self, socket: SessionSocket, last_seq: int) -> None:
        """A client resumes on this process: replay what it lacks, then it gets the live frames."""
        if self.frames is None or self._lock is None:
            raise unavailable("That session is not resumable.")
        async with self._lock:  # no frame goes out between the replay and the first live one
            if last_seq > self.delivered:
                raise unavailable(f"last_seq {last_seq} is beyond this session's last frame ({self.delivered}).")
            frames = self.frames.after(last_seq, self.delivered)
            if frames is None:
                raise unavailable("The frames after that last_seq are no longer kept.")
            old, self.socket = self.socket, socket
            self._cancel_window()
            if old is not None and old is not socket:
                await _tell_resumed_elsewhere(old, self.session_id)
            await socket.send_frame(protocol.session_resumed(self.session_id, self.delivered))
            for _, text in frames:
                await socket.send_frame(text)
        logger.info("session resumed", extra={"session_id": str(self.session_id), "from_seq": last_seq})

    # Leaving -------------------------------------------------------------------

    async def end(self, reason: EndReason | None, frame: str | None = None, *, interrupt: bool = False) -> None:
        """End the session here: stop its conversation, record `reason` (None: it already ended
        elsewhere) and send `frame` (by default `session_end` with the reason) to the socket."""
        if not await self._leave(interrupt=interrupt):
            return
        if reason is not None:
            await lifecycle.end(session_id=self.session_id, reason=reason, fence=self.lease.fence)
            frame = frame or protocol.session_ended_by_server(self.session_id, reason.value)
        if frame is not None:
            try:
                await self.send(frame)  # after the conversation's last frames; numbered and kept if resumable
            except Exception:
                logger.info("frame not delivered", extra={"session_id": str(self.session_id)})
        self._let_go_of_socket()
        logger.info("session ended", extra={"session_id": str(self.session_id), "reason": reason or "elsewhere"})

    async def _leave(self, *, interrupt: bool = False, keep_queue: bool = False) -> bool:
        """Stop holding the session here (its conversation stopped, its socket let go); False if already.

        Every queued message a holder drops is dropped here: unless `keep_queue` (released or taken over:
        the next holder answers them), the session is ending, whatever ended it (the client, its socket, an
        operator, a revocation, the window), and they are marked `failed`: never answered, never `accepted`
        in an ended session."""
        if self.leaving:
            return False
        self.leaving = True
        self._cancel_window()
        if _held.get(self.session_id) is self:
            del _held[self.session_id]
            metrics.LIVE_SESSIONS.dec()
        dropped = await self.conversation.close(interrupt=interrupt)
        if not keep_queue:
            await self._fail(dropped)
        return True

    async def _fail(self, dropped: list[int], refusal: str | None = None) -> None:
        """Mark dropped queued messages `failed` (conditioned on the lease), after sending each `refusal` if given."""
        for row_id in dropped:
            if refusal is not None:
                await self.send(refusal)
            try:
                await messages.set_status(self.lease, row_id, MessageStatus.FAILED)
            except Exception as exc:  # fenced, or the database is down: the row stays `accepted`
                extra = {"session_id": str(self.session_id), "error": type(exc).__name__}
                logger.info("queued message not marked", extra=extra)

    def _let_go_of_socket(self) -> None:
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.dropped(self.session_id)

    async def hand_over(self) -> None:
        """Another process's client resumes this session: drop the socket, finish the turns
        accepted so far (their frames go to the shared log, which the new holder replays),
        then release the session so that the new holder can claim it."""
        if self.leaving:
            return
        self._cancel_window()
        old, self.socket = self.socket, None
        if old is not None:
            await _tell_resumed_elsewhere(old, self.session_id)
        # Polled: a turn ends in many ways (reply, error, cancel) and none of them is worth a hook here.
        while self.conversation.busy and not self.leaving:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.release()

    async def release(self, *, interrupt: bool = False) -> None:
        """Stop holding the session without ending it: any process may claim it, and answers what
        is left in its queue (the messages stay saved as `accepted`)."""
        if not await self._leave(interrupt=interrupt, keep_queue=True):
            return
        self._let_go_of_socket()
        if self.log is not None and not await self.log.flush(framelog.FLUSH_SECONDS, check=True):
            # Whoever claims it next replays only what the log holds; the turns are saved all the same.
            logger.warning("session released with its frame log behind", extra={"session_id": str(self.session_id)})
        # A turn failed for want of storage is marked failed before the next holder looks for messages to answer.
        await storage.settled(self.session_id, timeout=settings.R2D2_STORAGE_RETRY_SECONDS)
        await lifecycle.release(self.session_id, fence=self.lease.fence)
        logger.info("session released", extra={"session_id": str(self.session_id)})

    async def stop_for_drain(self) -> None:
        """Past the drain's deadline: the turn in progress is interrupted (its client gets `turn_interrupted`,
        its reply is saved as interrupted). A resumable session is released: whichever process resumes it
        answers its queued messages. Any other session's queued messages each get `server_draining`."""
        if self.resumable:
            await self.release(interrupt=True)
            return
        dropped = await self.conversation.close(interrupt=True)
        refusal = protocol.error(ErrorCode.SERVER_DRAINING, "This server restarted before answering; send it again.")
        await self._fail(dropped, refusal)

    def _fenced(self) -> None:
        """The conversation found that another holder has the session (its write was refused)."""
        spawn(self.lose())

    async def lose(self) -> None:
        """Another process took the session over: stop here, write nothing more, tell the socket."""
        socket, self.socket = self.socket, None
        if self.log is not None:
            self.log.close()  # its late frames would be refused by the log's fence anyway
        if not await self._leave(keep_queue=True):  # the new holder answers them
            return
        extra = {"session_id": str(self.session_id)}
        throttle.warn_throttled(logger, "session taken over elsewhere", key=throttle.client(), extra=extra)
        if socket is not None:
            await _tell_resumed_elsewhere(socket, self.session_id)

    # Turns ---------------------------------------------------------------------

    async def post(self, post: Turn, *, tally: counters.Tally | None = None, gate: Gate | None = None) -> None:
        """A client posts a message: admit it (its turn's cost reserved from the session's principal, atomically
        across processes, from this conversation's prompt and the principal's output cap), then accept it into
        the conversation's queue. The reservation travels with the message: settled when its turn ends, released
        if it never runs. Every refusal is one ClientError, and leaves nothing reserved.

        `tally`: the socket's own figures (an anonymous principal's); `gate`: the socket's own rate limit, taken
        once the message is known not to be a duplicate and before a quota counts it."""
        conversation = self.conversation
        await conversation.refuse_duplicate(post.client_message_id)  # before a quota counts it
        asked = _as_post(conversation, post)  # a regeneration or an edit: what its prompt will hold (or why not)
        if gate is not None:
            gate()
        reservation = await reservations.admit(
            self.principal,
            model=conversation.model,
            prompt_tokens_estimate=reservations.estimate_prompt_tokens(
                conversation.system_message, conversation.history, asked
            ),
            max_output_tokens=self.principal.limits.max_output_tokens,
            tally=tally,
        )
        try:
            await conversation.accept(post, reservation)
        except ClientError as exc:
            if exc.code == ErrorCode.SESSION_ENDED:
                # Ended elsewhere while this process held it (e.g. by a command that could not reach us).
                await self.end(None)
            raise

    async def switch_branch(self, message_id: int) -> None:
        """`chatbot_switch_branch`: the current branch becomes the one below `message_id`; every attached socket
        is told the new leaf (refused while a turn runs or messages wait: `session_busy`)."""
        leaf = await self.conversation.switch(message_id)
        await self.send(branches.branch_switched(self.session_id, leaf))

    async def charges(self, row_ids: list[int]) -> Callable[[int], reservations.Reservation | None]:
        """What each message admitted by an earlier holder is charged to: the reservation that holder kept for it,
        adopted under this lease (settled here, once), else the session's principal, charged what its turn costs."""
        model = self.conversation.model
        adopted = await reservations.adopt(self.principal, model, self.session_id, self.lease.fence, row_ids)
        return lambda row_id: adopted.get(row_id) or reservations.charge_only(self.principal, model)


def _as_post(conversation: Conversation, turn: Turn) -> PostMessage:
    """A turn as the post its prompt is estimated like (checking first that the message it names may be used)."""
    if isinstance(turn, Regenerate):
        text = conversation.answering(turn.message_id).content
    elif isinstance(turn, EditMessage):
        conversation.edited(turn.message_id)
        text = turn.user_message
    else:
        return turn
    return PostMessage(session_id=turn.session_id, user_message=text, system_message=None, stream=turn.stream)


def unavailable(why: str) -> ClientError:
    return ClientError(ErrorCode.RESUME_UNAVAILABLE, f"{why} Its transcript is kept; start a new session.")


async def _tell_resumed_elsewhere(socket: SessionSocket, session_id: uuid.UUID) -> None:
    socket.dropped(session_id)
    await _send_quietly(socket, protocol.session_ended_by_server(session_id, "resumed_elsewhere"))


tell_resumed_elsewhere = _tell_resumed_elsewhere  # also a waiting take-over's socket (chat/sessions/resume.py)


async def _send_quietly(socket: SessionSocket, frame: str) -> None:
    try:
        await socket.send_frame(frame)
    except Exception:  # the socket is going
        logger.info("frame not delivered", extra={"frame": protocol.frame_type(frame)})


async def start(
    socket: SessionSocket,
    *,
    model: str,
    principal: Principal,
    resumable: bool,
    client_address: str | None,
    memory: Memory | None = None,
) -> tuple[Holder, str | None]:
    """Start a session held by this process, attached to `socket`, its conversation starting from `memory` (a
    continued session's: the earlier one's system message and turns); returns its holder and its resume token
    (None unless resumable)."""
    token, hashed = new_token() if resumable else (None, "")
    session = await lifecycle.start(
        model=model,
        client_address=client_address,
        owner_channel=await hub.channel(),
        resume_token_hash=hashed,
        user_id=principal.user_id,
        api_key_id=principal.api_key_id,
        continued_from_id=memory.session.id if memory is not None else None,
        # The principal's limit of live sessions, counted and held in the same transaction.
        within=quotas.session_limit(principal),
    )
    holder = Holder(
        session_id=session.id,
        fence=session.fence,
        model=model,
        principal=principal,
        resumable=resumable,
        socket=socket,
        memory=memory,
    )
    return holder, token


# This process's channel for the sessions it holds (chat/sessions/hub.py), which finds them here.
hub = Hub(local)

#: Run in the background, held until it ends, a failure logged.
spawn = Background("session task").spawn
