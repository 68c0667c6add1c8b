"""Flow control on the WebSocket: a turn stops reading its model while its client is behind.

Twisted buffers every frame written to a socket the kernel cannot take yet. Each
connection's `Flow` is registered as the transport's streaming producer, and the
transport's buffer size is R2D2_SEND_BUFFER_BYTES: when more waits than that, the
transport calls `pauseProducing()`, and when it has handed everything to the kernel,
`resumeProducing()` (the low-water mark is an empty buffer: the kernel's own send
buffer keeps the link busy meanwhile). `await writable(scope)`, which the consumer calls before each
frame it sends, returns at once unless the connection is paused; paused, it waits.
A turn waiting there does not read its model's HTTP stream, so TCP pushes back on
the model server (no reply is held in R2D2's memory for a slow client): what a
socket holds is at most the buffer size plus the frame that crossed it (plus one
frame per other session of the socket sending at the same moment).

A client that takes nothing at all for R2D2_STALLED_READER_SECONDS while a frame
waits is closed with code 4408. Its turn hears a disconnect as for any closed
socket: the reply so far is saved.

How the consumer reaches its connection: it holds only its ASGI scope, and Daphne
builds the scope inside the protocol's `onConnect`, where the ASGI application (its
middlewares, then its task) is created. The protocol (chat/edge/daphne.py) sets
`connecting` for that call; `FlowMiddleware` copies it into the scope under SCOPE_KEY.
Under any other server (Channels' test communicator) the scope has no flow and
`writable` never waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from django.conf import settings
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from chat.ops import throttle
from chat.ops.throttle import warn_throttled

logger = logging.getLogger(__name__)

#: Close code for a client that reads nothing while frames wait for it (4000-4999: applications'; 408 as in HTTP).
CLOSE_NOT_READING = 4408
#: Where the connection's Flow is in the ASGI scope.
SCOPE_KEY = "r2d2.flow"

#: The Flow of the connection whose handshake is being processed (set by chat/edge/daphne.py).
connecting: contextvars.ContextVar[Flow | None] = contextvars.ContextVar("r2d2_connecting_flow", default=None)


class Closer(Protocol):
    def close_not_reading(self) -> None: ...


def unsent_bytes(transport: Any) -> int:
    """Bytes written to a Twisted TCP transport that the kernel has not taken yet."""
    while not hasattr(transport, "dataBuffer") and hasattr(transport, "transport"):
        transport = transport.transport  # a wrapping transport (TLS): the TCP one underneath
    buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return buffered + getattr(transport, "_tempDataLen", 0)


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a __u64 at this offset (Linux 4.1 and later).
_BYTES_ACKED = slice(120, 128)


def taken(transport: Any) -> int:
    """A count that grows exactly when the client takes bytes: what its TCP acknowledged (Linux's
    TCP_INFO), else less what waits in Twisted's buffer. (Twisted's buffer alone would count the
    kernel's send buffer growing as progress.)"""
    while not hasattr(transport, "getHandle") and hasattr(transport, "transport"):
        transport = transport.transport
    try:
        info = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_ACKED.stop)
    except (AttributeError, OSError):
        info = b""
    if len(info) >= _BYTES_ACKED.stop:
        return int.from_bytes(info[_BYTES_ACKED], sys.byteorder)
    return -unsent_bytes(transport)


@implementer(IPushProducer)
class Flow:
    """One connection's send side, as its transport reports it (the transport's producer)."""

    # One per open socket: kept small (bench/memory.py).
    __slots__ = ("transport", "connection", "paused", "closing", "closed", "_resumed")

    def __init__(self, connection: Closer) -> None:
        self.connection = connection
        self.transport: Any = None
        self.paused = False
        self.closing = False  # closed as a non-reader: writers wait for the connection to go
        self.closed = False
        self._resumed: asyncio.Future[None] | None = None

    def attach(self, transport: Any) -> None:
        """Become `transport`'s producer, paused past R2D2_SEND_BUFFER_BYTES.

        The transport arrives from Daphne's HTTP channel, which registered itself as its
        producer and, once the connection is a WebSocket, no longer acts on it."""
        self.transport = transport
        transport.unregisterProducer()
        transport.bufferSize = settings.R2D2_SEND_BUFFER_BYTES
        transport.registerProducer(self, True)

    # IPushProducer: called by the transport, on the event loop's thread ------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        """The connection is gone: nothing waits for it any more."""
        self.closed = True
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    # Writers --------------------------------------------------------------------

    async def drained(self) -> None:
        """Wait until the transport takes more (or the connection closes); close a client that
        takes nothing for R2D2_STALLED_READER_SECONDS."""
        loop = asyncio.get_running_loop()
        limit = settings.R2D2_STALLED_READER_SECONDS
        check = min(1.0, limit / 4) if limit > 0 else 1.0
        mark, progressed_at = taken(self.transport), loop.time()
        while self.paused and not self.closed:
            if self._resumed is None:
                self._resumed = loop.create_future()
            # asyncio.wait leaves the shared future alone on a timeout (other writers may wait on it).
            await asyncio.wait((self._resumed,), timeout=check)
            if not self.paused or self.closed:
                return
            now = taken(self.transport)
            if now > mark:
                mark, progressed_at = now, loop.time()
            elif limit > 0 and loop.time() - progressed_at >= limit and not self.closing:
                # Writers keep waiting until the connection is gone (autobahn aborts it when the
                # close handshake times out), then the turn hears the disconnect: it reads no more
                # of its model for a socket that is closing.
                unsent = unsent_bytes(self.transport)
                # A client can do this on purpose, socket after socket: one line per client per minute.
                extra = {"unsent_bytes": unsent}
                warn_throttled(logger, "closing a connection that does not read", key=throttle.client(), extra=extra)
                self.closing = True
                self.connection.close_not_reading()


async def writable(scope: Mapping[str, Any]) -> None:
    """Return when the connection of `scope` may take another frame: at once unless what waits
    in its send buffer passed R2D2_SEND_BUFFER_BYTES; then once it has drained (or closed)."""
    flow = scope.get(SCOPE_KEY)
    if flow is not None and flow.paused:
        await flow.drained()


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


#: The scope's extensions (shared by every connection's scope: read, never changed).
_EXTENSIONS: Mapping[str, Any] = {"websocket.http.response": {}}


class FlowMiddleware:
    """ASGI middleware for WebSocket scopes: when the server is R2D2's Daphne, puts the connection's
    Flow in the scope, where `writable` finds it, and declares the ASGI denial-response extension
    that chat/edge/daphne.py implements (a refused handshake gets its own HTTP status)."""

    _asgi_single_callable = True  # see chat/sessions/heartbeat.py: returns the inner coroutine, no frame of its own

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: dict, receive: Callable, send: Callable) -> Awaitable[None]:
        flow = connecting.get()
        if flow is not None:
            # Daphne's own scope, made for this connection: the key is added in place, and the
            # scopes the inner layers copy from it keep it.
            scope[SCOPE_KEY] = flow
            extensions = scope.get("extensions")
            scope["extensions"] = _EXTENSIONS if extensions is None else {**extensions, **_EXTENSIONS}
        return self.app(scope, receive, send)
