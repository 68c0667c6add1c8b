"""Upstream faults over real sockets: each answers a distinct error then processing_end, and loses nothing."""

import asyncio
import json
import time

import pytest

from chat.models import ChatMessage, MessageStatus
from tests.client import ProtocolClient
from tests.conftest import TEST_API_KEY, free_port
from tests.fake_llm import SECRET_DETAIL, Script

pytestmark = pytest.mark.django_db(transaction=True)


async def turn_with_fault(server_url: str, fake_llm, script: Script | None, *, stream: bool = True):
    """One faulty turn then one good turn in the same session; returns (frames of the faulty turn, session_id)."""
    if script is not None:
        fake_llm.enqueue(script)
    client = await ProtocolClient.connect(server_url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "faulty turn", stream=stream)
    follow_up = await client.post(session_id, "next turn")
    await client.close()
    return frames, follow_up, session_id, client


def assert_clean_failure(frames, follow_up, code: str) -> None:
    types = [f["type"] for f in frames]
    assert types[0] == "processing_start" and types[-2:] == ["error", "processing_end"], types
    assert frames[-2]["data"]["code"] == code
    assert "message" not in types
    assert [f["type"] for f in follow_up] == ["processing_start", "message", "processing_end"]


async def assert_nothing_lost(session_id: str) -> None:
    """Both messages saved, the second answered; what the failed turn had said, if anything, is kept as interrupted."""
    rows = [(m.role, m.content, m.status) async for m in ChatMessage.objects.filter(session_id=session_id)]
    partial = [r for r in rows if r[2] == MessageStatus.INTERRUPTED]
    assert all(r[0] == "assistant" and "Echo: faulty turn".startswith(r[1]) and r[1] for r in partial), partial
    rest = [(role, content) for role, content, status in rows if status != MessageStatus.INTERRUPTED]
    assert rest == [("user", "faulty turn"), ("user", "next turn"), ("assistant", "Echo: next turn")]


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (Script(status=500), "upstream_server_error"),
        (Script(status=400), "upstream_bad_request"),
        (Script(status=401), "upstream_auth_failed"),
        (Script(cut_after=2), "upstream_stream_interrupted"),
        (Script(malformed=True), "upstream_invalid_response"),
    ],
    ids=["500", "400-unknown-model", "401", "cut-midway", "malformed-sse"],
)
async def test_upstream_fault(daphne_factory, fake_llm, script, code):
    """The client hears a distinct error code and processing_end; the session keeps working; no secret leaks."""
    server = daphne_factory(R2D2_UPSTREAM_RETRIES="0")
    frames, follow_up, session_id, client = await turn_with_fault(server.url, fake_llm, script)
    assert_clean_failure(frames, follow_up, code)
    await assert_nothing_lost(session_id)
    everything = "".join(client.received) + server.log()
    assert SECRET_DETAIL not in everything
    assert TEST_API_KEY not in everything


async def test_rate_limit_honours_retry_after_then_succeeds(daphne, fake_llm):
    """A 429 with a short Retry-After is retried after that wait, and the client just gets the answer."""
    fake_llm.enqueue(Script(status=429, retry_after=0.3))
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "patience")
    await client.close()
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
    first, second = fake_llm.requests
    assert second.time - first.time >= 0.3


async def test_rate_limit_beyond_the_timeout_gives_up(daphne_factory, fake_llm):
    """A Retry-After longer than the remaining time budget is not waited for: upstream_rate_limited at once."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="2")
    started = time.monotonic()
    frames, follow_up, session_id, client = await turn_with_fault(
        server.url, fake_llm, Script(status=429, retry_after=30)
    )
    assert_clean_failure(frames, follow_up, "upstream_rate_limited")
    assert time.monotonic() - started < 10
    await assert_nothing_lost(session_id)
    assert SECRET_DETAIL not in server.log()


async def test_timeout_bounds_the_whole_call(daphne_factory, fake_llm):
    """A model that never answers is cut off at R2D2_UPSTREAM_TIMEOUT with upstream_timeout."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="1")
    frames, follow_up, session_id, _ = await turn_with_fault(server.url, fake_llm, Script(stall=30))
    assert_clean_failure(frames, follow_up, "upstream_timeout")
    await assert_nothing_lost(session_id)


async def test_slow_stream_is_cut_at_the_timeout_too(daphne_factory, fake_llm):
    """The timeout bounds the whole reply, not just the first byte."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="1")
    script = Script(text="slow " * 50, token_delay=0.1)
    frames, follow_up, session_id, _ = await turn_with_fault(server.url, fake_llm, script)
    assert "message_delta" in [f["type"] for f in frames]
    assert_clean_failure(frames, follow_up, "upstream_timeout")


async def test_connection_refused(daphne_factory, fake_llm):
    """A model server that is down answers upstream_unavailable; the user's message is still saved."""
    server = daphne_factory(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", R2D2_UPSTREAM_RETRIES="1")
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "anyone there?")
    again = await client.post(session_id, "hello?")
    await client.close()
    for turn in (frames, again):
        assert [f["type"] for f in turn] == ["processing_start", "error", "processing_end"]
        assert turn[1]["data"]["code"] == "upstream_unavailable"
    users = [m.content async for m in ChatMessage.objects.filter(session_id=session_id, role="user")]
    assert users == ["anyone there?", "hello?"]


async def test_cancel_over_a_real_socket_drops_the_upstream_connection(daphne, fake_llm):
    """chatbot_cancel mid-stream: the model server sees the connection close; the partial reply is kept."""
    fake_llm.enqueue(Script(text="w " * 100, token_delay=0.05))
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go on", "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"
    assert (await client.recv())["type"] == "message_delta"
    await client.send({"action": "chatbot_cancel", "session_id": session_id})
    rest = await client.until("processing_end")
    assert "error" not in [f["type"] for f in rest]
    await client.close()
    assert fake_llm.wait_for(lambda s: s.disconnects == 1)
    reply = await ChatMessage.objects.aget(session_id=session_id, role="assistant")
    assert reply.status == MessageStatus.CANCELLED
    assert 0 < len(reply.content) < len("w " * 100)


async def test_sessions_generate_concurrently(daphne, fake_llm):
    """Two sockets' turns overlap in time instead of waiting for each other."""
    clients = [await ProtocolClient.connect(daphne.url) for _ in range(2)]
    sessions = [await c.start_session() for c in clients]
    started = time.monotonic()
    turns = await asyncio.gather(*(c.post(s, "[[ttft=1.0]] slow") for c, s in zip(clients, sessions, strict=True)))
    elapsed = time.monotonic() - started
    for c in clients:
        await c.close()
    assert all(t[1]["data"] == "Echo: slow" for t in turns)
    assert elapsed < 1.9, f"the two turns ran one after the other ({elapsed:.2f}s)"
    assert json.dumps(turns).count("processing_end") == 2
