"""One live session's turns: accepted, queued, answered one at a time, cancellable.

A `Conversation` belongs to the holder of the session and owns every
turn from end to end: it saves the user's message when it is accepted, builds the
prompt, calls the model, saves the reply and sends it. It keeps the session's
messages in memory as a tree (chat/turns/tree.py; the holder of a session is its
only writer, so the database need not be read back each turn): the model is sent
the path from the root to the message answered. A regeneration and an edit
(issue 29) are turns like a post: queued, charged, fenced, resent and taken over
the same way.

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
from collections.abc import Awaitable, Callable

from django.conf import settings

from chat import llm, protocol
from chat.models import MessageStatus, Role
from chat.ops import metrics, storage
from chat.protocol import EditMessage, PostMessage, Regenerate, Turn, branches
from chat.protocol.errors import ClientError, ErrorCode, storage_unavailable
from chat.protocol.text import TextRepair
from chat.turns import messages, prompt, tree
from chat.turns.draft import Draft
from chat.turns.messages import Fenced, Lease
from chat.turns.queued import Queued, Reservation

logger = logging.getLogger(__name__)


Send = Callable[[str], Awaitable[None]]


class Conversation:
    # One per live session, so with thousands of idle sockets its size counts (bench/memory.py).
    __slots__ = (
        "lease",
        "model",
        "system_message",
        "carried",
        "nodes",
        "leaf",
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
        # A continued session's memory: the turns of the conversation it continues (their current branch).
        self.carried: list[tuple[str, str]] = []
        self.nodes: dict[int, tree.Node] = {}  # this session's messages, all branches
        self.leaf: int | None = None  # the current branch's last message
        self._send = send
        self.on_fenced = on_fenced
        # Accepted messages waiting for their turn, and the task that answers them: it exists only
        # while there is work, so an idle session holds neither a task nor an asyncio.Queue
        # (about 3 KiB each, per session, with 10,000 sockets open: bench/memory.py).
        self._pending: collections.deque[Queued] = collections.deque()
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

    @property
    def history(self) -> list[tuple[str, str]]:
        """What the model remembers before the next post: the carried turns, then the current branch."""
        return self.carried + tree.remembered(tree.path(self.nodes, self.leaf))

    def restore(self, nodes: list[tree.Node], anchor: int | None) -> None:
        """Take up a session's tree as the database has it (a holder that takes a session over)."""
        self.nodes = tree.index(nodes)
        self.leaf = tree.leaf(self.nodes, anchor)

    def answering(self, message_id: int | None) -> tree.Node:
        """The user message a regeneration answers again (ClientError says why none)."""
        return tree.answering(self.nodes, self.leaf, message_id)

    def edited(self, message_id: int) -> tree.Node:
        """The user message an edit makes a new version of (ClientError says why none)."""
        return tree.edited(self.nodes, message_id)

    async def switch(self, message_id: int) -> int | None:
        """Make the branch below `message_id` the current one; returns the new leaf. Refused while turns run or
        wait (their place in the tree would change under them)."""
        if self.busy:
            raise ClientError(ErrorCode.SESSION_BUSY, "A turn is running or waiting in this session; switch after it.")
        tree.placed(self.nodes, message_id)
        try:
            await messages.move_anchor(self.lease, message_id)
        except Fenced:
            self._lost()
            raise ClientError(ErrorCode.SESSION_NOT_OWNED, "This session was resumed elsewhere.") from None
        self.leaf = tree.leaf(self.nodes, message_id)
        return self.leaf

    async def accept(self, post: Turn, reservation: Reservation | None = None) -> None:
        """Take a turn (a post, a regeneration, an edit): refuse it when the queue is full, else save it and
        queue it for the worker.

        `reservation` (what admitting it reserved) is the turn's from here: released if refused."""
        try:
            await self._accept(post, reservation)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    async def _accept(self, post: Turn, reservation: Reservation | None) -> None:
        waiting = len(self._pending)
        if waiting >= settings.R2D2_MAX_QUEUED_MESSAGES:
            raise ClientError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} messages are already waiting in this session; wait for a reply.",
            )
        # Answered at once (the usual case): saved as `started` in the same statement, no second write.
        starts_now = not self._in_turn and not self._pending
        try:
            if isinstance(post, Regenerate):
                answering = self.answering(post.message_id)
                row_id = await messages.save_regeneration(
                    self.lease, answering=answering.id, model=self.model, client_message_id=post.client_message_id,
                    stream=post.stream, started=starts_now
                )  # fmt: skip
                queued = Queued(answering.content, None, post.stream, row_id, starts_now, reservation)
                queued.place(answering.id, placed=True, regenerates=True, with_ids=post.with_ids)
            else:
                edit = isinstance(post, EditMessage)
                parent = self.edited(post.message_id).parent_id if edit else self.leaf
                system_message = None if edit else post.system_message
                row_id = await messages.save_user_message(
                    self.lease, content=post.user_message, system_message=system_message, stream=post.stream,
                    client_message_id=post.client_message_id, started=starts_now,
                    parent_id=parent if edit or starts_now else None, version_of=post.message_id if edit else None
                )  # fmt: skip
                queued = Queued(post.user_message, system_message, post.stream, row_id, starts_now, reservation)
                queued.place(parent, placed=edit, with_ids=post.with_ids)
        except Fenced:
            self._lost()
            raise ClientError(ErrorCode.SESSION_NOT_OWNED, "This session was resumed elsewhere.") from None
        except messages.Duplicate:
            await self.refuse_duplicate(post.client_message_id)
            raise  # the original vanished meanwhile: cannot happen, rows are not deleted while live
        if isinstance(post, PostMessage):
            queued.report_model = post.report_model
        if reservation is not None and not starts_now:
            # Queued: should this process die first, whoever takes the session over settles what it reserved.
            await reservation.keep(self.lease.session_id, self.lease.fence, row_id)
        self._queue(queued)

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
            queued = Queued(message.content, None, message.stream, message.row_id, False, charge(message.row_id))
            if message.role == Role.ASSISTANT and message.reply_to in self.nodes:  # a regeneration
                queued.content = self.nodes[message.reply_to].content
                queued.place(message.reply_to, placed=True, regenerates=True)
            else:  # a post (no parent yet), or an edit (its parent was set when it was saved)
                queued.place(message.parent_id, placed=message.version_of is not None)
            self._queue(queued)

    def _queue(self, item: Queued) -> None:
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
    def running(self) -> int | None:
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

    async def _turn(self, queued: Queued) -> None:
        if not queued.placed:
            queued.parent = self.leaf  # a post continues the current branch as it is when its turn starts
        status = MessageStatus.INCOMPLETE if queued.regenerates else MessageStatus.STARTED
        try:
            # Recorded before the client sees the turn start: a holder that takes the session over never
            # answers it again, whatever becomes of this turn (nor one an earlier holder failed: not waiting).
            started = queued.started or await messages.start_turn(self.lease, queued.row_id, queued.parent, status)
            if not started:
                return
            if queued.placed:  # a new version: the current branch is now the one it starts
                await messages.move_anchor(self.lease, queued.row_id)
        except Fenced:
            self._lost()
            return
        except storage.Unavailable:  # down past the retry window: the model is not called
            await self._send_quietly(protocol.processing_start())
            return await self._storage_failed(queued)
        except ClientError:  # the session ended meanwhile: the holder finds out at its next write
            pass
        except Exception as exc:  # not recorded (a bug): the turn runs all the same
            extra = {"session_id": str(self.session_id), "error": type(exc).__name__}
            logger.info("turn start not recorded", extra=extra)
        role = Role.ASSISTANT if queued.regenerates else Role.USER
        content = "" if queued.regenerates else queued.content
        self.nodes[queued.row_id] = tree.Node(queued.row_id, queued.parent, role, content, status)
        self.leaf = queued.row_id
        start = protocol.processing_start()
        if queued.with_ids:
            start = branches.with_ids(start, message_id=queued.message_id)
        await self._send_quietly(start)
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
            end = protocol.processing_end_with_model(queued.answered_by)
        else:
            end = protocol.processing_end()
        if queued.with_ids:
            end = branches.with_ids(end, message_id=queued.message_id, reply_id=queued.reply_id)
        await self._send_quietly(end)

    async def _answer(self, queued: Queued) -> None:
        # Daphne (Twisted) writes a frame on the loop's next writable callback,
        # not in send(); building the model request below takes milliseconds of
        # CPU, so let processing_start leave first (two loop turns: the writer is
        # queued behind this task's own wake-up on the first).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if queued.system_message is not None:
            self.system_message = queued.system_message
        # The path to the message answered, never a sibling branch (for a regeneration: to the message it answers).
        before = queued.parent
        if queued.regenerates and queued.parent in self.nodes:
            before = self.nodes[queued.parent].parent_id
        request = prompt.assemble_messages(
            system_message=self.system_message,
            history=self.carried + tree.remembered(tree.path(self.nodes, before)),
            user_message=queued.content,
            budget_chars=settings.R2D2_MAX_CONTEXT_CHARS,
        )
        if queued.reservation is not None:
            await queued.reservation.cover(request)  # its prompt, with the replies before it, within quota
        reply = llm.Reply()
        if queued.regenerates:  # its reply row exists: the text is written into it
            draft = Draft(self.lease, self.model, reply, queued.row_id, row_id=queued.row_id)
        else:
            draft = Draft(self.lease, self.model, reply, queued.row_id)
        if queued.stream:
            self._streamed = draft
        try:
            await self._reply(queued, request, reply, draft)
        except Exception as exc:
            if storage.connection_error(exc) is None:
                raise
            # Down past the retry window: "send it again" (the message stays the leaf, unanswered: a regenerate
            # retries it); its state is saved once the database is back.
            storage.eventually(draft.abandon, what="failed turn", key=self.session_id)
            raise storage_unavailable() from None

    async def _reply(self, queued: Queued, request: list[dict[str, str]], reply: llm.Reply, draft: Draft) -> None:
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
            # Saved before the client sees it, so a process that dies right after
            # leaves no reply a person read but the database lacks.
            status = stopped or MessageStatus.COMPLETE
            await draft.save(status)
            queued.reply_id = draft.row_id
            if draft.row_id is not None:
                self.nodes[draft.row_id] = tree.Node(
                    draft.row_id, queued.message_id, Role.ASSISTANT, draft.text, status
                )
                self.leaf = draft.row_id
        if stopped == MessageStatus.INTERRUPTED:
            raise ClientError(ErrorCode.TURN_INTERRUPTED, "This server stopped answering; send the message again.")
        if stopped is not None:
            return
        frame = protocol.message(draft.text)
        if queued.with_ids:
            frame = branches.with_ids(frame, reply_id=queued.reply_id)
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

    async def _storage_failed(self, queued: Queued) -> None:
        """No storage past the window, before the model call: "send it again"; the message is marked failed later."""
        metrics.turn_failed(ErrorCode.STORAGE_UNAVAILABLE)
        lease, row_id, error = self.lease, queued.row_id, storage_unavailable()
        storage.eventually(lambda: messages.fail_turn(lease, row_id), what="failed turn", key=self.session_id)
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
