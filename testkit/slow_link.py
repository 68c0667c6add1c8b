"""A TCP proxy on 127.0.0.1 whose server-to-client direction carries at most `rate` bytes a second:
a client on a slow link (a phone), for tests and benchmarks of flow control.

The proxy reads from the server only as fast as it forwards, through small socket buffers, so
the server sees what a slow link shows it: a peer that takes its bytes slowly but steadily.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

#: Bytes forwarded per read (a burst on the slow link is at most this).
_CHUNK = 16 * 1024
#: The proxy's receive buffer towards the server: like a link's, small.
_RECEIVE_BUFFER = 64 * 1024


class SlowLink:
    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate  # bytes per second, server to client
        self.port = 0
        self.forwarded = 0  # bytes carried server to client, all connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> SlowLink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        upstream.setblocking(False)
        await loop.sock_connect(upstream, ("127.0.0.1", self.target_port))
        server_reader, server_writer = await asyncio.open_connection(sock=upstream, limit=_CHUNK)
        tasks = [
            asyncio.create_task(self._pump(client_reader, server_writer, limited=False)),
            asyncio.create_task(self._pump(server_reader, client_writer, limited=True)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_writer, server_writer):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, limited: bool) -> None:
        loop = asyncio.get_running_loop()
        free_at = loop.time()  # when the link has carried what it was given (no credit saved while idle)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
                if not limited:
                    continue
                self.forwarded += len(data)
                free_at = max(free_at, loop.time()) + len(data) / self.rate
                await asyncio.sleep(free_at - loop.time())
