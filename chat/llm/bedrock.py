"""The Amazon Bedrock provider: models answered by Bedrock Runtime's Converse and ConverseStream
APIs. The only module that creates a `bedrock-runtime` client.

boto3 blocks, so each call runs on its own daemon thread (not the default executor,
whose few workers would cap concurrent replies), which hands the response and then
each stream event to the event loop through a queue. The loop waits on that queue
under the call's deadlines; when the turn is cancelled, times out or fails, it shuts
the stream's socket down, which ends the thread's blocked read and closes the HTTP
connection (Bedrock stops generating, and billing, for a reader that left). The
queue is short: while the turn waits for a slow client (chat/edge/flow.py), the
thread stops reading and TCP pushes back on Bedrock.

Credentials come from boto3's usual chain (on Elastic Beanstalk, the instance
role); boto3's own retries are off (the caller retries within its deadline). AWS
error messages, response bodies and credentials never leave this module: callers
see text, or an `UpstreamError` whose message is safe for any client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from django.conf import settings

from chat.llm.base import Deadlines, Reply, UpstreamError, interrupted, unavailable
from chat.protocol.errors import ErrorCode

logger = logging.getLogger(__name__)

#: A model name with this prefix is a Bedrock model id (the prefix is not sent to Bedrock).
PREFIX = "bedrock/"

# Calls in flight beyond this open extra connections that are dropped after use.
_MAX_POOL_CONNECTIONS = 100
# Stream events a call's thread may hand over before the loop takes them (then it stops reading).
_MAX_WAITING_EVENTS = 64


def model_id(model: str) -> str:
    """The id Bedrock knows `model` by."""
    return model.removeprefix(PREFIX)


def answers(model: str) -> bool:
    """True when `model` is a Bedrock model: prefixed, or listed in R2D2_BEDROCK_MODELS."""
    return model.startswith(PREFIX) or model_id(model) in {model_id(m) for m in settings.R2D2_BEDROCK_MODELS}


def converse_request(
    model: str, messages: list[dict[str, str]], max_output_tokens: int | None = None
) -> dict[str, Any]:
    """The Converse request for chat messages: system text apart, and strictly alternating turns.

    Converse refuses two consecutive messages of one role, which R2D2's history has
    after a turn that failed before its reply; those become one message with a text
    block each. It refuses blank text blocks too (a reply cancelled before any text).
    """
    system = [{"text": m["content"]} for m in messages if m["role"] == "system" and m["content"]]
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "system" or not m["content"]:
            continue
        block = {"text": m["content"]}
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"].append(block)
        else:
            turns.append({"role": m["role"], "content": [block]})
    request: dict[str, Any] = {"modelId": model_id(model), "messages": turns}
    if system:
        request["system"] = system
    if max_output_tokens is not None:
        request["inferenceConfig"] = {"maxTokens": max_output_tokens}
    return request


class BedrockProvider:
    name = "bedrock"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple, Any] = {}

    def is_configured(self) -> bool:
        return bool(settings.R2D2_BEDROCK_MODELS)

    async def close(self) -> None:
        # The client is not tied to an event loop; its idle pooled connections may stay.
        pass

    def client(self) -> Any:
        """The process's client for the current settings (called on worker threads: boto3's
        clients are thread-safe, creating them is not)."""
        # boto3's own timeouts only back R2D2's deadlines up (chat/llm/base.py): its read timeout
        # is the longest wait those allow, and a second more, so that they are what fires.
        read_timeout = max(settings.R2D2_UPSTREAM_TIMEOUT, settings.R2D2_UPSTREAM_IDLE_TIMEOUT) + 1
        key = (
            settings.R2D2_BEDROCK_REGION,
            settings.R2D2_BEDROCK_ENDPOINT_URL,
            settings.R2D2_UPSTREAM_TIMEOUT,
            read_timeout,
        )
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                # Imported here: boto3 is slow to import and most processes never call Bedrock.
                import boto3
                from botocore.config import Config

                client = boto3.session.Session().client(
                    "bedrock-runtime",
                    region_name=settings.R2D2_BEDROCK_REGION,
                    endpoint_url=settings.R2D2_BEDROCK_ENDPOINT_URL,
                    config=Config(
                        connect_timeout=settings.R2D2_UPSTREAM_TIMEOUT,
                        read_timeout=read_timeout,
                        # Retries are the caller's: bounded by the whole-call deadline.
                        retries={"mode": "standard", "total_max_attempts": 1},
                        max_pool_connections=_MAX_POOL_CONNECTIONS,
                    ),
                )
                self._clients[key] = client
            return client

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
        request = converse_request(model, messages, max_output_tokens)
        if stream:
            async for chunk in self._stream(request, reply, deadlines):
                yield chunk
        else:
            yield await self._complete(request, reply, deadlines)

    async def _complete(self, request: dict[str, Any], reply: Reply, deadlines: Deadlines) -> str:
        # A cancelled whole-reply call cannot be interrupted: its thread ends when the
        # answer (dropped) or boto3's read timeout arrives.
        feed = _Feed(lambda feed: feed.put(self.client().converse(**request)))
        try:
            response = await feed.get(deadlines.next())
        except TimeoutError:
            raise
        except Exception as exc:
            raise _map_error(exc, opened=False, said=False) from None
        finally:
            feed.close()
        try:
            blocks = response["output"]["message"]["content"]
            text = "".join(block.get("text", "") for block in blocks)
        except (KeyError, TypeError):
            raise _invalid() from None
        _count_tokens(reply, response.get("usage"))
        return text

    async def _stream(self, request: dict[str, Any], reply: Reply, deadlines: Deadlines) -> AsyncIterator[str]:
        """Yield text as it streams in. Each wait is bounded by `deadlines` separately, so no
        timeout scope spans a `yield`."""

        def read(feed: _Feed) -> None:
            events = self.client().converse_stream(**request)["stream"]
            if feed.hold(events):
                feed.put(_OPENED)
                for event in events:
                    feed.put(event)

        feed = _Feed(read)
        stopped = said = False
        try:
            while (event := await feed.get(deadlines.next())) is not _END:
                if event is _OPENED:
                    reply.headers_received = True
                    continue
                deadlines.arrived()
                if "contentBlockDelta" in event:
                    text = event["contentBlockDelta"].get("delta", {}).get("text")
                    if text:
                        said = True
                        yield text
                elif "messageStop" in event:
                    stopped = True
                elif "metadata" in event:
                    _count_tokens(reply, event["metadata"].get("usage"))
        except TimeoutError:
            raise
        except Exception as exc:
            raise _map_error(exc, opened=reply.headers_received, said=said) from None
        finally:
            feed.close()
        if not stopped:
            # The stream ended before the model said it was done.
            raise interrupted()


def _count_tokens(reply: Reply, usage: dict[str, int] | None) -> None:
    if usage:
        reply.prompt_tokens = usage.get("inputTokens")
        reply.completion_tokens = usage.get("outputTokens")


_OPENED = object()  # the response arrived: the model began answering
_END = object()  # the thread's work finished


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Feed:
    """Runs blocking work on a daemon thread, handing what it `put`s to the event loop in order.

    `close()` (on the loop) stops the hand-over and shuts down whatever the thread
    `hold`s, so a thread blocked reading a stream wakes up and ends.
    """

    def __init__(self, work: Callable[[_Feed], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._held: Any = None
        # Room in the queue: the thread waits for it, so it reads no further ahead of the loop.
        self._room = threading.Semaphore(_MAX_WAITING_EVENTS)
        threading.Thread(target=self._run, args=(work,), name="bedrock-call", daemon=True).start()

    def _run(self, work: Callable[[_Feed], None]) -> None:
        try:
            work(self)
        except BaseException as exc:  # handed to the loop, which maps it
            self.put(_Failed(exc))
        else:
            self.put(_END)

    def put(self, item: Any) -> None:
        """(On the thread) hand `item` to the loop, once the loop has taken enough of the earlier ones."""
        if self._closed:
            return
        self._room.acquire()
        if self._closed:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def hold(self, stream: Any) -> bool:
        """Keep `stream` to shut down on close; False (and shut it now) when already closed."""
        with self._lock:
            if not self._closed:
                self._held = stream
                return True
        _hang_up(stream)
        return False

    async def get(self, deadline: float) -> Any:
        async with asyncio.timeout_at(deadline):
            item = await self._queue.get()
        self._room.release()
        if isinstance(item, _Failed):
            raise item.exc
        return item

    def close(self) -> None:
        with self._lock:
            self._closed = True
            held, self._held = self._held, None
        self._room.release(_MAX_WAITING_EVENTS)  # a thread waiting for room wakes, and ends
        if held is not None:
            _hang_up(held)


def _hang_up(events: Any) -> None:
    """Close an event stream's HTTP connection, waking a thread blocked reading it.

    Closing a socket another thread is reading does not end that read (nor send
    the FIN) until data arrives; shutting it down does both at once. The socket is
    reached through botocore's and urllib3's response objects: no public API exposes it.
    """
    raw = getattr(events, "_raw_stream", None)
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
    try:
        events.close()
    except Exception:
        logger.debug("closing a Bedrock stream failed", exc_info=True)


# Errors ------------------------------------------------------------------------

_RATE_LIMITED = {"ThrottlingException", "ServiceQuotaExceededException", "TooManyRequestsException"}
_AUTH = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "ExpiredToken",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "SignatureDoesNotMatch",
}
_BAD_REQUEST = {"ValidationException", "ResourceNotFoundException"}
_SERVER = {"ServiceUnavailableException", "InternalServerException", "ModelNotReadyException"}


def _invalid() -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_INVALID_RESPONSE, "The model server sent a response R2D2 could not read.")


def _map_error(exc: BaseException, *, opened: bool, said: bool) -> UpstreamError:
    """The client's view of a failed call (`opened`: the stream had begun; `said`: text was sent).

    Nothing of the exception's text is passed on or logged: botocore puts AWS's
    error message (which may quote the request) in it.
    """
    from botocore import exceptions as boto

    if isinstance(exc, boto.EventStreamError):
        # An exception event: before any text it says what went wrong; after, the answer was cut off.
        return interrupted() if said else _map_aws_error(exc, in_stream=True)
    if isinstance(exc, boto.ClientError):
        return _map_aws_error(exc, in_stream=False)
    if opened:
        return interrupted()  # the connection was cut, or the stream could not be read, midway
    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError | boto.CredentialRetrievalError):
        logger.error("no AWS credentials for Bedrock: give the instance role (or the environment) credentials")
        return UpstreamError(
            ErrorCode.UPSTREAM_AUTH_FAILED, "The server could not read its model credentials.", ours=True
        )
    if isinstance(exc, boto.NoRegionError):
        logger.error("no AWS region for Bedrock: set AWS_REGION")
        return UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, "The model server could not be reached.", ours=True)
    if isinstance(exc, boto.ReadTimeoutError):
        return UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "The model did not answer in time.")
    if isinstance(exc, boto.ConnectionError | boto.HTTPClientError | OSError):
        # Refused, unresolvable, reset, or a connect timeout: the server cannot be reached.
        return unavailable()
    return _invalid()


def _map_aws_error(exc: Any, *, in_stream: bool) -> UpstreamError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    code = code[:1].upper() + code[1:]  # stream exception events are named in lowerCamelCase
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    # By name first: ModelNotReadyException is sent as HTTP 429, yet it is no rate limit.
    if code in _SERVER:
        return UpstreamError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.", retryable=True)
    if code == "ModelTimeoutException":
        return UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "The model did not answer in time.")
    if code in _RATE_LIMITED or status == 429:
        return UpstreamError(
            ErrorCode.UPSTREAM_RATE_LIMITED,
            "The model provider is rate limiting requests; try again shortly.",
            retryable=True,
        )
    if code in _AUTH or status in {401, 403}:
        logger.error("Bedrock refused the server's credentials", extra={"aws_error": code})
        return UpstreamError(ErrorCode.UPSTREAM_AUTH_FAILED, "The server's model credentials were refused.")
    if status >= 500:
        return UpstreamError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.", retryable=True)
    if code in _BAD_REQUEST or 400 <= status < 500:
        return UpstreamError(
            ErrorCode.UPSTREAM_BAD_REQUEST,
            "The model server refused the request; check the model name and that access to it is enabled.",
        )
    if in_stream:
        return interrupted()  # e.g. modelStreamErrorException: the model failed while answering
    return UpstreamError(ErrorCode.UPSTREAM_SERVER_ERROR, "The model server failed to answer.")
