"""Fallback chains over real sockets: two fake OpenAI-compatible upstreams (the default one and `alt`)
and the fake Bedrock, behind live Daphne. A turn moves on only before any text, only for failures
another upstream may not share; the row says which model answered and it is charged at that price."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async

from chat.accounts import auth
from chat.models import ChatMessage, ChatSession, MessageStatus
from testkit.client import ProtocolClient
from testkit.fake_bedrock import BedrockScript
from testkit.fake_llm import FakeLLM, Script, tokenize
from testkit.server import bedrock_env, free_port

pytestmark = pytest.mark.django_db(transaction=True)

ALT_KEY = "sk-alt-upstream-key-0123456789"
PRIMARY = "gpt-3.5-turbo"  # the default model: a session started with no gpt_model asks for it
ALTERNATE = "alt/gpt-4o-mini"
PRICES = f"{PRIMARY}=1:1,{ALTERNATE}=1000:2000"

make_key = sync_to_async(auth.create_api_key)


@pytest.fixture(scope="module")
def alt_server() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def alt(alt_server: FakeLLM) -> Iterator[FakeLLM]:
    """The second upstream, emptied and healthy."""
    alt_server.reset()
    alt_server.defaults = Script()
    yield alt_server
    alt_server.defaults = Script()


@pytest.fixture
def primary(fake_llm: FakeLLM) -> Iterator[FakeLLM]:
    """The default upstream; whatever fault a test gives it by default is taken back after."""
    yield fake_llm
    fake_llm.defaults = Script()


def chain_env(alt: FakeLLM, **overrides: str) -> dict[str, str]:
    """A server's environment with the chain gpt-3.5-turbo → alt/gpt-4o-mini. Its own channel prefix, so
    breakers in Redis start closed for each test (the servers of one test share them)."""
    env = {
        "R2D2_CHANNEL_PREFIX": f"r2d2-failover-{uuid.uuid4().hex[:8]}",
        "R2D2_UPSTREAMS": f"alt={alt.url}",
        "R2D2_UPSTREAM_ALT_API_KEY": ALT_KEY,
        "R2D2_FALLBACKS": f"{PRIMARY}={ALTERNATE}",
        "R2D2_FAILOVER_FIRST_CHUNK_SECONDS": "0.5",
    }
    return env | overrides


def bearer(key: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {key}"}}


async def replies(session_id: str) -> list[ChatMessage]:
    return [m async for m in ChatMessage.objects.filter(session_id=session_id, role="assistant")]


async def usd_today(client: ProtocolClient, expected: float) -> float:
    """The principal's dollars today once its turns are settled (settling runs after processing_end)."""
    used = -1.0
    for _ in range(50):
        await client.send({"action": "chatbot_usage"})
        [frame] = await client.until("usage")
        used = frame["data"]["usd_today"]["used"]
        if math.isclose(used, expected, abs_tol=1e-6):
            break
        await asyncio.sleep(0.1)
    return used


def cost_at_alternate_price(fake: FakeLLM) -> float:
    """What the alternate's requests cost at its price (1000:2000 $ per million), from what it received
    and answered (the fake counts a prompt token per 4 characters, plus one, and a token per word)."""
    nano = 0
    for request in fake.requests:
        prompt = sum(len(m["content"]) for m in request.messages) // 4 + 1
        completion = len(tokenize("Echo: " + request.messages[-1]["content"]))
        nano += math.ceil(prompt * 1000 * 1000 + completion * 2000 * 1000)
    return round(nano / 1e9, 6)


@pytest.mark.parametrize("fault", ["503", "refused", "silent"])
async def test_every_turn_on_a_failing_primary_is_answered_by_the_alternate_at_its_price(
    daphne_factory, primary, alt, fault
):
    """Plain and streamed turns: the client gets the alternate's answer as usual; the row records the model
    that answered and the one asked for; the key is charged the alternate's price."""
    env = chain_env(alt, R2D2_REQUIRE_AUTH="1", R2D2_MODEL_PRICES=PRICES, R2D2_CIRCUIT_FAILURES="100")
    if fault == "refused":
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{free_port()}/v1"
    else:
        primary.defaults = Script(status=503) if fault == "503" else Script(stall=30)
    server = daphne_factory(**env)
    _, key = await make_key("failover")
    client = await ProtocolClient.connect(server.url, **bearer(key))
    session_id = await client.start_session()
    for stream in (False, True, False):
        started = time.monotonic()
        frames = await client.post(session_id, f"hello {stream}", stream=stream)
        said = [f for f in frames if f["type"] == "message"]
        assert [f["type"] for f in frames][-2:] == ["message", "processing_end"], frames
        assert said[0]["data"] == f"Echo: hello {stream}"
        assert time.monotonic() - started < 5  # the silent primary is left after 0.5 s, not R2D2_UPSTREAM_TIMEOUT

    rows = await replies(session_id)
    assert [(r.model, r.requested_model, r.status) for r in rows] == [(ALTERNATE, PRIMARY, MessageStatus.COMPLETE)] * 3
    assert [r.body["model"] for r in alt.requests] == ["gpt-4o-mini"] * 3
    assert all(r.headers["Authorization"] == f"Bearer {ALT_KEY}" for r in alt.requests)
    if fault != "refused":
        assert len(primary.requests) == 3  # tried every turn (the breaker is out of the way here)
    expected = cost_at_alternate_price(alt)
    assert await usd_today(client, expected) == pytest.approx(expected, abs=1e-6)
    await client.close()


async def test_the_first_chunk_limit_never_cuts_a_healthy_long_reply(daphne_factory, primary, alt):
    """A plain reply that takes 1.5 s to generate, on a chain with a 0.5 s first-chunk limit: the primary
    answers it whole (its upstream call streams, so the limit applies to the first token only)."""
    server = daphne_factory(**chain_env(alt))
    primary.enqueue(Script(text=" ".join(f"w{n}" for n in range(16)), token_delay=0.1))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "a long one")
    assert frames[-2] == {"type": "message", "data": " ".join(f"w{n}" for n in range(16))}
    assert alt.requests == []
    assert [r.model for r in await replies(session_id)] == [PRIMARY]
    await client.close()


async def test_a_cut_mid_stream_is_not_answered_again(daphne_factory, primary, alt):
    """Text reached the client: the failure ends the turn as without a chain, what was said is saved."""
    server = daphne_factory(**chain_env(alt))
    primary.enqueue(Script(cut_after=2))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "one two three four five", stream=True)
    assert [f["type"] for f in frames][-2:] == ["error", "processing_end"]
    assert frames[-2]["data"]["code"] == "upstream_stream_interrupted"
    partial = "".join(f["data"] for f in frames if f["type"] == "message_delta")
    assert partial == "Echo: one "
    [row] = await replies(session_id)
    assert (row.content, row.status, row.model) == (partial, MessageStatus.INTERRUPTED, PRIMARY)
    assert alt.requests == []
    await client.close()


async def test_a_plain_turn_cut_after_its_first_chunk_is_not_answered_again(daphne_factory, primary, alt):
    """A plain turn streams from a chain's upstream: once the model began, no other model answers it."""
    server = daphne_factory(**chain_env(alt))
    primary.enqueue(Script(cut_after=2))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "one two three four five")
    assert frames[-2]["data"]["code"] == "upstream_stream_interrupted"
    assert alt.requests == [] and primary.requests[0].body["stream"] is True
    [row] = await replies(session_id)
    assert (row.content, row.status) == ("Echo: one ", MessageStatus.INTERRUPTED)  # kept, as a streamed turn's
    await client.close()


@pytest.mark.parametrize("status", [400, 404])
async def test_the_requests_own_fault_moves_nowhere(daphne_factory, primary, alt, status):
    server = daphne_factory(**chain_env(alt))
    primary.enqueue(Script(status=status))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello")
    assert frames[-2]["data"]["code"] == "upstream_bad_request"
    assert alt.requests == []
    await client.close()


async def test_an_alternate_outside_the_keys_models_is_skipped_and_logged_once(daphne_factory, primary, alt):
    server = daphne_factory(**chain_env(alt, R2D2_REQUIRE_AUTH="1"))
    primary.defaults = Script(status=503)
    _, key = await make_key("narrow", models=[PRIMARY])
    client = await ProtocolClient.connect(server.url, **bearer(key))
    session_id = await client.start_session()
    for _ in range(2):
        frames = await client.post(session_id, "hello")
        assert frames[-2]["data"]["code"] == "upstream_server_error"
    assert alt.requests == []
    await client.close()
    server.stop()
    assert server.log().count("fallback skipped") == 1
    assert ALTERNATE in server.log()


async def test_a_key_that_may_use_the_alternate_gets_it(daphne_factory, primary, alt):
    """The same chain with the alternate in the key's models, under its routed name."""
    server = daphne_factory(**chain_env(alt, R2D2_REQUIRE_AUTH="1"))
    primary.defaults = Script(status=503)
    _, key = await make_key("wide", models=[PRIMARY, ALTERNATE])
    client = await ProtocolClient.connect(server.url, **bearer(key))
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello")
    assert frames[-2] == {"type": "message", "data": "Echo: hello"}
    await client.close()


async def test_bedrock_is_an_alternate_and_its_throttling_moves_on(daphne_factory, primary, fake_bedrock):
    """An OpenAI-compatible model falls back to Bedrock; a Bedrock model whose region throttles falls back
    to the default upstream."""
    bedrock_model = "bedrock/amazon.nova-lite-v1:0"
    env = bedrock_env(fake_bedrock) | {
        "R2D2_FALLBACKS": f"{PRIMARY}={bedrock_model};{bedrock_model}={PRIMARY}",
        "R2D2_ALLOWED_MODELS": f"{PRIMARY},{bedrock_model}",
    }
    server = daphne_factory(**env)
    primary.enqueue(Script(status=503))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello", stream=True)
    assert frames[-2] == {"type": "message", "data": "Echo: hello"}
    assert [r.model for r in await replies(session_id)] == [bedrock_model]

    fake_bedrock.enqueue(BedrockScript(status=429))
    session_id = await client.start_session(gpt_model=bedrock_model)
    frames = await client.post(session_id, "again")
    assert frames[-2] == {"type": "message", "data": "Echo: again"}
    assert [(r.model, r.requested_model) for r in await replies(session_id)] == [(PRIMARY, bedrock_model)]
    await client.close()


async def test_without_a_model_the_offline_responder_is_no_alternate(daphne_factory, alt):
    """With no default upstream configured, `gpt-3.5-turbo` as an alternate would be the offline
    responder: it is left out, and a failing `alt` model fails as it would without a chain."""
    env = chain_env(alt, R2D2_FALLBACKS=f"{ALTERNATE}={PRIMARY}", R2D2_ALLOWED_MODELS=ALTERNATE)
    server = daphne_factory(**env, OPENAI_BASE_URL="", OPENAI_API_KEY="")
    alt.enqueue(Script(status=503), Script(status=503), Script(status=503))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=ALTERNATE)
    frames = await client.post(session_id, "hello")
    assert frames[-2]["data"]["code"] == "upstream_server_error", frames
    assert "offline responder" not in str(frames)
    await client.close()


async def test_a_client_that_asks_learns_which_model_answered_and_others_see_the_seed_bytes(
    daphne_factory, primary, alt
):
    server = daphne_factory(**chain_env(alt))
    primary.defaults = Script(status=503)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    await client.post(session_id, "which?", report_model=True)
    assert client.received[-1] == '{"type": "processing_end", "data": {"model": "alt/gpt-4o-mini"}}'
    await client.post(session_id, "plain", stream=True)
    assert client.received[-1] == '{"type": "processing_end", "data": null}'
    primary.defaults = Script()
    alt.defaults = Script(status=400)
    await client.post(session_id, "answered by the model asked for", report_model=True)
    assert client.received[-1] == '{"type": "processing_end", "data": {"model": "gpt-3.5-turbo"}}'
    primary.defaults = Script(status=400)
    frames = await client.post(session_id, "answered by none", report_model=True)
    assert frames[-2]["data"]["code"] == "upstream_bad_request"
    assert client.received[-1] == '{"type": "processing_end", "data": {"model": null}}'
    await client.close()


def test_the_admin_shows_the_model_that_answered_when_it_is_not_the_one_asked_for(admin_client):
    session = ChatSession.objects.create(model=PRIMARY)
    question = ChatMessage.objects.create(session=session, role="user", content="q")
    ChatMessage.objects.create(
        session=session, role="assistant", content="a", model=ALTERNATE, requested_model=PRIMARY, reply_to=question
    )
    ChatMessage.objects.create(session=session, role="user", content="q2")
    ChatMessage.objects.create(session=session, role="assistant", content="b", model=PRIMARY, requested_model=PRIMARY)
    page = admin_client.get(f"/admin/chat/chatsession/{session.id}/change/").content.decode()
    assert page.count("answered by") == 1
    assert f"answered by {ALTERNATE}, asked {PRIMARY}" in page
