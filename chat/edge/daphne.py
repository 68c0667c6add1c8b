"""Daphne's WebSocket protocol with R2D2's bounds on what it sends, and its refusals.

Daphne applies one limit, `--websocket-max-message-size` (1 MiB), to frames in both
directions: a reply longer than that failed to send and, before, killed its turn.
Incoming frames keep Daphne's limit; outgoing frames may be up to
R2D2_MAX_OUTGOING_FRAME_BYTES, so a long reply reaches a seed client as one whole
`message` frame.

A client that reads slowly, or not at all, would make Twisted buffer every frame
sent to it, without bound. Each connection has a `Flow` (chat/edge/flow.py), its
transport's producer: past R2D2_SEND_BUFFER_BYTES waiting, the turns sending to it
stop reading their model until the buffer drains, and a client that takes nothing
for R2D2_STALLED_READER_SECONDS is closed with code 4408 (`close_not_reading`).

A handshake the application refuses with an ASGI denial response
(`websocket.http.response.start`, e.g. 404 for an unknown path) is answered with
that HTTP status; Daphne itself knows only 403.

There is no hook for any of this in Daphne, so `install()` (called from
`ChatConfig.ready()`, before Daphne builds its server) substitutes this
factory for Daphne's own.
"""

from __future__ import annotations

import http
import logging
import pprint

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol as _Autobahn
from autobahn.websocket.types import ConnectionDeny
from daphne import server as daphne_server
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from django.conf import settings

from chat.edge import flow
from chat.protocol import CLOSE_SERVICE_RESTART  # chat/sessions/drain.py closes with it

logger = logging.getLogger(__name__)

CLOSE_NOT_READING = flow.CLOSE_NOT_READING


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
    flow: flow.Flow | None = None

    def onConnect(self, request):
        # Daphne builds the ASGI scope and creates the application in this call: the
        # application's FlowMiddleware reads `connecting` and puts the Flow in the scope.
        self.flow = flow.Flow(self)
        self.flow.attach(self.transport)
        token = flow.connecting.set(self.flow)
        try:
            return super().onConnect(request)
        finally:
            flow.connecting.reset(token)

    def connectionLost(self, reason) -> None:
        # autobahn unregisters the producer before it drops a connection, so the transport
        # may not tell the Flow: writers waiting on it must not wait for nothing.
        if self.flow is not None:
            self.flow.stop()
        super().connectionLost(reason)

    def close_not_reading(self) -> None:
        """Close a client that takes nothing (chat/edge/flow.py): its close frame is queued, and
        when it does not answer within autobahn's close-handshake timeout (1 s) the connection is
        aborted and its buffer freed."""
        if self.state == _Autobahn.STATE_OPEN:
            self.sendClose(code=CLOSE_NOT_READING, reason="client is not reading")

    def sendMessage(self, payload: bytes, isBinary: bool = False, *args, **kwargs) -> None:
        if self.state != _Autobahn.STATE_OPEN:
            return  # closing or closed: what the application still sends has nowhere to go
        incoming_limit = self.maxMessagePayloadSize
        self.maxMessagePayloadSize = settings.R2D2_MAX_OUTGOING_FRAME_BYTES
        try:
            super().sendMessage(payload, isBinary, *args, **kwargs)
        finally:
            self.maxMessagePayloadSize = incoming_limit

    def handle_reply(self, message: dict) -> None:
        # The ASGI denial response (the scope's "websocket.http.response" extension, declared by
        # chat/edge/flow.py's middleware): the handshake is refused with its status. Its body is
        # not sent (autobahn answers a refusal with headers only).
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == _Autobahn.STATE_CONNECTING:
            self.deny(int(message["status"]))
        elif kind != "websocket.http.response.body":
            super().handle_reply(message)

    def deny(self, status: int) -> None:
        """Refuse the handshake with HTTP `status` (Daphne's serverReject, which knows only 403)."""
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Refused"
        self.handshake_deferred.errback(ConnectionDeny(code=status, reason=reason))
        del self.handshake_deferred
        self.server.protocol_disconnected(self)
        client = "%s:%s" % tuple(self.client_addr) if self.client_addr else None  # noqa: UP031 (Daphne's own form)
        self.server.log_action("websocket", "rejected", {"path": self.request.path, "client": client})

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
