"""Flow control: a client on a slow link gets its whole reply; one that stops reading is closed,
and neither makes the server hold a reply in memory (chat/edge/flow.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.fake_llm import Script
from testkit.raw_websocket import RawWebSocket
from testkit.slow_link import SlowLink
from testkit.wait import async_wait_until

pytestmark = [pytest.mark.django_db(transaction=True)]

RATE = 256 * 1024  # bytes a second: roughly a good phone link
WORD = "w" * 4095 + " "
LONG_REPLY = [WORD] * 1100  # 4.5 MB, in 4 KiB chunks
CHUNK = "z" * 32_768


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
async def test_a_client_reading_at_256_kib_per_s_receives_a_long_reply_whole(daphne_factory, fake_llm, stream):
    """Through a local link that carries 256 KiB/s, a 4.5 MB reply arrives whole, streamed or not, and
    the socket stays open: the server waits for the client instead of closing it as a non-reader."""
    server = daphne_factory(DJANGO_DEBUG="0")
    text = "".join(LONG_REPLY)
    fake_llm.enqueue(Script(chunks=LONG_REPLY) if stream else Script(text=text))
    link = await SlowLink(server.port, RATE).start()
    # max_size: the whole reply is one `message` frame. No client pings: a pong would queue behind
    # the megabytes in flight on this link (the server's own pings are answered as they arrive).
    client = await ProtocolClient.connect(link.url, max_size=None, ping_interval=None)
    try:
        session_id = await client.start_session()
        started = time.monotonic()
        await client.send(
            {"action": "chatbot_post_message", "session_id": session_id, "user_message": "long", "stream": stream}
        )
        frames = await client.until("processing_end", timeout=90)
        took = time.monotonic() - started
        follow_up = await client.post(session_id, "still there?")
    finally:
        await client.close()
        await link.stop()
    types = [f["type"] for f in frames]
    assert types[0] == "processing_start" and types[-2:] == ["message", "processing_end"], types[-3:]
    assert frames[-2]["data"] == text
    if stream:
        assert "".join(f["data"] for f in frames if f["type"] == "message_delta") == text
    assert [f["type"] for f in follow_up] == ["processing_start", "message", "processing_end"]
    assert took > 0.8 * link.forwarded / RATE, "the link was not slow"
    assert "does not read" not in server.log()


async def test_a_client_that_stops_reading_is_closed_and_its_reply_saved(daphne_factory, fake_llm):
    """A client that reads nothing while a long reply streams: the turn stops reading the model once the
    socket's buffer is full, the client is closed (4408) after R2D2_STALLED_READER_SECONDS without
    progress, the reply so far is saved, the model's stream is closed, the server's memory does not
    grow by the reply, and a client that reads is served meanwhile."""
    # As in production (with debug on, Django keeps every query's SQL, long replies included); a beat
    # every half second: the heartbeat also hands freed memory back to the system.
    server = daphne_factory(DJANGO_DEBUG="0", R2D2_STALLED_READER_SECONDS="2", R2D2_HEARTBEAT_SECONDS="0.5")
    reader = await ProtocolClient.connect(server.url)
    other = await reader.start_session()
    await reader.post(other, "warm up", stream=True)  # the model client and the database pool exist now
    before = rss_kib(server.process.pid)
    fake_llm.enqueue(Script(chunks=[CHUNK] * 1500, token_delay=0.002))  # ~49 MB streamed

    sessions_before = await ChatSession.objects.acount()
    slow = await asyncio.to_thread(RawWebSocket, server.port)
    slow.send({"action": "chatbot_session_start"})
    assert await async_wait_until(lambda: _more_sessions_than(sessions_before), timeout=10)
    session = await ChatSession.objects.alatest("created_at")
    slow.send({"action": "chatbot_post_message", "session_id": str(session.id), "user_message": "x", "stream": True})
    started = time.monotonic()

    while (await ChatSession.objects.aget(id=session.id)).ended_at is None:
        assert time.monotonic() - started < 30, "the non-reading connection was never closed"
        frames = await reader.post(other, "are you there?")
        assert {"type": "message", "data": "Echo: are you there?"} in frames
        await asyncio.sleep(0.2)
    await reader.close()

    ended = await ChatSession.objects.aget(id=session.id)
    assert ended.end_reason == EndReason.DISCONNECT
    reply = await ChatMessage.objects.filter(session_id=session.id, role=Role.ASSISTANT).afirst()
    assert reply is not None and reply.status == MessageStatus.CANCELLED
    # Paused, the turn stopped reading: what it took from the model is what the socket's buffers
    # held (the kernel's, up to a few MB, and R2D2_SEND_BUFFER_BYTES), not the ~49 MB the model
    # had to say in those seconds.
    assert 0 < len(reply.content) < 8 * 1024 * 1024, len(reply.content)
    assert fake_llm.wait_for(lambda f: f.disconnects >= 1), "the upstream stream was not closed"
    await asyncio.sleep(1.5)  # the freed reply's memory goes back before RSS is read (no event says when)
    growth_mib = (rss_kib(server.process.pid) - before) / 1024
    assert growth_mib < 16, f"server RSS grew by {growth_mib:.0f} MiB; reply {len(reply.content)}"
    log = server.log()
    assert "closing a connection that does not read" in log
    assert await asyncio.to_thread(slow.read_until_closed) < 16 * 1024 * 1024
    slow.close()


async def _more_sessions_than(count: int) -> bool:
    return await ChatSession.objects.acount() > count
