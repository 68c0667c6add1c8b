"""One live session's turns: queued, run one at a time, cancellable.

A `Conversation` belongs to the consumer that started the session. It keeps the
session's history in memory (the connection that owns a session is the only
writer, so the database need not be read back each turn) and runs accepted
messages strictly in order on one worker task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from django.conf import settings

from chat import llm, protocol, services
from chat.models import Role
from chat.protocol import ErrorCode, PostMessage, ProtocolError

logger = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[None]]


class Conversation:
    def __init__(self, *, session_id: uuid.UUID, model: str, send: Send) -> None:
        self.session_id = session_id
        self.model = model
        self.system_message = ""
        self.history: list[tuple[str, str]] = []
        self._send = send
        self._queue: asyncio.Queue[PostMessage] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._in_turn = False
        self._generating = False
        self._cancel_requested = False
        self._closed = False

    def check_capacity(self) -> None:
        """Refuse a new message when the queue behind the current turn is full."""
        waiting = self._queue.qsize()
        if waiting >= settings.R2D2_MAX_QUEUED_MESSAGES:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} messages are already waiting in this session; wait for a reply.",
            )

    def submit(self, post: PostMessage) -> None:
        """Queue an accepted (already saved) message; the worker answers it in order."""
        self._queue.put_nowait(post)
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

    async def close(self) -> None:
        """Stop for good: cancel the generation (its partial reply is saved) and drop the queue."""
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._worker is None:
            return
        if self._generating:
            self.cancel()
        elif not self._in_turn:
            self._worker.cancel()  # idle, waiting for a message
        # Otherwise the turn is saving its reply: let it finish.
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    async def _run(self) -> None:
        while not self._closed:
            post = await self._queue.get()
            self._in_turn = True
            try:
                await self._turn(post)
            finally:
                self._in_turn = False

    async def _turn(self, post: PostMessage) -> None:
        await self._send(protocol.processing_start())
        # Daphne (Twisted) writes a frame on the loop's next writable callback,
        # not in send(); building the model request below takes milliseconds of
        # CPU, so let the frame leave first (two loop turns: the writer is queued
        # behind this task's own wake-up on the first).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if post.system_message is not None:
            self.system_message = post.system_message
        messages = services.assemble_messages(
            system_message=self.system_message,
            history=self.history,
            user_message=post.user_message,
            budget_chars=settings.R2D2_MAX_CONTEXT_CHARS,
        )
        self.history.append((Role.USER.value, post.user_message))
        reply = llm.Reply()
        failure: llm.LLMError | None = None
        cancelled = False
        self._generating, self._cancel_requested = True, False
        try:
            async for chunk in llm.generate(model=self.model, messages=messages, stream=post.stream, reply=reply):
                if post.stream:
                    await self._send(protocol.message_delta(chunk))
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            asyncio.current_task().uncancel()
            cancelled = True
        except llm.LLMError as exc:
            failure = exc
        except Exception:
            logger.exception("turn failed", extra={"session_id": str(self.session_id)})
            failure = llm.LLMError(ErrorCode.INTERNAL_ERROR, "R2D2 failed to answer; try again.")
        finally:
            self._generating = False

        if failure is not None:
            await self._send(protocol.error(failure.code, failure.message))
        elif cancelled and not reply.text:
            pass  # nothing was said: nothing to keep
        else:
            self.history.append((Role.ASSISTANT.value, reply.text))
            # Saved before the client sees it, so a process that dies right
            # after leaves no reply a person read but the database lacks.
            await services.add_assistant_message(
                session_id=self.session_id,
                content=reply.text,
                model=self.model,
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
                latency_ms=reply.latency_ms,
                cancelled=cancelled,
            )
            if not cancelled:
                await self._send(protocol.message(reply.text))
        await self._send(protocol.processing_end())
