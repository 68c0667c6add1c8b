"""The load test, shortened: many concurrent sessions over real sockets, nothing lost, nothing extra.

Correctness only (no timings): every turn gets exactly one processing_start,
one message (after its deltas when streamed) and one processing_end; the
database then holds exactly one user and one assistant row per turn, in order;
no error frame. The full-size run (1,000 sessions x 5 turns, faults) is
`bench/load.py`.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from channels.layers import get_channel_layer

from chat.models import ChatMessage, ChatSession, EndReason
from chat.sessions.lifecycle import request_end
from testkit.client import ProtocolClient
from testkit.wait import async_wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SESSIONS = 100
TURNS = 3


async def converse(url: str, index: int, stream: bool) -> tuple[ProtocolClient, str, list[tuple[str, str]]]:
    client = await ProtocolClient.connect(url, compression=None, ping_interval=None, open_timeout=30)
    session_id = await client.start_session()
    said: list[tuple[str, str]] = []
    for turn in range(TURNS):
        text = f"load s{index} t{turn} {uuid.uuid4().hex[:6]}"
        frames = await client.post(session_id, text, **({"stream": True} if stream else {}))
        types = [f["type"] for f in frames]
        deltas = [f["data"] for f in frames if f["type"] == "message_delta"]
        middle = ["message_delta"] * len(deltas) + ["message"]
        assert types == ["processing_start", *middle, "processing_end"], types
        reply = frames[-2]["data"]
        assert reply == f"Echo: {text}"
        assert ("".join(deltas) == reply) if stream else not deltas
        said += [("user", text), ("assistant", reply)]
    return client, session_id, said


async def open_all(url: str) -> list[tuple[ProtocolClient, str, list[tuple[str, str]]]]:
    return await asyncio.gather(*(converse(url, i, stream=i % 2 == 0) for i in range(SESSIONS)))


async def test_concurrent_sessions_exact_frames_and_rows(daphne_factory):
    server = daphne_factory(R2D2_RATE_LIMIT_PER_MINUTE="0", R2D2_MAX_CONNECTIONS_PER_ADDRESS="0")
    results = await open_all(server.url)
    for client, _, _ in results:
        assert not any(json.loads(text)["type"] == "error" for text in client.received)
    await asyncio.gather(*(client.close() for client, _, _ in results))

    for _, session_id, said in results:
        rows = [(m.role, m.content) async for m in ChatMessage.objects.filter(session_id=session_id)]
        assert rows == said
    assert await ChatMessage.objects.acount() == SESSIONS * TURNS * 2

    async def all_ended() -> bool:
        return await ChatSession.objects.filter(end_reason=EndReason.DISCONNECT).acount() == SESSIONS

    assert await async_wait_until(all_ended, timeout=10)


@pytest.mark.redis
async def test_operator_burst_reaches_every_session(daphne_factory):
    """An operator end sent to every session at once arrives at every one: channels-redis drops
    what exceeds a process inbox's capacity without a word, so R2D2_CHANNEL_CAPACITY must hold it."""
    server = daphne_factory(R2D2_RATE_LIMIT_PER_MINUTE="0", R2D2_MAX_CONNECTIONS_PER_ADDRESS="0")
    results = await open_all(server.url)
    assert get_channel_layer().capacity >= SESSIONS
    await asyncio.gather(*(request_end(session_id) for _, session_id, _ in results))
    for client, session_id, _ in results:
        frame = await client.recv(timeout=30)
        assert frame == {"type": "session_end", "data": {"session_id": session_id, "reason": "operator"}}
    await asyncio.gather(*(client.close() for client, _, _ in results))
    assert await ChatSession.objects.filter(end_reason=EndReason.OPERATOR).acount() == SESSIONS
