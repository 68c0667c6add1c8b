"""The OpenAI-compatible provider: OpenAI itself, or any server speaking Chat Completions
(vLLM, Ollama, llama.cpp). The only module that imports `openai`.

One `AsyncOpenAI` client per event loop, on the aiohttp transport (about half the
CPU per call of the default httpx2 transport, measured in bench/). Upstream
response bodies and the API key never leave this module: callers see text, or an
`UpstreamError` whose message is safe for any client.

The call goes through the client's own `post()` (its base URL, key, headers,
timeouts and status-error mapping) with a body encoded here by orjson, and the
answer comes back as the raw HTTP response: the SSE lines and the JSON are read
here. `chat.completions.create()` would walk every message of the request to
transform it and build a pydantic object per streamed chunk, which cost more CPU
than the rest of the turn (bench/client_overhead.py measures each way).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator

import httpx2
import openai
import orjson
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
            # Unparseable SSE or JSON, or JSON of the wrong shape (orjson's errors are ValueErrors).
            raise UpstreamError(
                ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read."
            ) from None
        except openai.OpenAIError as exc:
            raise _map_error(exc, mid_stream=reply.headers_received) from None

    async def _post(self, body: dict[str, object], *, stream: bool) -> httpx2.Response:
        """POST /chat/completions through the client; a status error is raised as the client raises it."""
        return await self.client().post(
            "/chat/completions", cast_to=httpx2.Response, content=_encode(body), stream=stream
        )

    async def _complete(self, model: str, messages: list[dict[str, str]], reply: Reply, deadline: float) -> str:
        async with asyncio.timeout_at(deadline):
            response = await self._post({"model": model, "messages": messages}, stream=False)
        completion = _decode(response.content)
        choices = _field(completion, "choices", list)
        if not choices:
            raise UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model returned no answer.")
        message = _field(_as_dict(choices[0]), "message", dict) or {}
        text = _field(message, "content", str) or ""
        _record_usage(completion, reply)
        return text

    async def _stream(
        self, model: str, messages: list[dict[str, str]], reply: Reply, deadline: float
    ) -> AsyncIterator[str]:
        """Yield text as it streams in.

        Each wait on the model is bounded by `deadline` separately, so no timeout
        scope spans a `yield` (the consumer's own awaits are never cancelled by it).
        """
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        async with asyncio.timeout_at(deadline):
            response = await self._post(body, stream=True)
        reply.headers_received = True
        finished = False
        # Closing the response (also when this generator is closed: the turn was
        # cancelled) closes the upstream request before it is read to the end.
        try:
            async for data in _sse_data(response, deadline):
                chunk = _as_dict(_decode(data))
                if chunk.get("error"):
                    # An error event inside the stream (what the client raises as APIError).
                    raise UpstreamError(
                        ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read."
                    )
                _record_usage(chunk, reply)
                for choice in _field(chunk, "choices", list) or ():
                    choice = _as_dict(choice)
                    if choice.get("finish_reason"):
                        finished = True
                    delta = _field(choice, "delta", dict)
                    text = _field(delta, "content", str) if delta else None
                    if text:
                        # Not accumulated here: the caller keeps what it shows (a long reply
                        # grown by += in two places copied it over and over).
                        yield text
        finally:
            await response.aclose()
        if not finished:
            # The connection closed before the model said it was done.
            raise interrupted()


def _decode(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson also refuses an unpaired surrogate escape ("\ud83d"), which a model sends when
        # it splits an emoji across two chunks: the standard decoder takes it, and the text is
        # repaired before it is saved or shown (chat/text.py). Truly malformed JSON fails here too.
        return json.loads(data)


def _encode(body: dict[str, object]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:
        # orjson refuses unpaired surrogates (a client may send "\ud800" escaped in its JSON);
        # json.dumps escapes them, as the client itself would have.
        return json.dumps(body).encode()


async def _sse_data(response: httpx2.Response, deadline: float) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event, up to `[DONE]` (the rest of the body is drained, so
    the connection can be reused). Transport failures are raised as the client raises them."""
    pending = b""
    data: list[bytes] = []
    done = False
    chunks = response.aiter_bytes().__aiter__()
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await anext(chunks, None)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=response.request) from exc
        except httpx2.RequestError as exc:
            raise openai.APIConnectionError(request=response.request) from exc
        if chunk is None:
            return
        if done:
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if line:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                continue  # event:, id:, retry: and comments carry nothing R2D2 uses
            if not data:
                continue
            event, data = b"\n".join(data), []
            if event.startswith(b"[DONE]"):
                done = True
                break
            yield event


def _as_dict(value: object) -> dict:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _field(container: dict, name: str, kind: type) -> object:
    """`container[name]` when it is a `kind` (or absent/null: None); anything else is unreadable."""
    value = container.get(name)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{name} is not a {kind.__name__}")
    return value


def _record_usage(payload: dict, reply: Reply) -> None:
    usage = _field(payload, "usage", dict)
    if usage:
        reply.prompt_tokens = _field(usage, "prompt_tokens", int)
        reply.completion_tokens = _field(usage, "completion_tokens", int)


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
