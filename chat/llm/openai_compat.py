"""The OpenAI-compatible provider: OpenAI itself, or any server speaking Chat Completions
(vLLM, Ollama, llama.cpp). The only module that imports `openai`.

One `AsyncOpenAI` client per event loop, on the aiohttp transport (about half the
CPU per call of the default httpx2 transport, measured in bench/). Upstream
response bodies and the API key never leave this module: callers see text, or an
`UpstreamError` whose message is safe for any client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

import openai
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chat.errors import ErrorCode
from chat.llm.base import Reply, UpstreamError, connection_failed, interrupted, timed_out, unavailable

logger = logging.getLogger(__name__)


@functools.cache
def _key_from_aws() -> str:
    # Imported here: boto3 is slow to import and most processes never need it.
    from r2d2site.aws_secrets import openai_api_key_from_aws

    return openai_api_key_from_aws()


def api_key() -> str:
    """OPENAI_API_KEY, else the key in AWS Secrets Manager / SSM, fetched on first use and kept."""
    if settings.OPENAI_API_KEY:
        return settings.OPENAI_API_KEY
    if settings.OPENAI_API_KEY_SECRET_ID or settings.OPENAI_API_KEY_PARAMETER:
        try:
            return _key_from_aws()
        except ImproperlyConfigured as exc:  # names what to fix, never the secret
            logger.error(str(exc))
            raise UpstreamError(
                ErrorCode.UPSTREAM_AUTH_FAILED, "The server could not read its model credentials."
            ) from None
    return ""


class OpenAIProvider:
    name = "openai"

    def __init__(self) -> None:
        self._clients: dict[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = {}

    def is_configured(self) -> bool:
        return bool(
            settings.OPENAI_API_KEY
            or settings.OPENAI_BASE_URL
            or settings.OPENAI_API_KEY_SECRET_ID
            or settings.OPENAI_API_KEY_PARAMETER
        )

    def client(self) -> openai.AsyncOpenAI:
        """The client for the running loop (aiohttp sessions cannot cross loops)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for stale in [other for other in self._clients if other.is_closed()]:
                del self._clients[stale]
            client = openai.AsyncOpenAI(
                # A local server (vLLM, Ollama, llama.cpp) takes any key.
                api_key=api_key() or "not-needed",
                base_url=settings.OPENAI_BASE_URL,
                timeout=settings.R2D2_UPSTREAM_TIMEOUT,
                max_retries=0,  # retries are the caller's: bounded by the whole-call deadline
                http_client=openai.DefaultAioHttpClient(timeout=settings.R2D2_UPSTREAM_TIMEOUT),
            )
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def generate(
        self, *, model: str, messages: list[dict[str, str]], stream: bool, reply: Reply, deadline: float
    ) -> AsyncIterator[str]:
        try:
            if stream:
                async for chunk in self._stream(model, messages, reply, deadline):
                    yield chunk
            else:
                yield await self._complete(model, messages, reply, deadline)
        except ValueError:
            # Unparseable SSE or JSON (pydantic's ValidationError is a ValueError too).
            raise UpstreamError(
                ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read."
            ) from None
        except openai.OpenAIError as exc:
            raise _map_error(exc, mid_stream=reply.headers_received) from None

    async def _complete(self, model: str, messages: list[dict[str, str]], reply: Reply, deadline: float) -> str:
        async with asyncio.timeout_at(deadline):
            completion = await self.client().chat.completions.create(model=model, messages=messages)
        if not completion.choices:
            raise UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model returned no answer.")
        reply.text = completion.choices[0].message.content or ""
        if completion.usage:
            reply.prompt_tokens = completion.usage.prompt_tokens
            reply.completion_tokens = completion.usage.completion_tokens
        return reply.text

    async def _stream(
        self, model: str, messages: list[dict[str, str]], reply: Reply, deadline: float
    ) -> AsyncIterator[str]:
        """Yield text as it streams in.

        Each wait on the model is bounded by `deadline` separately, so no timeout
        scope spans a `yield` (the consumer's own awaits are never cancelled by it).
        """
        async with asyncio.timeout_at(deadline):
            response = await self.client().chat.completions.create(
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
            raise interrupted()


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _map_error(exc: openai.OpenAIError, *, mid_stream: bool) -> UpstreamError:
    if isinstance(exc, openai.APIConnectionError):
        # Checked before the timeout: a refused or unroutable connection is reported as a
        # connect timeout by the aiohttp transport, but it is the server that cannot be reached.
        if mid_stream:
            return interrupted()
        if connection_failed(exc) or not isinstance(exc, openai.APITimeoutError):
            return unavailable()
        return timed_out()
    if isinstance(exc, openai.RateLimitError):
        return UpstreamError(
            ErrorCode.UPSTREAM_RATE_LIMITED,
            "The model provider is rate limiting requests; try again shortly.",
            retryable=True,
            retry_after=_retry_after(exc),
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamError(ErrorCode.UPSTREAM_AUTH_FAILED, "The server's model credentials were refused.")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return UpstreamError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.", retryable=True)
        return UpstreamError(
            ErrorCode.UPSTREAM_BAD_REQUEST,
            f"The model server refused the request (HTTP {exc.status_code}); check the model name.",
        )
    return UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read.")
