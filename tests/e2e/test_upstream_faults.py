"""Upstream faults over real sockets: each answers a distinct error then processing_end, and loses nothing."""

import asyncio
import json
import time

import pytest

from chat.models import ChatMessage, MessageStatus
from testkit.client import ProtocolClient
from testkit.fake_llm import SECRET_DETAIL, Script
from testkit.server import TEST_API_KEY, free_port

pytestmark = pytest.mark.django_db(transaction=True)


async def turn_with_fault(server_url: str, fake_llm, script: Script | None, *, stream: bool = True, **start):
    """One faulty turn then one good turn in the same session (started with `start`, e.g. a gpt_model;
    `fake_llm` is the fake server that answers it); returns (frames of the faulty turn, frames of the
    next turn, session_id, the client, seconds the faulty turn took)."""
    if script is not None:
        fake_llm.enqueue(script)
    client = await ProtocolClient.connect(server_url)
    session_id = await client.start_session(**start)
    started = time.monotonic()
    frames = await client.post(session_id, "faulty turn", stream=stream)
    took = time.monotonic() - started
    follow_up = await client.post(session_id, "next turn")
    await client.close()
    return frames, follow_up, session_id, client, took


def assert_clean_failure(frames, follow_up, code: str) -> None:
    types = [f["type"] for f in frames]
    assert types[0] == "processing_start" and types[-2:] == ["error", "processing_end"], types
    assert frames[-2]["data"]["code"] == code
    assert "message" not in types
    assert [f["type"] for f in follow_up] == ["processing_start", "message", "processing_end"]


async def assert_nothing_lost(session_id: str, said: list[dict] | None = None) -> None:
    """The session's rows: both messages, the good reply, and what the faulty turn streamed before it
    failed (`said`: its frames), saved as interrupted."""
    partial = "".join(f["data"] for f in said or [] if f["type"] == "message_delta")
    rows = [(m.role, m.content, m.status) async for m in ChatMessage.objects.filter(session_id=session_id)]
    expected = [("user", "faulty turn")]
    if partial:
        expected.append(("assistant", partial, MessageStatus.INTERRUPTED))
    expected += [("user", "next turn"), ("assistant", "Echo: next turn")]
    assert [row[: len(want)] for row, want in zip(rows, expected, strict=False)] == expected
    assert len(rows) == len(expected), rows


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
    """The client hears a distinct error code and processing_end; the session keeps working; what was
    said before a stream broke is kept, marked interrupted; no secret leaks."""
    server = daphne_factory(R2D2_UPSTREAM_RETRIES="0")
    frames, follow_up, session_id, client, _ = await turn_with_fault(server.url, fake_llm, script)
    assert_clean_failure(frames, follow_up, code)
    await assert_nothing_lost(session_id, said=frames)
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
    frames, follow_up, session_id, client, took = await turn_with_fault(
        server.url, fake_llm, Script(status=429, retry_after=30)
    )
    assert_clean_failure(frames, follow_up, "upstream_rate_limited")
    assert took < 10
    await assert_nothing_lost(session_id)
    assert SECRET_DETAIL not in server.log()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
async def test_a_model_that_never_answers_is_cut_at_the_first_chunk_timeout(daphne_factory, fake_llm, stream):
    """A model that sends nothing is cut off at R2D2_UPSTREAM_TIMEOUT with upstream_timeout."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="2")
    script = Script(stall=30)
    frames, follow_up, session_id, _, took = await turn_with_fault(server.url, fake_llm, script, stream=stream)
    assert_clean_failure(frames, follow_up, "upstream_timeout")
    assert took < 6
    await assert_nothing_lost(session_id)
    assert '"deadline": "first_chunk"' in server.log()


async def test_a_stream_that_outlasts_the_first_chunk_timeout_completes(daphne_factory, fake_llm):
    """R2D2_UPSTREAM_TIMEOUT bounds the wait for the first chunk only: a reply that keeps streaming
    for three times as long (3 s against 1 s) is answered whole."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="1")
    text = "slow " * 30
    fake_llm.enqueue(Script(text=text, token_delay=0.1))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    started = time.monotonic()
    frames = await client.post(session_id, "take your time", stream=True)
    took = time.monotonic() - started
    await client.close()
    assert [f["type"] for f in frames][-2:] == ["message", "processing_end"], frames[-3:]
    assert frames[-2]["data"] == text
    assert "".join(f["data"] for f in frames if f["type"] == "message_delta") == text
    assert took > 2.5
    reply = await ChatMessage.objects.aget(session_id=session_id, role="assistant")
    assert (reply.content, reply.status) == (text, MessageStatus.COMPLETE)


async def test_a_model_that_stalls_mid_reply_ends_within_the_idle_timeout(daphne_factory, fake_llm):
    """A model that goes silent after a few chunks (within the reply's first second) is cut off one
    R2D2_UPSTREAM_IDLE_TIMEOUT later with upstream_timeout; what it said is saved, marked interrupted,
    though no checkpoint had saved it yet; the session stays usable."""
    server = daphne_factory(R2D2_UPSTREAM_IDLE_TIMEOUT="1", R2D2_CHECKPOINT_SECONDS="30")
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    fake_llm.enqueue(Script(text="one two three four five six", stall_after=3, stall_for=30))
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "faulty turn", "stream": True}
    )
    frames = await client.until("message_delta")
    frames += await client.until("processing_end")
    stalled_at = max(i for i, f in enumerate(frames) if f["type"] == "message_delta")
    follow_up = await client.post(session_id, "next turn")
    await client.close()
    assert "".join(f["data"] for f in frames if f["type"] == "message_delta") == "one two three "
    assert frames[stalled_at + 1]["data"]["code"] == "upstream_timeout"
    assert_clean_failure(frames, follow_up, "upstream_timeout")
    await assert_nothing_lost(session_id, said=frames)
    assert '"deadline": "idle"' in server.log()
    assert fake_llm.wait_for(lambda f: f.disconnects >= 1), "the stalled stream was not closed"


async def test_a_model_that_stalls_is_cut_one_idle_timeout_after_its_last_chunk(daphne_factory, fake_llm):
    """The idle deadline counts from the last chunk: a 1 s idle timeout ends a stall within about 1 s."""
    server = daphne_factory(R2D2_UPSTREAM_IDLE_TIMEOUT="1")
    fake_llm.enqueue(Script(text="a b c d", stall_after=2, stall_for=30))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "x", "stream": True})
    await client.until("message_delta")
    await client.until("message_delta")
    last_chunk = time.monotonic()
    error = (await client.until("error"))[-1]
    waited = time.monotonic() - last_chunk
    await client.close()
    assert error["data"]["code"] == "upstream_timeout"
    assert 0.8 < waited < 3, waited


async def test_the_whole_reply_is_bounded_by_max_reply_seconds(daphne_factory, fake_llm):
    """A model that never stops (chunks 0.1 s apart for 10 s) is cut at R2D2_MAX_REPLY_SECONDS, the
    text so far saved as interrupted."""
    server = daphne_factory(R2D2_MAX_REPLY_SECONDS="2")
    script = Script(text="more " * 100, token_delay=0.1)
    frames, follow_up, session_id, _, took = await turn_with_fault(server.url, fake_llm, script)
    assert_clean_failure(frames, follow_up, "upstream_timeout")
    assert 1.8 < took < 5, took
    await assert_nothing_lost(session_id, said=frames)
    assert '"deadline": "whole_reply"' in server.log()


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
    turns = await asyncio.gather(*(c.post(s, "[[ttft=1.0]] slow") for c, s in zip(clients, sessions, strict=True)))
    for c in clients:
        await c.close()
    assert all(t[1]["data"] == "Echo: slow" for t in turns)
    # The second model call was made while the first waited its 1 s for a first token. (The model's clock, not the
    # turns' wall time: on a busy machine two overlapping turns can take 2 s all the same.)
    gap = abs(fake_llm.requests[1].time - fake_llm.requests[0].time)
    assert gap < 1.0, f"the two turns ran one after the other (their model calls {gap:.2f}s apart)"
    assert json.dumps(turns).count("processing_end") == 2
