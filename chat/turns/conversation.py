"""One live session's turns: accepted, queued, answered one at a time, cancellable.

A `Conversation` belongs to the session's holder and owns every turn from end to end: it saves
the user's message when it is accepted, builds the prompt, calls the model, saves the reply and
sends it. It keeps the session's history in memory (the holder is its only writer).

A turn always ends: whatever fails after `processing_start` (the model, saving,
encoding, sending, a bug), the client gets one `error` frame and then
`processing_end`, and the next message is answered. Every write is conditioned on
the holder's lease (chat/turns/messages.py): a conversation whose session was taken
over elsewhere stops at its next write and tells its holder (`on_fenced`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from django.conf import settings

from chat import llm, protocol
from chat.models import MessageStatus, Role
from chat.ops import metrics, storage
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode, storage_unavailable
from chat.protocol.text import TextRepair
from chat.turns import messages, prompt
from chat.turns.draft import Draft
from chat.turns.messages import Fenced, Lease

logger = logging.getLogger(__name__)


class Reservation(Protocol):
    """What a turn holds of its principal's budget (chat/accounts/reservations.py's Reservation): a Protocol, so
    turns does not import accounts. Exactly one of `settle_soon` (the model was called) or `release` takes effect."""

    max_output_tokens: int | None

    async def keep(self, session_id: uuid.UUID, fence: int, row_id: int) -> None: ...

    async def cover(self, request: Sequence[dict[str, str]]) -> None: ...
    def settle_soon(self, reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> None: ...
    def release(self) -> None: ...
    def unusable(self, model: str) -> str | None: ...  # why the principal may not use a chain's alternate


Send = Callable[[str], Awaitable[None]]


class _Queued:
    """A message accepted (its row saved as `accepted`) and waiting for its turn."""

    __slots__ = (
        "content",
        "system_message",
        "stream",
        "row_id",
        "started",
        "reservation",
        "report_model",
        "answered_by",
    )

    def __init__(
        self,
        content: str,
        system_message: str | None,
        stream: bool,
        row_id: int,
        started: bool,
        reservation: Reservation | None,
        report_model: bool = False,
    ) -> None:
        self.content, self.system_message, self.stream, self.row_id = content, system_message, stream, row_id
        self.started = started  # saved as `started` already
        # Its quota reservation (chat/accounts/reservations.py): settled once its turn has called the model,
        # released when it never does (refused, or the queue dropped).
        self.reservation = reservation
        # The client asked to be told which model answered (in processing_end); not kept in the row, so a
        # holder that takes the session over does not tell it.
        self.report_model = report_model
        self.answered_by: str | None = None


class Conversation:
    # One per live session, so with thousands of idle sockets its size counts (bench/memory.py).
    __slots__ = (
        "lease",
        "model",
        "system_message",
        "history",
        "on_fenced",
        "_send",
        "_pending",
        "_worker",
        "_in_turn",
        "_generating",
        "_stop",
        "_closed",
        "_current",
        "_streamed",
    )

    def __init__(
        self,
        *,
        lease: Lease,
        model: str,
        send: Send,
        on_fenced: Callable[[], None] | None = None,
    ) -> None:
        self.lease = lease
        self.model = model
        self.system_message = ""
        self.history: list[tuple[str, str]] = []
        self._send = send
        self.on_fenced = on_fenced
        # Accepted messages waiting for their turn, and the task that answers them: it exists only
        # while there is work, so an idle session holds neither a task nor an asyncio.Queue
        # (about 3 KiB each, per session, with 10,000 sockets open: bench/memory.py).
        self._pending: collections.deque[_Queued] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._in_turn = False
        self._generating = False
        # Why the generation in progress is being stopped: a client's cancel, or an interruption
        # (a drain past its deadline). None while nobody asked.
        self._stop: MessageStatus | None = None
        self._closed = False
        self._current: int | None = None  # the row of the message being answered
        self._streamed: Draft | None = None  # the streamed reply being written (what its deltas said)

    @property
    def session_id(self) -> uuid.UUID:
        return self.lease.session_id

    async def accept(self, post: PostMessage, reservation: Reservation | None = None) -> None:
        """Take a message: refuse it when the queue is full, else save it and queue it for the worker.

        `reservation` (what admitting it reserved) is the turn's from here: released if refused."""
        try:
            await self._accept(post, reservation)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    async def _accept(self, post: PostMessage, reservation: Reservation | None) -> None:
        waiting = len(self._pending)
        if waiting >= settings.R2D2_MAX_QUEUED_MESSAGES:
            raise ClientError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} messages are already waiting in this session; wait for a reply.",
            )
        # Answered at once (the usual case): saved as `started` in the same statement, no second write.
        starts_now = not self._in_turn and not self._pending
        try:
            row_id = await messages.save_user_message(
                self.lease,
                content=post.user_message,
                system_message=post.system_message,
                client_message_id=post.client_message_id,
                stream=post.stream,
                started=starts_now,
            )
        except Fenced:
            self._lost()
            raise ClientError(ErrorCode.SESSION_NOT_OWNED, "This session was resumed elsewhere.") from None
        except messages.Duplicate:
            await self.refuse_duplicate(post.client_message_id)
            raise  # the original vanished meanwhile: cannot happen, rows are not deleted while live
        if reservation is not None and not starts_now:
            # Queued: should this process die first, whoever takes the session over settles what it reserved.
            await reservation.keep(self.lease.session_id, self.lease.fence, row_id)
        self._queue(
            _Queued(
                post.user_message, post.system_message, post.stream, row_id, starts_now, reservation, post.report_model
            )
        )

    async def refuse_duplicate(self, client_message_id: str) -> None:
        """A resend of a message this session already has (on any socket or process): refused with
        `duplicate_message`, whose message says the original's state. No new message, call or charge."""
        if not client_message_id:
            return
        original = await messages.original(self.session_id, client_message_id)
        if original is None:
            return
        raise ClientError(
            ErrorCode.DUPLICATE_MESSAGE,
            f"This session already has the message {client_message_id!r}; it is {self._state(original)}.",
        )

    def _state(self, original: messages.Original) -> str:
        """queued, answering, answered or failed: what became of a message, as its client would say it."""
        if original.reply_status in {MessageStatus.COMPLETE, MessageStatus.CANCELLED}:
            return "answered"
        if original.reply_status == MessageStatus.INCOMPLETE or original.row_id == self._current:
            return "answering"
        if original.status == MessageStatus.ACCEPTED and original.reply_status is None:
            return "queued"
        return "failed"  # its turn ended without a reply worth the name (an error, interrupted)

    def requeue(self, saved: list[messages.Unanswered], charge: Callable[[int], Reservation | None]) -> None:
        """Answer messages an earlier holder saved but did not answer, in order, as they were asked
        (`charge(row_id)`: what each turn is charged to: they were admitted when first accepted)."""
        for message in saved:
            reservation = charge(message.row_id)
            self._queue(_Queued(message.content, None, message.stream, message.row_id, False, reservation))

    def _queue(self, item: _Queued) -> None:
        self._pending.append(item)
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name=f"conversation-{self.session_id}")

    def cancel(self) -> bool:
        """Stop the generation in progress; False when nothing is generating."""
        return self._stop_generation(MessageStatus.CANCELLED)

    def interrupt(self) -> bool:
        """Stop the generation in progress as interrupted (the client gets `turn_interrupted`)."""
        return self._stop_generation(MessageStatus.INTERRUPTED)

    def _stop_generation(self, why: MessageStatus) -> bool:
        if not self._generating or self._worker is None:
            return False
        if self._stop is None:
            self._stop = why
            self._worker.cancel()
        return True

    @property
    def busy(self) -> bool:
        """A turn is running or messages wait for one (a resumable session is handed over only when not)."""
        return self._in_turn or bool(self._pending)

    @property
    def generating(self) -> bool:
        return self._generating

    @property
    def answering(self) -> int | None:
        """The row of the message whose turn is running, if any."""
        return self._current

    @property
    def streamed(self) -> str:
        """What the running turn's deltas have said so far ("" when it does not stream): a watcher's `partial`.
        A delta's text joins the draft and its frame is numbered in the same step, with no await between."""
        return self._streamed.text if self._streamed is not None else ""

    async def close(self, *, interrupt: bool = False) -> list[int]:
        """Stop for good: stop the generation (its partial reply is saved: cancelled, or interrupted)
        and drop the queue; returns the dropped messages' rows (still saved as `accepted`: the holder marks them
        `failed` when the session ends, chat/sessions/holder.py, and leaves them for the next holder otherwise)."""
        self._closed = True
        dropped = [queued.row_id for queued in self._pending]
        self._drop_pending()
        if self._worker is None:
            return dropped
        if self._generating:
            self._stop_generation(MessageStatus.INTERRUPTED if interrupt else MessageStatus.CANCELLED)
        # Otherwise the turn is saving its reply: let it finish.
        if self._worker is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        return dropped

    def _drop_pending(self) -> None:
        """Forget the messages still waiting, giving back what they reserved."""
        while self._pending:
            reservation = self._pending.popleft().reservation
            if reservation is not None:
                reservation.release()

    def _lost(self) -> None:
        """Another holder has the session: stop here without writing or sending anything more."""
        self._closed = True
        self._drop_pending()
        if self.on_fenced is not None:
            self.on_fenced()

    async def _run(self) -> None:
        """Answer the waiting messages in order, then end (`accept` starts another when one comes)."""
        try:
            while self._pending and not self._closed:
                queued = self._pending.popleft()
                self._in_turn, self._current, self._streamed = True, queued.row_id, None
                try:
                    await self._turn(queued)
                finally:
                    self._in_turn, self._current, self._streamed = False, None, None
                    if queued.reservation is not None:
                        queued.reservation.release()  # the turn ended before the model call: no charge
        finally:
            self._worker = None
            self._drop_pending()

    async def _turn(self, queued: _Queued) -> None:
        if not queued.started:
            # Recorded before the client sees the turn start: a holder that takes the session over never
            # answers it again, whatever becomes of this turn.
            try:
                await messages.set_status(self.lease, queued.row_id, MessageStatus.STARTED)
            except Fenced:
                self._lost()
                return
            except storage.Unavailable:  # down past the retry window: the model is not called
                await self._send_quietly(protocol.processing_start())
                return await self._storage_failed(queued)
            except Exception as exc:  # not recorded (a bug): the turn runs all the same
                extra = {"session_id": str(self.session_id), "error": type(exc).__name__}
                logger.info("turn start not recorded", extra=extra)
        await self._send_quietly(protocol.processing_start())
        try:
            await self._answer(queued)
        except Fenced:
            self._lost()
            return  # the new holder ends this turn for the client (turn_interrupted, processing_end)
        except ClientError as exc:
            metrics.turn_failed(exc.code)
            await self._send_quietly(protocol.error(exc.code, exc.message))
        except Exception as exc:
            if storage.connection_error(exc) is not None:  # before the model was called (a quota's counters)
                return await self._storage_failed(queued)
            metrics.turn_failed(ErrorCode.INTERNAL_ERROR)
            logger.exception("turn failed", extra={"session_id": str(self.session_id)})
            await self._mark_failed(queued.row_id)
            await self._send_quietly(protocol.error(ErrorCode.INTERNAL_ERROR, "R2D2 failed to answer; try again."))
        if queued.report_model:
            await self._send_quietly(protocol.processing_end_with_model(queued.answered_by))
        else:
            await self._send_quietly(protocol.processing_end())

    async def _answer(self, queued: _Queued) -> None:
        # Daphne (Twisted) writes a frame on the loop's next writable callback,
        # not in send(); building the model request below takes milliseconds of
        # CPU, so let processing_start leave first (two loop turns: the writer is
        # queued behind this task's own wake-up on the first).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if queued.system_message is not None:
            self.system_message = queued.system_message
        request = prompt.assemble_messages(
            system_message=self.system_message,
            history=self.history,
            user_message=queued.content,
            budget_chars=settings.R2D2_MAX_CONTEXT_CHARS,
        )
        if queued.reservation is not None:
            await queued.reservation.cover(request)  # its prompt, with the replies before it, within quota
        before = len(self.history)
        self.history.append((Role.USER.value, queued.content))
        reply = llm.Reply()
        draft = Draft(self.lease, self.model, reply, queued.row_id)
        if queued.stream:
            self._streamed = draft
        try:
            await self._reply(queued, request, reply, draft)
        except Exception as exc:
            if storage.connection_error(exc) is None:
                raise
            del self.history[before:]  # down past the retry window: "send it again"; saved once it is back
            storage.eventually(draft.abandon, what="failed turn")
            raise storage_unavailable() from None

    async def _reply(self, queued: _Queued, request: list[dict[str, str]], reply: llm.Reply, draft: Draft) -> None:
        repair = TextRepair()
        stopped: MessageStatus | None = None
        self._generating, self._stop = True, None
        try:
            reservation = queued.reservation
            chunks = llm.generate(
                model=self.model,
                messages=request,
                stream=queued.stream,
                reply=reply,
                max_output_tokens=reservation.max_output_tokens if reservation is not None else None,
                unusable=reservation.unusable if reservation is not None else None,
            )
            async for chunk in chunks:
                await self._said(repair.feed(chunk), queued.stream, draft)
            await self._said(repair.flush(), queued.stream, draft)
        except asyncio.CancelledError:
            if self._stop is None:
                raise
            asyncio.current_task().uncancel()
            stopped = self._stop
        except ClientError:
            await draft.abandon()
            raise
        finally:
            self._generating = False
            if draft.said:
                queued.answered_by = reply.model
            if queued.reservation is not None:  # charged what the model call cost, whatever came of it
                queued.reservation.settle_soon(reply, request, draft.text)

        if stopped is not None and not draft.said:
            await messages.set_status(self.lease, queued.row_id, stopped)  # nothing was said: the turn's end
        else:
            self.history.append((Role.ASSISTANT.value, draft.text))
            # Saved before the client sees it, so a process that dies right after
            # leaves no reply a person read but the database lacks.
            await draft.save(stopped or MessageStatus.COMPLETE)
        if stopped == MessageStatus.INTERRUPTED:
            raise ClientError(ErrorCode.TURN_INTERRUPTED, "This server stopped answering; send the message again.")
        if stopped is not None:
            return
        frame = protocol.message(draft.text)
        # Frames are ASCII (json.dumps escapes the rest), so characters are bytes.
        if len(frame) > settings.R2D2_MAX_OUTGOING_FRAME_BYTES:
            raise ClientError(
                ErrorCode.REPLY_TOO_LARGE,
                f"The reply ({len(frame)} bytes) is larger than one frame may be here; it is saved in the transcript.",
            )
        await self._send(frame)
        metrics.answered(reply)

    async def _said(self, text: str, stream: bool, draft: Draft) -> None:
        if not text:
            return
        if stream and not draft.said:
            metrics.first_delta(draft.reply)
        draft.add(text)
        if stream:
            await self._send(protocol.message_delta(text))
            await draft.checkpoint()

    async def _storage_failed(self, queued: _Queued) -> None:
        """No storage past the window, before the model call: "send it again"; the message is marked failed later."""
        metrics.turn_failed(ErrorCode.STORAGE_UNAVAILABLE)
        lease, row_id, error = self.lease, queued.row_id, storage_unavailable()
        storage.eventually(lambda: messages.set_status(lease, row_id, MessageStatus.FAILED), what="failed turn")
        await self._send_quietly(protocol.error(error.code, error.message))
        await self._send_quietly(protocol.processing_end())

    async def _mark_failed(self, row_id: int) -> None:
        """The turn failed on our side: its message says so (unless a reply was saved), so that no later
        holder answers it again. Best effort: the failure may be the database's."""
        try:
            await messages.set_status(self.lease, row_id, MessageStatus.FAILED)
        except Exception as exc:
            extra = {"session_id": str(self.session_id), "error": type(exc).__name__}
            logger.info("failed turn not marked", extra=extra)

    async def _send_quietly(self, frame: str) -> None:
        """Send a frame whose failure must not stop the turn from ending (the socket may be gone)."""
        try:
            await self._send(frame)
        except Exception:
            logger.exception("could not send a frame", extra={"session_id": str(self.session_id)})
