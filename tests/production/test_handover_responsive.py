"""A socket resuming a session another process holds keeps handling frames while that process finishes its turns
and lets go (issue 26): `chatbot_cancel`, `chatbot_session_end`, a second resume and pings are answered at once,
not after the hand-over (up to 30 s), and closing the socket ends the wait. Two live Daphne processes sharing
PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from testkit.client import ProtocolClient
from tests.e2e.test_resume import post, resume, start
from tests.production.conftest import FAST_LIVENESS

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

#: A streamed reply of 40 words, one every 0.5 s: 20 s, during which the old holder will not let go.
LONG = "[[token_delay=0.5 text=" + "_".join(f"w{i}" for i in range(40)) + "]] a very long story"


async def resuming_during_a_long_turn(daphne_factory) -> tuple[ProtocolClient, str, str, int]:
    """A client of A mid-way through a long turn drops; a new socket resumes on B (answered, then the hand-over
    waits for A's turn). Returns that socket, the session, its token and the last seq it was sent."""
    server_a, server_b = daphne_factory(**FAST_LIVENESS), daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, LONG)
    frames = [await client.recv() for _ in range(3)]
    await client.close()
    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, frames[-1]["seq"])
    assert resumed["type"] == "session_resumed", resumed
    client.server_b = server_b
    return client, session_id, token, resumed["data"]["last_seq"]


async def test_cancel_and_pings_are_handled_while_the_holder_finishes(daphne_factory):
    client, session_id, _, _ = await resuming_during_a_long_turn(daphne_factory)
    started = time.monotonic()
    pong = await client.connection.ping()
    await asyncio.wait_for(pong, 3)
    await client.send({"action": "chatbot_cancel", "session_id": session_id})
    frames = await client.until("processing_end", timeout=5)
    assert time.monotonic() - started < 5
    assert not {"message", "error"} & {f["type"] for f in frames}, frames
    reply = await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).alast()
    assert reply.status == MessageStatus.CANCELLED
    # The hand-over then completes: the session is answered on B from here.
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "and now?"})
    frames = await client.until("processing_end", timeout=10)
    assert [f["data"] for f in frames if f["type"] == "message"] == ["Echo: and now?"]
    await client.close()


async def test_session_end_is_handled_while_the_holder_finishes(daphne_factory):
    client, session_id, _, _ = await resuming_during_a_long_turn(daphne_factory)
    started = time.monotonic()
    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    frames = await client.until("session_end", timeout=5)
    assert time.monotonic() - started < 5
    assert frames[-1] == {"type": "session_end", "data": None} and "error" not in [f["type"] for f in frames], frames
    session = await ChatSession.objects.aget(id=session_id)
    assert session.ended_at is not None and session.end_reason == "client"
    await client.close()


async def test_a_second_resume_and_a_close_end_the_wait(daphne_factory):
    client, session_id, token, last_seq = await resuming_during_a_long_turn(daphne_factory)
    # The same socket resumes again (it lost count): answered at once.
    started = time.monotonic()
    await client.send(
        {"action": "chatbot_session_resume", "session_id": session_id, "resume_token": token, "last_seq": last_seq}
    )
    frames = await client.until("session_resumed", timeout=5)  # after the frames forwarded until then
    assert time.monotonic() - started < 5, frames
    # It closes; another socket resumes on the same process: answered at once, not when the old turn ends.
    await client.close()
    other = await ProtocolClient.connect(client.server_b.url)
    started = time.monotonic()
    assert (await resume(other, session_id, token, last_seq))["type"] == "session_resumed"
    assert time.monotonic() - started < 5
    frames = await other.until("processing_end", timeout=30)
    assert [f["type"] for f in frames][-2:] == ["message", "processing_end"]
    await other.close()
