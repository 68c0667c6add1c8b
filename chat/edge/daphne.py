"""Daphne's WebSocket protocol with R2D2's two bounds on what it sends.

Daphne applies one limit, `--websocket-max-message-size` (1 MiB), to frames in both
directions: a reply longer than that failed to send and, before, killed its turn.
Incoming frames keep Daphne's limit; outgoing frames may be up to
R2D2_MAX_OUTGOING_FRAME_BYTES, so a long reply reaches a seed client as one whole
`message` frame.

A client that never reads makes Twisted buffer every frame sent to it, without
bound (measured: +100 MiB in 5 s for one socket receiving streamed replies). When
more than R2D2_MAX_UNSENT_BYTES wait in a connection's buffer (beyond the largest
frame in flight), the connection is
closed with code 4408: its close frame is queued, and when the client does not
answer it within autobahn's close-handshake timeout (1 s) the connection is
aborted and its buffer freed. The application hears a disconnect as for any
closed socket: the turn's partial reply is saved.

There is no hook for either in Daphne, so `install()` (called from
`ChatConfig.ready()`, before Daphne builds its server) substitutes this
factory for Daphne's own.
"""

from __future__ import annotations

import logging
import pprint

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol as _Autobahn
from daphne import server as daphne_server
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from django.conf import settings

from chat.edge.proxy import address_group, client_address
from chat.ops.throttle import warn_throttled

logger = logging.getLogger(__name__)

CLOSE_NOT_READING = 4408
CLOSE_SERVICE_RESTART = 1012  # chat/sessions/drain.py closes with it


def unsent_bytes(transport) -> int:
    """Bytes written to a Twisted TCP transport that the kernel has not taken yet."""
    buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return buffered + getattr(transport, "_tempDataLen", 0)


class _Formatted:
    """pprint's text of `value`, made only if a log line is really written."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class BoundedWebSocketProtocol(WebSocketProtocol):
    # The largest frame written since the buffer was last empty: one frame may always be
    # in flight (a 4 MiB reply is one frame), so the bound counts what waits beyond it.
    _largest_in_flight = 0

    def sendMessage(self, payload: bytes, isBinary: bool = False, *args, **kwargs) -> None:
        if self.state != _Autobahn.STATE_OPEN:
            return  # closing or closed: what the application still sends has nowhere to go
        backlog = unsent_bytes(self.transport)
        if backlog == 0:
            self._largest_in_flight = 0
        if 0 < settings.R2D2_MAX_UNSENT_BYTES < backlog - self._largest_in_flight:
            # A client can do this on purpose, socket after socket: one line per client per minute.
            warn_throttled(
                logger, "closing a connection that does not read", key=self._client(), extra={"unsent_bytes": backlog}
            )
            self.sendClose(code=CLOSE_NOT_READING, reason="client is not reading")
            return
        self._largest_in_flight = max(self._largest_in_flight, len(payload))
        incoming_limit = self.maxMessagePayloadSize
        self.maxMessagePayloadSize = settings.R2D2_MAX_OUTGOING_FRAME_BYTES
        try:
            super().sendMessage(payload, isBinary, *args, **kwargs)
        finally:
            self.maxMessagePayloadSize = incoming_limit

    def _client(self) -> str | None:
        peer = self.client_addr[0] if getattr(self, "client_addr", None) else None
        address = client_address(getattr(self, "clean_headers", []), peer)
        return address_group(address) if address else None

    def _connectionMade(self) -> None:
        # autobahn pretty-prints the connection's forty options for a debug line, before its
        # logger decides the line is not written: about 9% of the server's CPU in a run of
        # 200 sockets x 5 turns (bench/throughput.py --profile). The reactor is one thread,
        # so its `pformat` is swapped for a deferred one for this call only.
        autobahn_protocol.pformat = _Formatted
        try:
            super()._connectionMade()
        finally:
            autobahn_protocol.pformat = pprint.pformat

    def serverClose(self, code: int | None = None) -> None:
        # Autobahn's sendClose accepts only 1000 and 3000-4999, so a draining server's 1012
        # ("service restart", valid on the wire per RFC 6455's registry) is written directly.
        if code == CLOSE_SERVICE_RESTART:
            self.sendCloseFrame(code=code, isReply=False)
            return
        super().serverClose(code)


class BoundedWebSocketFactory(WebSocketFactory):
    protocol = BoundedWebSocketProtocol

    def setProtocolOptions(self, *args, **kwargs) -> None:
        """The factory's options become class attributes of a protocol class of its own.

        autobahn copies each of its forty options from the factory onto every connection
        that lacks them, into the connection's own __dict__: with 10,000 idle sockets that
        is 10,000 copies of the same forty values. Found on the class, they are not copied.
        """
        super().setProtocolOptions(*args, **kwargs)
        options = {name: getattr(self, name) for name in self.protocol.CONFIG_ATTRS}
        # A function among them (perMessageCompressionAccept) must stay a plain function, not a method.
        options = {name: staticmethod(value) if callable(value) else value for name, value in options.items()}
        self.protocol = type(BoundedWebSocketProtocol.__name__, (BoundedWebSocketProtocol,), options)


def install() -> None:
    """Make Daphne (its command line and `manage.py runserver`) build R2D2's protocol."""
    daphne_server.WebSocketFactory = BoundedWebSocketFactory
