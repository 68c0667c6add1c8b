"""On a live server: warnings a client can cause at will are logged once per client address per minute
(the model call it makes fail, a missing page, a Host outside DJANGO_ALLOWED_HOSTS); other clients still
get their own line."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
import websockets

from testkit.client import ProtocolClient
from tests.production.conftest import http_get

pytestmark = pytest.mark.django_db(transaction=True)


def lines(log: str, message: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == message:
            found.append(record)
    return found


async def client_at(server, address: str) -> ProtocolClient:
    return ProtocolClient(await websockets.connect(server.url, additional_headers={"X-Forwarded-For": address}))


async def test_one_line_per_client_per_minute(daphne_factory):
    # As in production: debug off (with it on, Django also prints these lines to its own console handler).
    server = daphne_factory(
        R2D2_TRUSTED_PROXIES="1",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_SECURE_SSL_REDIRECT="0",
    )
    noisy, other = await client_at(server, "203.0.113.9"), await client_at(server, "198.51.100.7")
    for client, turns in ((noisy, 6), (other, 2)):
        session_id = await client.start_session()
        for _ in range(turns):  # the model server refuses each: upstream_bad_request
            frames = await client.post(session_id, "[[status=400]] refuse me")
            assert frames[-2]["data"]["code"] == "upstream_bad_request"
        await client.close()

    noisy_headers = {"X-Forwarded-For": "203.0.113.9"}
    for _ in range(10):
        page = await asyncio.to_thread(http_get, server.port, "/no-such-page", headers=noisy_headers)
        assert page.status == 404
        bad_host = await asyncio.to_thread(http_get, server.port, "/", host="evil.example")
        assert bad_host.status == 400

    log = server.log()
    failed = lines(log, "model call failed")
    assert len(failed) == 2, failed  # one for each client, not eight
    assert {record["code"] for record in failed} == {"upstream_bad_request"}
    assert len(lines(log, "Not Found: /no-such-page")) == 1
    bad_hosts = [line for line in log.splitlines() if "Invalid HTTP_HOST header" in line]
    assert len(bad_hosts) == 1, bad_hosts
