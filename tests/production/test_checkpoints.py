"""What a person read is in the database: a streamed reply is saved while it streams, and survives
the process being killed (marked interrupted by the orphan sweep)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from chat.models import ChatMessage, EndReason, MessageStatus, Role
from chat.sessions import lifecycle
from testkit.client import ProtocolClient
from testkit.fake_llm import Script
from tests.production.conftest import FAST_LIVENESS

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"word{i} " for i in range(60)]


async def test_a_streamed_reply_is_checkpointed_and_kept_after_sigkill(daphne_factory, fake_llm):
    server = daphne_factory(**FAST_LIVENESS)
    fake_llm.enqueue(Script(chunks=WORDS, token_delay=0.1))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go", "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"

    seen: list[tuple[float, str]] = []  # (when, everything shown so far)
    loop = asyncio.get_running_loop()
    shown = ""
    while loop.time() - (seen[0][0] if seen else loop.time()) < 2.5:
        frame = await client.recv()
        assert frame["type"] == "message_delta"
        shown += frame["data"]
        seen.append((loop.time(), shown))

    row = await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).afirst()
    assert row is not None and row.status == MessageStatus.INCOMPLETE
    assert shown.startswith(row.content)
    # At most about a second behind what the client had been shown.
    a_second_ago = max(text for when, text in seen if when <= seen[-1][0] - 1.3)
    assert len(row.content) >= len(a_second_ago)

    server.kill()
    await asyncio.sleep(1.0)  # the behaviour under test: its heartbeat grows older than the 0.5 s staleness below
    ended = await sync_to_async(lifecycle.end_orphaned)(stale_after=0.5)
    assert ended == 1
    row = await ChatMessage.objects.aget(id=row.id)
    assert row.status == MessageStatus.INTERRUPTED
    assert shown.startswith(row.content) and len(row.content) >= len(a_second_ago)
    session = await lifecycle.get(row.session_id)
    assert session.end_reason == EndReason.ORPHANED


async def test_a_reply_cut_midway_keeps_what_was_checkpointed_as_interrupted(daphne, fake_llm):
    fake_llm.enqueue(Script(chunks=WORDS[:30], token_delay=0.1, cut_after=25))
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "go", stream=True)
    assert frames[-2]["data"]["code"] == "upstream_stream_interrupted"
    shown = "".join(f["data"] for f in frames if f["type"] == "message_delta")
    row = await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).afirst()
    assert row.status == MessageStatus.INTERRUPTED and shown.startswith(row.content) and row.content
    frames = await client.post(session_id, "next")
    assert {"type": "message", "data": "Echo: next"} in frames
    await client.close()
