"""Circuit breakers shared by two live Daphne processes on this machine's PostgreSQL and Redis, with two
fake OpenAI-compatible upstreams: once one process opened a breaker, neither waits on the dead upstream;
after the cooldown one turn probes it, and its answer closes it for both."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from chat.models import ChatMessage
from testkit.client import ProtocolClient
from testkit.fake_llm import Script
from tests.e2e.test_failover import ALTERNATE, PRIMARY, alt, alt_server, chain_env, primary  # noqa: F401 (fixtures)
from tests.production.conftest import http_get

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


async def first_token_seconds(client: ProtocolClient, session_id: str, text: str) -> float:
    """Seconds from posting a streamed message to its first delta (the turn is then read to its end)."""
    started = time.monotonic()
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": text, "stream": True}
    )
    frames = [await client.recv()]
    while frames[-1]["type"] not in {"message_delta", "processing_end"}:
        frames.append(await client.recv())
    took = time.monotonic() - started
    assert frames[-1]["type"] == "message_delta", frames
    await client.until("processing_end")
    return took


async def served(session_id: str) -> list[str]:
    return [m.model async for m in ChatMessage.objects.filter(session_id=session_id, role="assistant")]


async def test_an_open_breaker_adds_no_wait_on_either_process(daphne_factory, primary, alt):  # noqa: F811
    """A primary gone silent costs each turn the 1 s first-chunk limit until the breaker opens on one
    process; from then on turns on both start as fast as on the alternate alone (within 50 ms)."""
    env = chain_env(
        alt, R2D2_FAILOVER_FIRST_CHUNK_SECONDS="1", R2D2_CIRCUIT_FAILURES="2", R2D2_CIRCUIT_COOLDOWN_SECONDS="60"
    )
    one, two = daphne_factory(**env), daphne_factory(**env)
    primary.defaults = Script(stall=30)
    clients = [await ProtocolClient.connect(server.url) for server in (one, two)]
    direct = [await c.start_session(gpt_model=ALTERNATE) for c in clients]  # no chain: the baseline
    chained = [await c.start_session() for c in clients]
    for client, session_id in zip(clients, direct, strict=True):
        await first_token_seconds(client, session_id, "warm up")  # each process's first call opens its connections

    opening = [await first_token_seconds(clients[0], chained[0], f"opening {n}") for n in range(2)]
    assert all(seconds >= 1 for seconds in opening)  # no breaker open yet: the first-chunk limit waited
    asked = len(primary.requests)
    for client, direct_id, chained_id in zip(clients, direct, chained, strict=True):
        baseline = statistics.median([await first_token_seconds(client, direct_id, f"b{n}") for n in range(7)])
        open_ = statistics.median([await first_token_seconds(client, chained_id, f"o{n}") for n in range(7)])
        assert open_ - baseline < 0.05, (open_, baseline)
    assert len(primary.requests) == asked  # neither process called the dead upstream again
    assert (await served(chained[1]))[-1] == ALTERNATE
    metrics = http_get(two.port, "/metrics").body.decode()
    assert f'r2d2_circuit_open{{model="{PRIMARY}",upstream="openai"}} 1.0' in metrics
    for client in clients:
        await client.close()


async def test_half_open_one_probe_and_its_success_closes_it_for_both(daphne_factory, primary, alt):  # noqa: F811
    env = chain_env(alt, R2D2_CIRCUIT_FAILURES="1", R2D2_CIRCUIT_COOLDOWN_SECONDS="1")
    one, two = daphne_factory(**env), daphne_factory(**env)
    primary.defaults = Script(status=503)
    clients = [await ProtocolClient.connect(server.url) for server in (one, two)]
    sessions = [await c.start_session() for c in clients]
    await clients[0].post(sessions[0], "opens it")
    first = http_get(one.port, "/metrics").body.decode()
    assert f'r2d2_fallbacks_total{{reason="server_error",requested="{PRIMARY}",served="{ALTERNATE}"}} 1.0' in first
    await clients[1].post(sessions[1], "skips it")
    assert len(primary.requests) == 1 and await served(sessions[1]) == [ALTERNATE]

    primary.defaults = Script()  # the primary is back
    deadline = time.monotonic() + 5
    while (await served(sessions[1]))[-1] != PRIMARY:  # within the cooldown: still the alternate
        assert time.monotonic() < deadline
        await clients[1].post(sessions[1], "probe?")
        await asyncio.sleep(0.1)
    await clients[0].post(sessions[0], "closed for the other process too")
    assert (await served(sessions[0]))[-1] == PRIMARY
    metrics = http_get(two.port, "/metrics").body.decode()
    assert f'r2d2_circuit_open{{model="{PRIMARY}",upstream="openai"}} 0.0' in metrics
    assert f'r2d2_fallbacks_total{{reason="circuit_open",requested="{PRIMARY}",served="{ALTERNATE}"}}' in metrics
    for client in clients:
        await client.close()


async def test_a_chain_whose_members_are_all_open_is_tried_anyway_in_order(daphne_factory, primary, alt):  # noqa: F811
    env = chain_env(alt, R2D2_CIRCUIT_FAILURES="1", R2D2_CIRCUIT_COOLDOWN_SECONDS="60", R2D2_UPSTREAM_RETRIES="0")
    one, two = daphne_factory(**env), daphne_factory(**env)
    primary.defaults = alt.defaults = Script(status=503)
    client = await ProtocolClient.connect(one.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "both fail")
    assert frames[-2]["data"]["code"] == "upstream_server_error"
    assert (len(primary.requests), len(alt.requests)) == (1, 1)  # both open now

    alt.defaults = Script()
    other = await ProtocolClient.connect(two.url)
    session_id = await other.start_session()
    frames = await other.post(session_id, "anyway")
    assert frames[-2] == {"type": "message", "data": "Echo: anyway"}
    assert (len(primary.requests), len(alt.requests)) == (2, 2)  # the primary first, though open
    await client.close()
    await other.close()
