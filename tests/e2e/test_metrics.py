"""/metrics on a live Daphne: counters move after a turn; only private addresses, the bearer token or staff may read."""

import asyncio
import re

import pytest

from tests.client import ProtocolClient
from tests.production.conftest import http_get

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "metrics-token-for-tests-0123456789"


def value(body: str, sample: str) -> float:
    """The value of one sample line, e.g. 'r2d2_turns_total{outcome="answered"}'; 0 when absent."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def scrape(port: int, **headers: str):
    return await asyncio.to_thread(http_get, port, "/metrics", headers=headers)


async def test_counters_move_after_a_turn(daphne_factory):
    server = daphne_factory(R2D2_METRICS_TOKEN=TOKEN)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    before = (await scrape(server.port)).body.decode()
    frames = await client.post(session_id, "count me", stream=True)
    assert frames[-1]["type"] == "processing_end"
    await client.send("not json")
    assert (await client.recv())["data"]["code"] == "invalid_json"

    response = await scrape(server.port)
    assert response.status == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.body.decode()
    assert value(after, "r2d2_open_sockets") == 1 and value(after, "r2d2_live_sessions") == 1
    for sample in (
        'r2d2_turns_total{outcome="answered"}',
        "r2d2_time_to_first_delta_seconds_count",
        "r2d2_time_to_message_seconds_count",
        'r2d2_rejected_frames_total{code="invalid_json"}',
    ):
        assert value(after, sample) == value(before, sample) + 1, sample
    assert value(after, 'r2d2_tokens_total{kind="completion"}') > value(before, 'r2d2_tokens_total{kind="completion"}')

    await client.close()
    await asyncio.sleep(0.3)
    closed = (await scrape(server.port)).body.decode()
    assert value(closed, "r2d2_open_sockets") == 0 and value(closed, "r2d2_live_sessions") == 0


async def test_unauthorized_scrape_is_refused(daphne_factory):
    server = daphne_factory(R2D2_METRICS_TOKEN=TOKEN)
    public = {"X-Forwarded-For": "203.0.113.9"}  # as a client behind the load balancer arrives
    assert (await scrape(server.port, **public)).status == 403
    assert (await scrape(server.port, **public, Authorization="Bearer wrong-token")).status == 403
    # A client cannot make itself private by adding a hop: its own address is still in the chain.
    assert (await scrape(server.port, **{"X-Forwarded-For": "10.0.0.1, 203.0.113.9"})).status == 403
    allowed = await scrape(server.port, **public, Authorization=f"Bearer {TOKEN}")
    assert allowed.status == 200 and b"r2d2_open_sockets" in allowed.body
    assert TOKEN not in server.log()
