"""A TCP proxy on 127.0.0.1 that can be cut and restored: a database or Redis restarting, for the tests.

Cutting it resets every connection through it (as when the server's process goes away) and refuses new ones
(nothing listens); restoring it listens again on the same port. `lose_reply` resets one connection after the
server got a request, before its reply comes back: the request ran, and the client cannot tell. A test points a
server at `port` instead of the real service's, so the service itself, shared by every test, is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from testkit.server import free_port


class CutLink:
    """A TCP proxy on 127.0.0.1 to `target` that can be cut (every connection reset, new ones refused) and
    restored on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lose: list[bytes] = []
        self.lost = 0  # replies lost so far

    def lose_reply(self, to: bytes) -> None:
        """The next request whose bytes hold `to` reaches the server; its connection is reset when the server's
        reply comes, which the client never gets (a reset just after a command ran)."""
        self._lose.append(to)

    async def start(self) -> CutLink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as when the server's process goes away
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    @property
    def connections(self) -> int:
        """How many connections go through it now."""
        return len(self._writers) // 2  # each has its client's side and its server's

    async def stop(self) -> None:
        if self._server is not None:
            await self.cut()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, server_writer))
        doomed = False  # its next reply is lost

        def request(data: bytes) -> bool:
            nonlocal doomed
            for marker in self._lose:
                if marker in data:
                    self._lose.remove(marker)
                    doomed = True
                    break
            return True

        def reply(data: bytes) -> bool:
            self.lost += doomed
            return not doomed

        pumps = [
            asyncio.create_task(_pump(client_reader, server_writer, request)),
            asyncio.create_task(_pump(server_reader, client_writer, reply)),
        ]
        with contextlib.suppress(asyncio.CancelledError):  # the test's loop ending
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, relay: Callable[[bytes], bool]) -> None:
    """Relay until either side closes, or until `relay` says no (then the connection is reset)."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            if not relay(data):
                return
            writer.write(data)
            await writer.drain()
