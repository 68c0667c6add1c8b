"""The OpenAI-compatible provider: OpenAI itself, or any server speaking Chat Completions
(vLLM, Ollama, llama.cpp, Azure OpenAI's v1 API), one instance per upstream (chat/llm/upstreams.py).

Upstream response bodies and the API key never leave this module: callers see text,
or an `UpstreamError` whose message is safe for any client.

The call is a plain POST to `<base_url>/chat/completions` on an aiohttp session owned here
(one per upstream and event loop), with a body encoded by orjson and the SSE lines and the
JSON read here with orjson; the URL and headers are built here from the settings. The
`openai` package is not used at all: `chat.completions.create()` cost 3.2 ms CPU per
streamed call (a pydantic object per chunk), its `post()` ~0.9 ms against ~0.31 ms for a bare
aiohttp POST (bench/client_overhead.py), and importing it took 0.4-0.8 s of every process's
start for nothing but a URL and three headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from yarl import URL

from chat.llm import upstreams
from chat.llm.base import Deadlines, Reply, UpstreamError, connection_failed, interrupted, timed_out, unavailable
from chat.llm.credentials import api_key_from_aws
from chat.protocol.errors import ErrorCode

logger = logging.getLogger(__name__)

#: Where the default upstream goes when OPENAI_BASE_URL is unset (as the openai client did).
OPENAI_URL = "https://api.openai.com/v1"
USER_AGENT = "R2D2"
# 1,000 connections per upstream, idle ones kept 5 s (what openai.DefaultAioHttpClient had);
# aiohttp has no separate cap on idle connections.
_POOL_LIMIT = 1000
_KEEPALIVE_SECONDS = 5.0
# An error's body is read (never shown) only so its connection can be reused; a longer one closes it.
_ERROR_BODY_LIMIT = 64 * 1024


def upstream(name: str = upstreams.DEFAULT) -> upstreams.Upstream:
    """The upstream `name` as the settings give it now (the default one from OPENAI_*)."""
    if name == upstreams.DEFAULT:
        return upstreams.Upstream(
            name=name,
            base_url=settings.OPENAI_BASE_URL,
            api_key=settings.OPENAI_API_KEY,
            api_key_secret_id=settings.OPENAI_API_KEY_SECRET_ID,
            api_key_parameter=settings.OPENAI_API_KEY_PARAMETER,
        )
    return settings.R2D2_UPSTREAMS[name]


@functools.cache
def _key_from_aws(secret_id: str, parameter: str, setting: str) -> str:
    return api_key_from_aws(secret_id=secret_id, parameter=parameter, setting=setting)


def api_key(config: upstreams.Upstream) -> str:
    """The upstream's key as given, else the one in AWS Secrets Manager / SSM, fetched on first use and kept."""
    if config.api_key:
        return config.api_key
    if config.api_key_secret_id or config.api_key_parameter:
        try:
            return _key_from_aws(config.api_key_secret_id, config.api_key_parameter, config.key_setting)
        except ImproperlyConfigured as exc:  # names what to fix, never the secret
            logger.error(str(exc))
            raise UpstreamError(
                ErrorCode.UPSTREAM_AUTH_FAILED, "The server could not read its model credentials.", ours=True
            ) from None
    return ""


def headers(config: upstreams.Upstream) -> dict[str, str]:
    """What every request to the upstream carries: its key (none when it has none: a local server
    takes any), JSON both ways, and for OpenAI itself the organization and project when set."""
    found = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": USER_AGENT}
    key = api_key(config)
    if key:
        found["Authorization"] = f"Bearer {key}"
    if config.name == upstreams.DEFAULT:
        if settings.OPENAI_ORG_ID:
            found["OpenAI-Organization"] = settings.OPENAI_ORG_ID
        if settings.OPENAI_PROJECT_ID:
            found["OpenAI-Project"] = settings.OPENAI_PROJECT_ID
    return found


@dataclass(slots=True)
class _Session:
    """One event loop's way to one upstream: the aiohttp session that makes the calls, with
    what each call needs worked out once."""

    session: aiohttp.ClientSession
    url: URL
    proxy_headers: Mapping[str, str] | None

    @classmethod
    def open(cls, config: upstreams.Upstream) -> _Session:
        url = URL((config.base_url or OPENAI_URL).rstrip("/") + "/chat/completions")
        proxy, proxy_headers = _env_proxy(url)
        timeout = settings.R2D2_UPSTREAM_TIMEOUT
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_POOL_LIMIT, keepalive_timeout=_KEEPALIVE_SECONDS),
            headers=headers(config),
            # A timeout on connecting; none on the whole or on each read: the caller's
            # deadlines bound every wait (chat/llm/base.py, Deadlines), a long stream included.
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout, sock_read=None),
            proxy=proxy,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )
        return cls(session, url, proxy_headers)


def _env_proxy(url: URL) -> tuple[URL | None, dict[str, str] | None]:
    """HTTP(S)_PROXY and NO_PROXY for `url`, read once: aiohttp's own `trust_env` would read them
    again, on a thread, for every request."""
    try:
        proxy, auth = get_env_proxy_for_url(url)
    except LookupError:
        return None, None
    return proxy, ({"Proxy-Authorization": auth.encode()} if auth else None)


class OpenAIProvider:
    """The upstream `upstream_name` (the default one: `openai`)."""

    def __init__(self, upstream_name: str = upstreams.DEFAULT) -> None:
        self.name = upstream_name
        self._sessions: dict[asyncio.AbstractEventLoop, _Session] = {}

    def is_configured(self) -> bool:
        return upstream(self.name).configured

    def _session(self) -> _Session:
        """The running loop's session (aiohttp sessions cannot cross loops)."""
        loop = asyncio.get_running_loop()
        found = self._sessions.get(loop)
        if found is None:
            for stale in [other for other in self._sessions if other.is_closed()]:
                del self._sessions[stale]
            found = self._sessions[loop] = _Session.open(upstream(self.name))
        return found

    async def close(self) -> None:
        found = self._sessions.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.session.close()

    async def generate(
        self,
        *,
        model: str,
        messages: list[dict[str, str]],
        stream: bool,
        reply: Reply,
        deadlines: Deadlines,
        max_output_tokens: int | None = None,
    ) -> AsyncIterator[str]:
        body: dict[str, object] = {"model": model, "messages": messages}
        if max_output_tokens is not None:
            # Chat Completions' output limit, as OpenAI-compatible servers (vLLM, Ollama, llama.cpp) read it.
            body["max_tokens"] = max_output_tokens
        try:
            if stream:
                async for chunk in self._stream(body, reply, deadlines):
                    yield chunk
            else:
                yield await self._complete(body, reply, deadlines)
        except aiohttp.ClientError as exc:
            # Before ValueError: some of aiohttp's errors are ValueErrors too (InvalidURL).
            raise _map_error(exc, mid_stream=reply.headers_received) from None
        except ValueError:
            # Unparseable SSE or JSON, or JSON of the wrong shape (orjson's errors are ValueErrors).
            raise _invalid_response() from None

    async def _post(self, body: dict[str, object]) -> aiohttp.ClientResponse:
        """POST /chat/completions; the response once its headers are in, or the status as an `UpstreamError`."""
        found = self._session()
        response = await found.session.post(found.url, data=_encode(body), proxy_headers=found.proxy_headers)
        if not 200 <= response.status < 300:
            try:
                # The status is the answer even if its body is cut off (the connection then closes).
                with contextlib.suppress(aiohttp.ClientError):
                    await _discard(response)
            finally:
                response.release()
            raise _status_error(response.status, response.headers)
        return response

    async def _complete(self, body: dict[str, object], reply: Reply, deadlines: Deadlines) -> str:
        async with asyncio.timeout_at(deadlines.next()):
            response = await self._post(body)
        try:
            data = b"".join([chunk async for chunk in _body(response, deadlines)])
        finally:
            # Back to the pool when read to the end; closed when cut short (the connection
            # is no use half-read).
            response.release()
        completion = _decode(data)
        choices = _field(completion, "choices", list)
        if not choices:
            raise UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model returned no answer.")
        message = _field(_as_dict(choices[0]), "message", dict) or {}
        text = _field(message, "content", str) or ""
        _record_usage(completion, reply)
        return text

    async def _stream(self, body: dict[str, object], reply: Reply, deadlines: Deadlines) -> AsyncIterator[str]:
        """Yield text as it streams in.

        Each wait on the model is bounded by `deadlines` separately, so no timeout
        scope spans a `yield` (the consumer's own awaits, a slow client's included,
        are never cancelled by it, nor counted as the model's).
        """
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with asyncio.timeout_at(deadlines.next()):
            response = await self._post(body)
        reply.headers_received = True
        finished = False
        try:
            async for data in _sse_data(response, deadlines):
                chunk = _as_dict(_decode(data))
                if chunk.get("error"):
                    # An error event inside the stream.
                    raise _invalid_response()
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
            _done_with(response)
        if not finished:
            # The connection closed before the model said it was done.
            raise interrupted()


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read an error's body to its end, unseen (it may echo the request or name the key), so the
    connection can be reused; past `_ERROR_BODY_LIMIT` it is left unread and the connection closed."""
    read = 0
    while read <= _ERROR_BODY_LIMIT:
        chunk = await response.content.readany()
        if not chunk:
            return
        read += len(chunk)
    response.close()


def _done_with(response: aiohttp.ClientResponse) -> None:
    """A stream read to its end goes back to the pool. One abandoned midway (the turn was cancelled:
    this generator was closed; or it failed) is closed, so the model server sees the request end
    and stops generating, and a half-read connection is never reused."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def _decode(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson also refuses an unpaired surrogate escape ("\ud83d"), which a model sends when
        # it splits an emoji across two chunks: the standard decoder takes it, and the text is
        # repaired before it is saved or shown (chat/protocol/text.py). Truly malformed JSON fails here too.
        return json.loads(data)


def _encode(body: dict[str, object]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:
        # orjson refuses unpaired surrogates (a client may send "\ud800" escaped in its JSON);
        # json.dumps escapes them, as the client itself would have.
        return json.dumps(body).encode()


async def _body(response: aiohttp.ClientResponse, deadlines: Deadlines) -> AsyncIterator[bytes]:
    """The response's body as it arrives, each wait bounded by `deadlines` (told of each piece)."""
    while True:
        async with asyncio.timeout_at(deadlines.next()):
            chunk = await response.content.readany()
        if not chunk:
            return
        deadlines.arrived()
        yield chunk


async def _sse_data(response: aiohttp.ClientResponse, deadlines: Deadlines) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event, up to `[DONE]` (the rest of the body is drained, so
    the connection can be reused). Transport failures are raised as aiohttp raises them."""
    pending = b""
    data: list[bytes] = []
    done = False
    async for chunk in _body(response, deadlines):
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


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _invalid_response() -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read.")


def _status_error(status: int, headers: Mapping[str, str]) -> UpstreamError:
    """An answer other than 2xx: 429 rate limited, 401/403 credentials refused, 5xx the server failed,
    any other the request's own fault."""
    if status == 429:
        return UpstreamError(
            ErrorCode.UPSTREAM_RATE_LIMITED,
            "The model provider is rate limiting requests; try again shortly.",
            retryable=True,
            retry_after=_retry_after(headers),
        )
    if status in (401, 403):
        return UpstreamError(ErrorCode.UPSTREAM_AUTH_FAILED, "The server's model credentials were refused.")
    if status >= 500:
        return UpstreamError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.", retryable=True)
    return UpstreamError(
        ErrorCode.UPSTREAM_BAD_REQUEST, f"The model server refused the request (HTTP {status}); check the model name."
    )


def _map_error(exc: aiohttp.ClientError, *, mid_stream: bool) -> UpstreamError:
    """A transport failure of the call: after the answer began, an interrupted answer; before, the
    server could not be reached (retried) or did not answer in time (not retried)."""
    if mid_stream:
        return interrupted()
    # Checked before the timeout: aiohttp's connect timeout may carry the refused or
    # unroutable connection underneath, and then it is the server that cannot be reached.
    if connection_failed(exc) or not isinstance(exc, TimeoutError):
        return unavailable()
    return timed_out()
