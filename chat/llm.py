"""The only code that talks to the model API.

One `AsyncOpenAI` client per event loop, on the aiohttp transport (about half
the CPU per call of the default httpx2 transport, measured in bench/). Retries,
timeouts and error mapping live here so that callers see either text or one
`LLMError` with a protocol error code and a sentence safe to show a client:
upstream response bodies and the API key never leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
from django.conf import settings

from chat.protocol import ErrorCode

logger = logging.getLogger(__name__)

OFFLINE_NOTICE = (
    "R2D2 has no model configured (set OPENAI_API_KEY, and OPENAI_BASE_URL for a "
    "self-hosted server), so this is the offline responder talking."
)


class LLMError(Exception):
    """A model call that failed; `code` is an `ErrorCode`, `message` is safe for clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Reply:
    """What a model call produced, filled in as the stream arrives."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    headers_received: bool = False  # the model began answering (a later failure cut it off)

    @property
    def latency_ms(self) -> int:
        return int(((self.finished or time.monotonic()) - self.started) * 1000)


def is_configured() -> bool:
    """True when a real model is reachable; otherwise the offline responder answers."""
    return bool(settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL)


def warn_if_offline() -> None:
    """Say once, at start-up, that replies will come from the offline responder."""
    if not is_configured():
        logger.warning("no model configured (OPENAI_API_KEY, OPENAI_BASE_URL unset): the offline responder answers")


_clients: dict[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = {}


def get_client() -> openai.AsyncOpenAI:
    """The client for the running loop (aiohttp sessions cannot cross loops)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        for stale in [other for other in _clients if other.is_closed()]:
            del _clients[stale]
        client = openai.AsyncOpenAI(
            # A local server (vLLM, Ollama, llama.cpp) takes any key.
            api_key=settings.OPENAI_API_KEY or "not-needed",
            base_url=settings.OPENAI_BASE_URL,
            timeout=settings.R2D2_UPSTREAM_TIMEOUT,
            max_retries=0,  # retries are ours: bounded by the whole-call timeout
            http_client=openai.DefaultAioHttpClient(timeout=settings.R2D2_UPSTREAM_TIMEOUT),
        )
        _clients[loop] = client
    return client


async def close_client() -> None:
    """Close the running loop's client (tests, and anything else whose loop ends)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.close()


async def generate(*, model: str, messages: list[dict[str, str]], stream: bool, reply: Reply) -> AsyncIterator[str]:
    """Yield the reply's text chunks (one chunk when not streaming), filling `reply`.

    The whole call, retries included, is bounded by R2D2_UPSTREAM_TIMEOUT.
    Cancelling the consuming task closes the upstream HTTP request.
    """
    if not is_configured():
        async for chunk in _offline(messages, reply):
            yield chunk
        return
    deadline = asyncio.get_running_loop().time() + settings.R2D2_UPSTREAM_TIMEOUT
    attempt = 0
    while True:
        try:
            if stream:
                async for chunk in _stream(model, messages, reply, deadline):
                    yield chunk
            else:
                yield await _complete(model, messages, reply, deadline)
            reply.finished = time.monotonic()
            return
        except TimeoutError:
            logger.warning("model call timed out", extra={"model": model, "attempt": attempt})
            raise LLMError(ErrorCode.UPSTREAM_TIMEOUT, "The model did not answer in time.") from None
        except ValueError:
            # Unparseable SSE or JSON (pydantic's ValidationError is a ValueError too).
            logger.warning("model sent an unreadable response", extra={"model": model})
            raise LLMError(
                ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read."
            ) from None
        except openai.OpenAIError as exc:
            error = _map_error(exc, mid_stream=reply.headers_received)
            delay = _retry_delay(exc, attempt)
            # Retry only what may succeed, only before the client saw any text,
            # and only when the wait fits in the remaining time.
            if (
                delay is None
                or reply.headers_received
                or attempt >= settings.R2D2_UPSTREAM_RETRIES
                or asyncio.get_running_loop().time() + delay >= deadline
            ):
                logger.warning(
                    "model call failed",
                    extra={"code": error.code, "upstream": type(exc).__name__, "attempt": attempt},
                )
                raise error from None
            attempt += 1
            await asyncio.sleep(delay)


async def _complete(model: str, messages: list[dict[str, str]], reply: Reply, deadline: float) -> str:
    async with asyncio.timeout_at(deadline):
        completion = await get_client().chat.completions.create(model=model, messages=messages)
    if not completion.choices:
        raise LLMError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model returned no answer.")
    reply.text = completion.choices[0].message.content or ""
    if completion.usage:
        reply.prompt_tokens = completion.usage.prompt_tokens
        reply.completion_tokens = completion.usage.completion_tokens
    return reply.text


async def _stream(model: str, messages: list[dict[str, str]], reply: Reply, deadline: float) -> AsyncIterator[str]:
    """Yield text as it streams in.

    Each wait on the model is bounded by `deadline` separately, so no timeout
    scope spans a `yield` (the consumer's own awaits are never cancelled by it).
    """
    async with asyncio.timeout_at(deadline):
        response = await get_client().chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    reply.headers_received = True
    finished = False
    async with response:
        chunks = response.__aiter__()
        while True:
            async with asyncio.timeout_at(deadline):
                chunk = await anext(chunks, None)
            if chunk is None:
                break
            if chunk.usage:
                reply.prompt_tokens = chunk.usage.prompt_tokens
                reply.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.finish_reason:
                    finished = True
                text = choice.delta.content if choice.delta else None
                if text:
                    reply.text += text
                    yield text
    if not finished:
        # The connection closed before the model said it was done.
        raise _interrupted()


def _interrupted() -> LLMError:
    return LLMError(ErrorCode.UPSTREAM_STREAM_INTERRUPTED, "The model's answer was cut off midway.")


def _retry_delay(exc: openai.OpenAIError, attempt: int) -> float | None:
    """Seconds to wait before retrying, or None when retrying cannot help."""
    if isinstance(exc, openai.RateLimitError):
        retry_after = exc.response.headers.get("retry-after")
        try:
            return max(0.0, float(retry_after)) if retry_after else 0.5 * 2**attempt
        except ValueError:
            return 0.5 * 2**attempt
    if isinstance(exc, openai.InternalServerError) or (
        isinstance(exc, openai.APIConnectionError) and (_refused(exc) or not isinstance(exc, openai.APITimeoutError))
    ):
        return 0.25 * 2**attempt
    return None


def _refused(exc: BaseException) -> bool:
    """True when the cause is a refused or reset connection.

    The aiohttp transport reports a refused connection as a connect *timeout*;
    the cause chain still holds the ConnectionRefusedError.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _map_error(exc: openai.OpenAIError, *, mid_stream: bool) -> LLMError:
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return LLMError(ErrorCode.UPSTREAM_TIMEOUT, "The model did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        if mid_stream:
            return _interrupted()
        return LLMError(ErrorCode.UPSTREAM_UNAVAILABLE, "The model server could not be reached.")
    if isinstance(exc, openai.RateLimitError):
        return LLMError(
            ErrorCode.UPSTREAM_RATE_LIMITED, "The model provider is rate limiting requests; try again shortly."
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMError(ErrorCode.UPSTREAM_AUTH_FAILED, "The server's model credentials were refused.")
    if isinstance(exc, openai.InternalServerError):
        return LLMError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return LLMError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.")
        return LLMError(
            ErrorCode.UPSTREAM_BAD_REQUEST,
            f"The model server refused the request (HTTP {exc.status_code}); check the model name.",
        )
    return LLMError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read.")


async def _offline(messages: list[dict[str, str]], reply: Reply) -> AsyncIterator[str]:
    """A dev convenience so a fresh clone chats end to end; never used to test the model integration."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    text = f"{OFFLINE_NOTICE} You said: {last}"
    for word in text.split(" "):
        chunk = word if not reply.text else " " + word
        reply.text += chunk
        await asyncio.sleep(0.01)
        yield chunk
    reply.completion_tokens = None
    reply.finished = time.monotonic()
