"""A WebSocket client on a bare TCP socket, for tests of clients that misbehave (one that never reads).

A library client reads on its own; this one reads only when told to.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct


class RawWebSocket:
    def __init__(self, port: int, *, receive_buffer: int = 4096, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket()
        # A small receive buffer, so the kernel holds little on the client's side.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response

    def send(self, frame: dict) -> None:
        payload = json.dumps(frame).encode()
        mask = os.urandom(4)
        header = b"\x81" + (
            bytes([0x80 | len(payload)]) if len(payload) < 126 else b"\xfe" + struct.pack("!H", len(payload))
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self) -> dict:
        """Read one frame the server sent (text, unmasked), as JSON: for a client that reads a little."""
        header = self._exactly(2)
        length = header[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._exactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._exactly(8))[0]
        return json.loads(self._exactly(length))

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def read_until_closed(self, timeout: float = 10.0) -> int:
        """Read everything the server sends until it closes the connection; the bytes read."""
        self.sock.settimeout(timeout)
        total = 0
        try:
            while chunk := self.sock.recv(1 << 16):
                total += len(chunk)
        except ConnectionResetError:
            pass
        return total

    def close(self) -> None:
        self.sock.close()
