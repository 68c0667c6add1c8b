"""Dropping a client's connection at a chosen moment, for tests of what the client does then.

`PostDroppingProxy`: a TCP proxy in front of a live server that reads the WebSocket frames passing
through it. `draining`: a live server restarting (a deploy) while it refuses new turns.

It passes HTTP (the page and its assets) untouched. On a WebSocket connection it forwards whole
frames and keeps the JSON text ones it saw, each way. Armed with `drop_at_next_post`, it drops
the connection when the client's next `chatbot_post_message` reaches it: after forwarding that
frame to the server (the server has the message, the client never hears of it) or instead of
forwarding it (the message was lost on the way), and in both cases before any frame the server
sends afterwards reaches the client. Later connections wait until the test calls `let_reconnect`
(so that it can first see what the server made of the message), then pass as usual.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.error import HTTPError
from urllib.request import urlopen

from websockets.sync.client import connect

from testkit.server import LiveServer
from testkit.wait import wait_until


@dataclass
class Connection:
    client: socket.socket
    upstream: socket.socket
    websocket: bool = False
    cut: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[dict] = field(default_factory=list)  # client -> server JSON text frames
    received: list[dict] = field(default_factory=list)  # server -> client JSON text frames


class PostDroppingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.connections: list[Connection] = []
        self._armed: bool | None = None  # None: not armed; else whether to deliver the post
        self._arm_lock = threading.Lock()
        self.dropped = threading.Event()
        self._open = threading.Event()  # new connections pass (cleared by a drop until let_reconnect)
        self._open.set()
        self.dropped_post: dict | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def websockets(self) -> list[Connection]:
        return [c for c in self.connections if c.websocket]

    def drop_at_next_post(self, *, deliver: bool) -> None:
        """Drop the WebSocket connection that carries the client's next post (see the module's doc)."""
        self.dropped.clear()
        with self._arm_lock:
            self._armed = deliver

    def let_reconnect(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self.listener.close()
        for conn in self.connections:
            _shut(conn)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait(60)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:  # the server is down: so is this connection
            client.close()
            return
        conn = Connection(client, upstream)
        self.connections.append(conn)
        threading.Thread(target=self._client_to_server, args=(conn,), daemon=True).start()
        threading.Thread(target=self._server_to_client, args=(conn,), daemon=True).start()

    def _client_to_server(self, conn: Connection) -> None:
        stream = _Stream(conn.client)
        try:
            request = stream.until_headers()
            conn.websocket = b"upgrade: websocket" in request.lower()
            conn.upstream.sendall(request)
            if not conn.websocket:
                return _pipe(stream, conn.upstream)
            while True:
                raw, text = stream.frame()
                message = _json(text)
                if message is not None and message.get("action") == "chatbot_post_message":
                    with self._arm_lock:
                        deliver, self._armed = self._armed, None
                    if deliver is not None:
                        self._open.clear()
                        with conn.lock:  # nothing the server sends from now on reaches the client
                            conn.cut = True
                            if deliver:
                                conn.upstream.sendall(raw)
                        self.dropped_post = message
                        _shut(conn)
                        self.dropped.set()
                        return
                if message is not None:
                    conn.sent.append(message)
                conn.upstream.sendall(raw)
        except (OSError, EOFError):
            _shut(conn)

    def _server_to_client(self, conn: Connection) -> None:
        stream = _Stream(conn.upstream)
        try:
            response = stream.until_headers()
            conn.client.sendall(response)
            if not response.startswith(b"HTTP/1.1 101"):
                return _pipe(stream, conn.client)
            while True:
                raw, text = stream.frame()
                with conn.lock:
                    if conn.cut:
                        return
                    message = _json(text)
                    if message is not None:
                        conn.received.append(message)
                    conn.client.sendall(raw)
        except (OSError, EOFError):
            _shut(conn)


class _Stream:
    """Bytes read from a socket on demand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def take(self, size: int) -> bytes:
        self._fill(size)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def until_headers(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        end = self.buffer.index(b"\r\n\r\n") + 4
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def frame(self) -> tuple[bytes, str | None]:
        """One WebSocket frame (RFC 6455 5.2): its bytes, and its text if it is a whole text frame."""
        header = self.take(2)
        length = header[1] & 0x7F
        extended = b""
        if length == 126:
            extended = self.take(2)
            length = struct.unpack("!H", extended)[0]
        elif length == 127:
            extended = self.take(8)
            length = struct.unpack("!Q", extended)[0]
        mask = self.take(4) if header[1] & 0x80 else b""
        payload = self.take(length)
        raw = header + extended + mask + payload
        if header[0] != 0x81:  # FIN, no compression (RSV1), opcode 1 (text)
            return raw, None
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return raw, payload.decode()


def _json(text: str | None) -> dict | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def _pipe(stream: _Stream, sink: socket.socket) -> None:
    if stream.buffer:
        sink.sendall(stream.buffer)
    while data := stream.sock.recv(65536):
        sink.sendall(data)
    sink.shutdown(socket.SHUT_WR)


def _shut(conn: Connection) -> None:
    for sock in (conn.client, conn.upstream):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass


@contextlib.contextmanager
def restarting(server: LiveServer) -> Iterator[None]:
    """Inside: `server` is draining (SIGTERM), kept up a few seconds by another session's long reply,
    and refuses new turns with `server_draining`. After: the old process has exited and a new one
    listens on the same port (the deploy's new process)."""
    with connect(server.url) as other:
        other.send(json.dumps({"action": "chatbot_session_start"}))
        session_id = json.loads(other.recv(10))["data"]["session_id"]
        slow = "[[token_delay=0.1 text=" + "_".join(["word"] * 40) + "]] a long story"
        other.send(json.dumps({"action": "chatbot_post_message", "session_id": session_id, "user_message": slow}))
        assert json.loads(other.recv(10))["type"] == "processing_start"
        server.process.terminate()  # the drain lets that reply finish (about 4 s) before closing
        assert wait_until(lambda: _draining(server), timeout=5)
        yield
    server.process.wait(30)
    server.stop()
    server.start()


def _draining(server: LiveServer) -> bool:
    try:
        urlopen(server.http_url + "/healthz", timeout=2)
    except HTTPError as exc:
        return exc.code == 503
    return False


def error_codes(frames: list[dict]) -> list[str]:
    return [f["data"]["code"] for f in frames if f["type"] == "error"]
