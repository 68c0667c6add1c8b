"""A client that never reads cannot make the server hold its replies in memory without bound."""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from tests.client import ProtocolClient
from tests.fake_llm import Script
from tests.raw_websocket import RawWebSocket

pytestmark = [pytest.mark.django_db(transaction=True)]

CHUNK = "z" * 32_768


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_client_that_never_reads_is_closed_and_its_turn_is_saved(daphne_factory, fake_llm):
    """Past R2D2_MAX_UNSENT_BYTES waiting for it, the server closes the connection (code 4408); the turn's
    reply so far is saved, its session ends, the server's memory does not grow by the reply, and a client
    that reads is served meanwhile."""
    # As in production (with debug on, Django keeps every query's SQL, long replies included); a beat
    # every half second: the heartbeat also hands freed memory back to the system.
    server = daphne_factory(DJANGO_DEBUG="0", R2D2_MAX_UNSENT_BYTES=str(512 * 1024), R2D2_HEARTBEAT_SECONDS="0.5")
    reader = await ProtocolClient.connect(server.url)
    other = await reader.start_session()
    await reader.post(other, "warm up", stream=True)  # the model client and the database pool exist now
    before = rss_kib(server.process.pid)
    fake_llm.enqueue(Script(chunks=[CHUNK] * 1500, token_delay=0.002))  # ~49 MB streamed

    slow = await asyncio.to_thread(RawWebSocket, server.port)
    slow.send({"action": "chatbot_session_start"})
    await asyncio.sleep(0.5)
    session = await ChatSession.objects.alatest("created_at")
    slow.send({"action": "chatbot_post_message", "session_id": str(session.id), "user_message": "x", "stream": True})

    deadline = time.monotonic() + 30
    while (await ChatSession.objects.aget(id=session.id)).ended_at is None:
        assert time.monotonic() < deadline, "the non-reading connection was never closed"
        frames = await reader.post(other, "are you there?")
        assert {"type": "message", "data": "Echo: are you there?"} in frames
        await asyncio.sleep(0.2)
    await reader.close()

    ended = await ChatSession.objects.aget(id=session.id)
    assert ended.end_reason == EndReason.DISCONNECT
    reply = await ChatMessage.objects.filter(session_id=session.id, role=Role.ASSISTANT).afirst()
    assert reply is not None and reply.status == MessageStatus.CANCELLED
    assert 0 < len(reply.content) < len(CHUNK) * 1500
    assert fake_llm.wait_for(lambda f: f.disconnects >= 1), "the upstream stream was not closed"
    await asyncio.sleep(1.5)
    growth_mib = (rss_kib(server.process.pid) - before) / 1024
    # Unbounded, the whole ~49 MB stream would wait in the server's buffer; bounded, what remains is at
    # most about the reply itself (saved; up to ~14 MB here, depending on how fast the model streamed).
    assert growth_mib < 32, f"server RSS grew by {growth_mib:.0f} MiB; reply {len(reply.content)}"
    assert "closing a connection that does not read" in server.log()
    assert await asyncio.to_thread(slow.read_until_closed) < 16 * 1024 * 1024
    slow.close()
