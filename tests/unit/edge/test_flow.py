"""chat/edge/flow.py without a server: a turn waits while its client is behind; a client reading nothing is closed.

The transport is a stand-in with Twisted's attributes (`dataBuffer`, `offset`, `registerProducer`), driven by
the test as Twisted would drive it (`pauseProducing` past the buffer size, `resumeProducing` once drained).
"""

from __future__ import annotations

import asyncio

from chat.edge import flow
from chat.edge.flow import Flow, FlowMiddleware, writable
from testkit.wait import async_wait_until


class Transport:
    """What Flow reads of a Twisted TCP transport: the bytes it still holds, and its producer."""

    def __init__(self) -> None:
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.bufferSize = 65536
        self.producer = None

    def unregisterProducer(self) -> None:
        self.producer = None

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming  # a push producer: paused and resumed by the transport
        self.producer = producer


class Connection:
    def __init__(self) -> None:
        self.closed_not_reading = 0

    def close_not_reading(self) -> None:
        self.closed_not_reading += 1


def attached(settings, **limits) -> tuple[Flow, Transport, Connection]:
    for name, value in limits.items():
        setattr(settings, name, value)
    connection, transport = Connection(), Transport()
    connection_flow = Flow(connection)
    connection_flow.attach(transport)
    return connection_flow, transport, connection


async def test_attach_makes_the_flow_the_transports_producer_with_the_configured_buffer(settings):
    connection_flow, transport, _ = attached(settings, R2D2_SEND_BUFFER_BYTES=1234)
    assert transport.producer is connection_flow and transport.bufferSize == 1234


async def test_a_connection_that_keeps_up_never_waits(settings):
    connection_flow, _, _ = attached(settings)
    await asyncio.wait_for(writable({flow.SCOPE_KEY: connection_flow}), 0.1)
    await asyncio.wait_for(writable({}), 0.1)  # another server (the test communicator): no flow, no wait


async def test_a_paused_connection_holds_its_writer_until_the_transport_resumes(settings):
    connection_flow, _, connection = attached(settings)
    connection_flow.pauseProducing()
    writer = asyncio.ensure_future(writable({flow.SCOPE_KEY: connection_flow}))
    await asyncio.sleep(0.05)  # the behaviour under test: the writer is still waiting after a while
    assert not writer.done()
    connection_flow.resumeProducing()
    await asyncio.wait_for(writer, 1)
    assert connection.closed_not_reading == 0


async def test_a_closed_connection_releases_its_writers(settings):
    connection_flow, _, _ = attached(settings)
    connection_flow.pauseProducing()
    writers = [asyncio.ensure_future(writable({flow.SCOPE_KEY: connection_flow})) for _ in range(3)]
    await asyncio.sleep(0)
    connection_flow.stopProducing()
    await asyncio.wait_for(asyncio.gather(*writers), 0.5)  # at once, not at their next check (1 s)


async def test_a_client_that_takes_nothing_is_closed_once(settings):
    connection_flow, transport, connection = attached(settings, R2D2_STALLED_READER_SECONDS=0.2)
    transport.dataBuffer = b"x" * 100_000
    connection_flow.pauseProducing()
    writers = [asyncio.ensure_future(connection_flow.drained()) for _ in range(2)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await async_wait_until(lambda: connection.closed_not_reading, timeout=5, interval=0.01)
    assert connection.closed_not_reading == 1
    assert loop.time() - started >= 0.2  # not before the limit
    assert not any(writer.done() for writer in writers)  # they wait for the connection to go
    connection_flow.stop()
    await asyncio.wait_for(asyncio.gather(*writers), 1)
    assert connection.closed_not_reading == 1


async def test_a_slow_reader_that_keeps_taking_is_not_closed(settings):
    connection_flow, transport, connection = attached(settings, R2D2_STALLED_READER_SECONDS=0.2)
    transport.dataBuffer = b"x" * 100_000
    connection_flow.pauseProducing()
    writer = asyncio.ensure_future(connection_flow.drained())
    for _ in range(12):  # 0.6 s, three times the limit, taking a little every 50 ms
        await asyncio.sleep(0.05)  # the behaviour under test: a client reading slowly, as time passes
        transport.offset += 1000
    assert connection.closed_not_reading == 0 and not writer.done()
    connection_flow.resumeProducing()
    await asyncio.wait_for(writer, 1)


async def test_the_middleware_puts_the_connections_flow_in_the_scope():
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(scope)

    middleware = FlowMiddleware(app)
    connection_flow = Flow(Connection())
    token = flow.connecting.set(connection_flow)
    try:
        await middleware({"type": "websocket"}, None, None)
    finally:
        flow.connecting.reset(token)
    await middleware({"type": "websocket"}, None, None)  # not under R2D2's Daphne
    assert seen[0][flow.SCOPE_KEY] is connection_flow and "websocket.http.response" in seen[0]["extensions"]
    assert flow.SCOPE_KEY not in seen[1]
