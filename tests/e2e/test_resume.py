"""Resumable sessions on one live server (the embedded defaults, or PostgreSQL and Redis when set):
a conversation outlives its socket, and a client that reconnects gets exactly what it missed."""

from __future__ import annotations

import asyncio
import json

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.wait import async_wait_until

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"word{i}" for i in range(30)]
#: A streamed reply of 30 words, one every 0.1 s: long enough to be mid-stream when the socket drops.
SLOW = "[[token_delay=0.1 text=" + "_".join(WORDS) + "]] tell me a long story"
SLOW_REPLY = " ".join(WORDS)


async def start(client: ProtocolClient) -> tuple[str, str]:
    await client.send({"action": "chatbot_session_start", "resumable": True})
    frame = await client.recv()
    assert frame["type"] == "session_start" and set(frame["data"]) == {"session_id", "resume_token"}, frame
    return frame["data"]["session_id"], frame["data"]["resume_token"]


async def post(client: ProtocolClient, session_id: str, text: str, **fields) -> None:
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": text, "stream": True, **fields}
    )


async def resume(client: ProtocolClient, session_id: str, token: str, last_seq: int) -> dict:
    await client.send(
        {"action": "chatbot_session_resume", "session_id": session_id, "resume_token": token, "last_seq": last_seq}
    )
    return await client.recv()


def check_sequence(frames: list[dict], session_id: str, first: int = 1) -> None:
    """Every frame is about the session, and the seqs run first, first+1, … with no gap or duplicate."""
    assert [f["session_id"] for f in frames] == [session_id] * len(frames)
    assert [f["seq"] for f in frames] == list(range(first, first + len(frames))), [f["seq"] for f in frames]


async def reply_row(session_id: str) -> ChatMessage:
    return await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).alast()


async def wait_for(predicate, timeout: float = 15.0) -> None:
    assert await async_wait_until(predicate, timeout=timeout, interval=0.1), "timed out"


async def test_a_resumable_session_numbers_its_frames(daphne, fake_llm):
    client = await ProtocolClient.connect(daphne.url)
    session_id, token = await start(client)
    assert len(token) >= 40
    frames = await client.post(session_id, "hello", stream=True)
    assert [f["type"] for f in frames] == [
        "processing_start",
        "message_delta",
        "message_delta",
        "message",
        "processing_end",
    ]
    check_sequence(frames, session_id)
    assert frames[0] == {"type": "processing_start", "data": None, "session_id": session_id, "seq": 1}
    # The key order is part of the protocol: type, data, session_id, seq.
    assert list(json.loads(client.received[-1])) == ["type", "data", "session_id", "seq"]
    session = await ChatSession.objects.aget(id=session_id)
    assert session.resume_token_hash and token not in session.resume_token_hash
    assert token not in daphne.log()

    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    assert await client.recv() == {"type": "session_end", "data": None, "session_id": session_id, "seq": 6}
    await client.close()


async def test_socket_closed_mid_stream_then_resumed(daphne, fake_llm):
    """The deltas before and after the drop concatenate to exactly the final message, which the database holds."""
    client = await ProtocolClient.connect(daphne.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    before = [await client.recv() for _ in range(4)]  # processing_start and three deltas
    await client.connection.close()
    await asyncio.sleep(0.5)  # the reply goes on meanwhile

    client = await ProtocolClient.connect(daphne.url)
    resumed = await resume(client, session_id, token, before[-1]["seq"])
    assert resumed["type"] == "session_resumed" and resumed["data"]["session_id"] == session_id
    assert resumed["data"]["last_seq"] > before[-1]["seq"]
    after = await client.until("processing_end")
    frames = before + after
    check_sequence(frames, session_id)
    deltas = "".join(f["data"] for f in frames if f["type"] == "message_delta")
    [message] = [f["data"] for f in frames if f["type"] == "message"]
    assert deltas == message == SLOW_REPLY
    row = await reply_row(session_id)
    assert row.content == message and row.status == MessageStatus.COMPLETE

    # The session carries on where it was, its seqs too.
    frames = await client.post(session_id, "and then?")
    check_sequence(frames, session_id, first=after[-1]["seq"] + 1)
    assert frames[1]["data"] == "Echo: and then?"
    await client.close()


async def test_a_turn_that_finished_while_nobody_was_connected_is_replayed_whole(daphne, fake_llm):
    client = await ProtocolClient.connect(daphne.url)
    session_id, token = await start(client)
    await post(client, session_id, "[[token_delay=0.05]] quick one")
    await post(client, session_id, "queued behind it")
    assert (await client.recv())["type"] == "processing_start"
    await client.connection.close()

    async def both_answered() -> bool:
        return await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).acount() == 2

    await wait_for(both_answered)
    # Each reply is saved before its frames are sent: the last processing_end follows its save by a moment,
    # which nothing outside the server can see (a resume now could come before it).
    await asyncio.sleep(0.2)
    client = await ProtocolClient.connect(daphne.url)
    resumed = await resume(client, session_id, token, 0)
    assert resumed["data"]["last_seq"] >= 6
    frames = [await client.recv() for _ in range(resumed["data"]["last_seq"])]
    check_sequence(frames, session_id)
    assert [f["data"] for f in frames if f["type"] == "message"] == ["Echo: quick one", "Echo: queued behind it"]
    assert [f["type"] for f in frames].count("processing_end") == 2
    await client.close()


async def test_unresumed_past_the_window_the_session_is_abandoned(daphne_factory, fake_llm):
    server = daphne_factory(R2D2_RESUME_WINDOW_SECONDS="1")
    client = await ProtocolClient.connect(server.url)
    session_id, token = await start(client)
    await client.close()
    assert (await ChatSession.objects.aget(id=session_id)).ended_at is None  # not ended by the close

    async def abandoned() -> bool:
        return (await ChatSession.objects.aget(id=session_id)).end_reason == EndReason.ABANDONED

    await wait_for(abandoned, timeout=10)
    client = await ProtocolClient.connect(server.url)
    refused = await resume(client, session_id, token, 0)
    assert refused["type"] == "error" and refused["data"]["code"] == "session_ended"
    await client.close()


async def test_refusals(daphne, fake_llm):
    client = await ProtocolClient.connect(daphne.url)
    session_id, token = await start(client)
    plain = await client.start_session()
    other = await ProtocolClient.connect(daphne.url)
    for session, guess, code in [
        (session_id, token[:-1] + ("A" if token[-1] != "A" else "B"), "resume_token_invalid"),
        (session_id, "", "resume_token_invalid"),
        (plain, token, "resume_token_invalid"),  # not resumable: no token resumes it
        ("00000000-0000-4000-8000-000000000000", token, "session_not_found"),
    ]:
        refused = await resume(other, session, guess, 0)
        assert refused == {"type": "error", "data": {"code": code, "message": refused["data"]["message"]}}, refused
    refused = await resume(other, session_id, token, 99)
    assert refused["data"]["code"] == "resume_unavailable"
    await other.send(
        {"action": "chatbot_session_resume", "session_id": session_id, "resume_token": token, "last_seq": "x"}
    )
    assert (await other.recv())["data"]["code"] == "invalid_field_type"
    # None of that disturbed the session or its socket.
    frames = await client.post(session_id, "still mine")
    check_sequence(frames, session_id)
    assert token not in daphne.log()
    await client.close()
    await other.close()


async def test_the_old_socket_still_open_gets_resumed_elsewhere(daphne, fake_llm):
    old = await ProtocolClient.connect(daphne.url)
    session_id, token = await start(old)
    await post(old, session_id, SLOW)
    seen = [await old.recv() for _ in range(3)]

    new = await ProtocolClient.connect(daphne.url)
    resumed = await resume(new, session_id, token, seen[-1]["seq"])
    assert resumed["type"] == "session_resumed"
    rest = await new.until("processing_end")
    check_sequence(seen + rest, session_id)

    # The old socket saw a few more deltas perhaps, then resumed_elsewhere, then nothing about the session.
    frames = await old.until("session_end")
    assert frames[-1] == {"type": "session_end", "data": {"session_id": session_id, "reason": "resumed_elsewhere"}}
    with pytest.raises(asyncio.TimeoutError):
        await old.recv(timeout=0.5)
    await old.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "mine?"})
    assert (await old.recv())["data"]["code"] == "session_not_owned"
    await old.close()  # closing the old socket does not end or detach the session
    frames = await new.post(session_id, "still here")
    assert frames[1]["data"] == "Echo: still here"
    assert (await ChatSession.objects.aget(id=session_id)).ended_at is None
    await new.close()
