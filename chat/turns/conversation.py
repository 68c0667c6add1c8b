"""One live session's turns: accepted, queued, answered one at a time, cancellable.

A `Conversation` belongs to the consumer that holds the session and owns every
turn from end to end: it saves the user's message when it is accepted, builds the
prompt, calls the model, saves the reply and sends it. It keeps the session's
history in memory (the holder of a session is its only writer, so the database
need not be read back each turn).

A turn always ends: whatever fails after `processing_start` (the model, saving,
encoding, sending, a bug), the client gets one `error` frame and then
`processing_end`, and the next message is answered.
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
from chat.ops import metrics
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode
from chat.protocol.text import TextRepair
from chat.turns import messages, prompt

logger = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[None]]
#: Told after every model call (answered, cancelled or failed): the reply, the request and the text said.
OnUsage = Callable[[llm.Reply, list[dict[str, str]], str], None]


class Conversation:
    # One per live session, so with thousands of idle sockets its size counts (bench/memory.py).
    __slots__ = (
        "session_id",
        "model",
        "system_message",
        "history",
        "on_usage",
        "_send",
        "_pending",
        "_worker",
        "_in_turn",
        "_generating",
        "_cancel_requested",
        "_closed",
    )

    def __init__(self, *, session_id: uuid.UUID, model: str, send: Send, on_usage: OnUsage | None = None) -> None:
        self.session_id = session_id
        self.model = model
        self.system_message = ""
        self.history: list[tuple[str, str]] = []
        self._send = send
        self.on_usage = on_usage
        # Accepted messages waiting for their turn, and the task that answers them: it exists only
        # while there is work, so an idle session holds neither a task nor an asyncio.Queue
        # (about 3 KiB each, per session, with 10,000 sockets open: bench/memory.py).
        self._pending: collections.deque[PostMessage] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._in_turn = False
        self._generating = False
        self._cancel_requested = False
        self._closed = False

    async def accept(self, post: PostMessage) -> None:
        """Take a message: refuse it when the queue is full, else save it and queue it for the worker."""
        waiting = len(self._pending)
        if waiting >= settings.R2D2_MAX_QUEUED_MESSAGES:
            raise ClientError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} messages are already waiting in this session; wait for a reply.",
            )
        await messages.save_user_message(
            session_id=self.session_id, content=post.user_message, system_message=post.system_message
        )
        self._pending.append(post)
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name=f"conversation-{self.session_id}")

    def cancel(self) -> bool:
        """Stop the generation in progress; False when nothing is generating."""
        if not self._generating or self._worker is None:
            return False
        if not self._cancel_requested:
            self._cancel_requested = True
            self._worker.cancel()
        return True

    @property
    def busy(self) -> bool:
        """A turn is running or messages wait for one (a resumable session is handed over only when not)."""
        return self._in_turn or bool(self._pending)

    async def close(self) -> None:
        """Stop for good: cancel the generation (its partial reply is saved) and drop the queue."""
        self._closed = True
        self._pending.clear()
        if self._worker is None:
            return
        if self._generating:
            self.cancel()
        # Otherwise the turn is saving its reply: let it finish.
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    async def _run(self) -> None:
        """Answer the waiting messages in order, then end (`accept` starts another when one comes)."""
        try:
            while self._pending and not self._closed:
                post = self._pending.popleft()
                self._in_turn = True
                try:
                    await self._turn(post)
                finally:
                    self._in_turn = False
        finally:
            self._worker = None

    async def _turn(self, post: PostMessage) -> None:
        await self._send_quietly(protocol.processing_start())
        try:
            await self._answer(post)
        except ClientError as exc:
            metrics.turn_failed(exc.code)
            await self._send_quietly(protocol.error(exc.code, exc.message))
        except Exception:
            metrics.turn_failed(ErrorCode.INTERNAL_ERROR)
            logger.exception("turn failed", extra={"session_id": str(self.session_id)})
            await self._send_quietly(protocol.error(ErrorCode.INTERNAL_ERROR, "R2D2 failed to answer; try again."))
        await self._send_quietly(protocol.processing_end())

    async def _answer(self, post: PostMessage) -> None:
        # Daphne (Twisted) writes a frame on the loop's next writable callback,
        # not in send(); building the model request below takes milliseconds of
        # CPU, so let processing_start leave first (two loop turns: the writer is
        # queued behind this task's own wake-up on the first).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if post.system_message is not None:
            self.system_message = post.system_message
        request = prompt.assemble_messages(
            system_message=self.system_message,
            history=self.history,
            user_message=post.user_message,
            budget_chars=settings.R2D2_MAX_CONTEXT_CHARS,
        )
        self.history.append((Role.USER.value, post.user_message))
        reply = llm.Reply()
        draft = _Draft(self.session_id, self.model, reply)
        repair = TextRepair()
        cancelled = False
        self._generating, self._cancel_requested = True, False
        try:
            async for chunk in llm.generate(model=self.model, messages=request, stream=post.stream, reply=reply):
                await self._said(repair.feed(chunk), post.stream, draft)
            await self._said(repair.flush(), post.stream, draft)
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            asyncio.current_task().uncancel()
            cancelled = True
        except ClientError:
            await draft.abandon()
            raise
        finally:
            self._generating = False
            if self.on_usage is not None:
                self.on_usage(reply, request, draft.text)

        if cancelled and not draft.said:
            return  # nothing was said: nothing to keep
        self.history.append((Role.ASSISTANT.value, draft.text))
        # Saved before the client sees it, so a process that dies right after
        # leaves no reply a person read but the database lacks.
        await draft.save(MessageStatus.CANCELLED if cancelled else MessageStatus.COMPLETE)
        if cancelled:
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

    async def _said(self, text: str, stream: bool, draft: _Draft) -> None:
        if not text:
            return
        if stream and not draft.said:
            metrics.first_delta(draft.reply)
        draft.add(text)
        if stream:
            await self._send(protocol.message_delta(text))
            await draft.checkpoint()

    async def _send_quietly(self, frame: str) -> None:
        """Send a frame whose failure must not stop the turn from ending (the socket may be gone)."""
        try:
            await self._send(frame)
        except Exception:
            logger.exception("could not send a frame", extra={"session_id": str(self.session_id)})


class _Draft:
    """A reply as the client has seen it, saved at the end, and while it streams at most
    R2D2_CHECKPOINT_SECONDS behind what was sent (marked incomplete until it is done)."""

    def __init__(self, session_id: uuid.UUID, model: str, reply: llm.Reply) -> None:
        self.session_id = session_id
        self.model = model
        self.reply = reply
        self._parts: list[str] = []  # joined when saved: `+=` on a long reply copies it per chunk
        self._text = ""
        self.row_id: int | None = None
        self._saved_chars = 0  # how much of `text` the row holds
        self._loop = asyncio.get_running_loop()
        self._saved_at = self._loop.time()

    def add(self, text: str) -> None:
        self._parts.append(text)

    @property
    def said(self) -> bool:
        return bool(self._parts or self._text)

    @property
    def text(self) -> str:
        """Everything said so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    async def checkpoint(self) -> None:
        interval = settings.R2D2_CHECKPOINT_SECONDS
        if interval <= 0 or self._loop.time() - self._saved_at < interval:
            return
        self._saved_at = self._loop.time()
        await self.save(MessageStatus.INCOMPLETE)

    async def save(self, status: MessageStatus) -> None:
        saving = asyncio.ensure_future(self._write(status, self.text))
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            # Cancelled (Stop, or the socket closed) while a checkpoint was being written: let it
            # finish, so the final save knows the row it wrote and appends to it.
            await saving
            raise

    async def _write(self, status: MessageStatus, text: str) -> None:
        usage = {
            "prompt_tokens": self.reply.prompt_tokens,
            "completion_tokens": self.reply.completion_tokens,
            "latency_ms": self.reply.latency_ms,
            "status": status,
        }
        if self.row_id is None:
            self.row_id = await messages.save_reply(session_id=self.session_id, content=text, model=self.model, **usage)
        else:
            await messages.extend_reply(row_id=self.row_id, more=text[self._saved_chars :], **usage)
        self._saved_chars = len(text)

    async def abandon(self) -> None:
        """The model failed midway (cut off, stalled, out of time): what it said is saved, marked
        interrupted, whether or not a checkpoint had saved any of it yet."""
        if self.said or self.row_id is not None:
            await self.save(MessageStatus.INTERRUPTED)
