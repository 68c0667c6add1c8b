"""The WebSocket handshake's Host and Origin checks and unknown paths, over real sockets against a live Daphne."""

from __future__ import annotations

import asyncio
import socket

import pytest
import websockets

from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


async def refused(uri: str, **kwargs) -> int:
    with pytest.raises(websockets.InvalidStatus) as error:
        await websockets.connect(uri, **kwargs)
    return error.value.response.status_code


async def accepted(uri: str, **kwargs) -> bool:
    connection = await websockets.connect(uri, **kwargs)
    await connection.close()
    return True


async def test_origin_must_match_scheme_host_and_port(daphne):
    port = daphne.port
    # The server's own scheme and port, on any ALLOWED_HOSTS host.
    assert await accepted(daphne.url, origin=f"http://127.0.0.1:{port}")
    assert await accepted(daphne.url, origin=f"http://localhost:{port}")
    # Same host, another port or scheme: another origin.
    assert await refused(daphne.url, origin="http://127.0.0.1:9999") == 403
    assert await refused(daphne.url, origin="https://localhost") == 403
    assert await refused(daphne.url, origin=f"https://localhost:{port}") == 403
    assert await refused(daphne.url, origin="http://localhost") == 403
    assert await refused(daphne.url, origin=f"http://evil.example.com:{port}") == 403
    assert await refused(daphne.url, origin="null") == 403


async def test_trusted_origins_are_accepted(daphne_factory):
    server = daphne_factory(DJANGO_CSRF_TRUSTED_ORIGINS="https://app.example.com,https://*.partner.example")
    assert await accepted(server.url, origin="https://app.example.com")
    assert await accepted(server.url, origin="https://chat.partner.example")
    assert await refused(server.url, origin="http://app.example.com") == 403
    assert await refused(server.url, origin="https://app.example.com.evil.example") == 403


def as_host(host: str, server) -> dict:
    """connect() arguments that reach `server` with `host` as the Host header."""
    return {"uri": f"ws://{host}/", "host": "127.0.0.1", "port": server.port}


async def test_host_header_outside_allowed_hosts_is_refused(daphne):
    """As Django refuses such HTTP requests (DNS rebinding); with or without an Origin."""
    assert await refused(**as_host("evil.example.com", daphne)) == 403
    assert await refused(**as_host(f"evil.example.com:{daphne.port}", daphne), origin="http://evil.example.com") == 403
    client = ProtocolClient(await websockets.connect(**as_host(f"localhost:{daphne.port}", daphne)))
    assert await client.start_session()
    await client.close()


async def test_behind_the_load_balancer_the_origin_is_https_on_443(daphne_factory):
    """The proxy reaches Daphne over plain HTTP; X-Forwarded-Proto says what the browser used."""
    server = daphne_factory(DJANGO_ALLOWED_HOSTS="r2d2.example.com", R2D2_TRUSTED_PROXIES="1")
    lb = {**as_host("r2d2.example.com", server), "additional_headers": {"X-Forwarded-Proto": "https"}}
    assert await accepted(**lb, origin="https://r2d2.example.com")
    assert await refused(**lb, origin="http://r2d2.example.com") == 403
    assert await refused(**lb, origin="https://r2d2.example.com:8443") == 403


def raw_handshake(port: int, path: str) -> bytes:
    """A WebSocket handshake for `path` on a plain socket; the server's whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


async def test_an_unknown_path_is_refused_with_404_and_no_traceback(daphne):
    """A handshake to a path no route serves answers HTTP 404 (not 500), logs no error, and the
    server's own paths still work."""
    for path in ("/nowhere", "/ws/extra/", "/static/x?y=1"):
        answer = await asyncio.to_thread(raw_handshake, daphne.port, path)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:80]
        assert await refused(f"ws://127.0.0.1:{daphne.port}{path}") == 404
    assert await accepted(daphne.url)
    assert await accepted(f"ws://127.0.0.1:{daphne.port}/ws/")
    log = daphne.log()
    assert '"level": "ERROR"' not in log and "Traceback" not in log, log[-2000:]
    assert "WSREJECT /nowhere" in log
