"""/metrics on a live Daphne: counters move after a turn; tokens and cost by model, bounded by the
configured models; private peers read it over plain HTTP whatever the Host, others need the token or staff."""

import asyncio
import re
import secrets

import pytest

from testkit.client import ProtocolClient
from testkit.wait import async_wait_until
from tests.production.conftest import http_get

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "metrics-token-for-tests-0123456789"


def value(body: str, sample: str) -> float:
    """The value of one sample line, e.g. 'r2d2_turns_total{outcome="answered"}'; 0 when absent."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def scrape(port: int, host: str = "localhost", **headers: str):
    return await asyncio.to_thread(http_get, port, "/metrics", host=host, headers=headers)


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
    completion = 'r2d2_tokens_total{kind="completion",model="gpt-3.5-turbo"}'  # the default model
    assert value(after, completion) > value(before, completion)

    await client.close()

    async def gauges_back_to_zero() -> bool:
        closed = (await scrape(server.port)).body.decode()
        return value(closed, "r2d2_open_sockets") == 0 and value(closed, "r2d2_live_sessions") == 0

    await async_wait_until(gauges_back_to_zero, timeout=10)
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


async def test_tokens_and_cost_by_model_and_other_for_unlisted_names(daphne_factory):
    server = daphne_factory(R2D2_MODEL_PRICES="gpt-4o-mini=0.15:0.60")
    for model in ("gpt-4o-mini", "made-up-model-1234", "made-up-model-5678"):
        client = await ProtocolClient.connect(server.url)
        session_id = await client.start_session(gpt_model=model)
        frames = await client.post(session_id, "what does this cost?")
        assert frames[-2]["type"] == "message", frames
        await client.close()

    body = (await scrape(server.port)).body.decode()
    assert "made-up-model" not in body, "a name a client chose must not become a label"
    prompt = value(body, 'r2d2_tokens_total{kind="prompt",model="gpt-4o-mini"}')
    completion = value(body, 'r2d2_tokens_total{kind="completion",model="gpt-4o-mini"}')
    assert prompt > 0 and completion > 0
    assert value(body, 'r2d2_tokens_total{kind="completion",model="other"}') > completion  # two turns' worth
    cost = value(body, 'r2d2_cost_dollars_total{model="gpt-4o-mini"}')
    assert cost == pytest.approx((prompt * 0.15 + completion * 0.60) / 1e6)
    assert 'r2d2_cost_dollars_total{model="other"}' not in body  # unpriced: no estimate


async def test_private_peers_scrape_over_plain_http_whatever_the_host(daphne_factory):
    """Production mode (HTTPS redirect on, one allowed Host) behind one trusted proxy."""
    server = daphne_factory(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="r2d2.example.com",
        R2D2_TRUSTED_PROXIES="1",
        R2D2_METRICS_TOKEN=TOKEN,
    )
    # A Prometheus in the VPC scraping the instance at its private address and the app's port.
    direct = await scrape(server.port, host="10.0.3.7:8000")
    assert direct.status == 200 and b"r2d2_open_sockets" in direct.body
    for private in ("10.0.0.8", "172.31.5.9", "192.168.1.2", "169.254.10.1", "fd12:3456::1", "fe80::1"):
        through_proxy = await scrape(server.port, host="10.0.3.7", **{"X-Forwarded-For": private})
        assert through_proxy.status == 200, private

    # A public client is still sent to HTTPS, and refused there without the token.
    public = {"X-Forwarded-For": "203.0.113.9"}
    redirect = await scrape(server.port, host="r2d2.example.com", **public, **{"X-Forwarded-Proto": "http"})
    assert redirect.status == 301 and redirect.headers["location"] == "https://r2d2.example.com/metrics"
    https = {**public, "X-Forwarded-Proto": "https"}
    assert (await scrape(server.port, host="r2d2.example.com", **https)).status == 403
    allowed = await scrape(server.port, host="r2d2.example.com", **https, Authorization=f"Bearer {TOKEN}")
    assert allowed.status == 200 and b"r2d2_open_sockets" in allowed.body
    # ... and a public client cannot use the private way by naming a private address first.
    spoofed = await scrape(server.port, host="10.0.3.7", **{"X-Forwarded-For": "10.0.0.8, 203.0.113.9"})
    assert spoofed.status == 400  # not private: the usual checks, and that Host is not allowed

    # Only /metrics: other pages keep the redirect for private peers too.
    page = await asyncio.to_thread(http_get, server.port, "/admin/login/", host="r2d2.example.com")
    assert page.status == 301
