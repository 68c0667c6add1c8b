"""The recorded client address is the one the nearest trusted proxy saw, and a bad X-Forwarded-For
never breaks a session (on PostgreSQL, client_address is an inet column)."""

from __future__ import annotations

import secrets

import pytest
import websockets

from chat.edge.proxy import forwarded_address
from chat.models import ChatSession
from testkit.client import ProtocolClient
from testkit.server import ROOT, server_env
from tests.production.bundle import ProcfileServer, environment_properties

pytestmark = pytest.mark.django_db(transaction=True)

HOST = "r2d2.example.com"


def test_forwarded_address_takes_the_entry_the_proxies_wrote():
    chain = "198.51.100.1, 203.0.113.9, 10.0.0.7"  # client's claim, then ALB's view, then nginx's
    assert forwarded_address(chain, 2) == "203.0.113.9"
    assert forwarded_address(chain, 1) == "10.0.0.7"
    assert forwarded_address(chain, 0) is None
    assert forwarded_address("203.0.113.9", 2) is None  # fewer entries than proxies: keep the peer
    assert forwarded_address("not-an-ip", 1) is None
    assert forwarded_address("203.0.113.9, 2001:DB8::1", 1) == "2001:db8::1"
    assert forwarded_address("", 1) is None and forwarded_address(None, 1) is None


async def session_address(url_host: str, port: int, forwarded_for: str) -> str | None:
    client = ProtocolClient(
        await websockets.connect(
            f"ws://{url_host}/",
            host="127.0.0.1",
            port=port,
            additional_headers={"X-Forwarded-For": forwarded_for, "X-Forwarded-Proto": "https"},
        )
    )
    session_id = await client.start_session()  # fails on PostgreSQL if an invalid address reaches the row
    await client.close()
    return (await ChatSession.objects.aget(id=session_id)).client_address


async def test_procfile_server_records_the_address_the_load_balancer_saw(fake_llm, tmp_path):
    """The Procfile's command with the bundle's environment, reached as nginx reaches it: the client's
    own claim (first entry) is ignored, and an entry that is no IP address falls back to the peer."""
    env = server_env(
        fake_llm,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS=HOST,
        **{k: v for k, v in environment_properties().items() if k not in {"PORT", "DJANGO_DEBUG"}},
    )
    server = ProcfileServer(env, tmp_path / "web.log", ROOT).start()
    try:
        assert await session_address(HOST, server.port, "198.51.100.1, 203.0.113.9, 127.0.0.1") == "203.0.113.9"
        assert await session_address(HOST, server.port, "not-an-ip") == "127.0.0.1"
        assert await session_address(HOST, server.port, "1.2.3.4, not-an-ip, 127.0.0.1") == "127.0.0.1"
    finally:
        server.stop()


async def test_without_trusted_proxies_the_header_is_ignored(daphne):
    assert await session_address(f"127.0.0.1:{daphne.port}", daphne.port, "203.0.113.9") == "127.0.0.1"
