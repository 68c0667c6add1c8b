"""Resumable sessions across two live Daphne processes on PostgreSQL and Redis: a client whose socket
drops resumes on the other process and gets exactly what it missed, whatever became of the first."""

from __future__ import annotations

import asyncio
import shutil
import signal

import pytest
import websockets

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.wait import async_wait_until
from tests.e2e.test_resume import SLOW, SLOW_REPLY, check_sequence, post, reply_row, resume, start, wait_for
from tests.production.conftest import FAST_LIVENESS, http_get
from tests.production.test_redis_restart import private_redis  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


def deltas_and_message(frames: list[dict]) -> tuple[str, str]:
    [message] = [f["data"] for f in frames if f["type"] == "message"]
    return "".join(f["data"] for f in frames if f["type"] == "message_delta"), message


async def owner(session_id: str) -> str:
    return (await ChatSession.objects.aget(id=session_id)).owner_process


async def test_closed_mid_stream_and_resumed_on_the_other_process(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    holder_a = await owner(session_id)
    await post(client, session_id, SLOW)
    before = [await client.recv() for _ in range(4)]
    await client.connection.close()

    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, before[-1]["seq"])
    assert resumed["type"] == "session_resumed"
    after = await client.until("processing_end")
    frames = before + after
    check_sequence(frames, session_id)
    deltas, message = deltas_and_message(frames)
    assert deltas == message == SLOW_REPLY
    row = await reply_row(session_id)
    assert row.content == message and row.status == MessageStatus.COMPLETE

    # B holds it now: the next turn is answered there, remembers the first, and the seqs go on.
    async def taken_over() -> bool:
        return await owner(session_id) not in {"", holder_a}

    await wait_for(taken_over)
    frames = await client.post(session_id, "what did I ask?")
    check_sequence(frames, session_id, first=after[-1]["seq"] + 1)
    assert fake_llm.requests[-1].messages[-2]["content"] == SLOW_REPLY  # the history came from the database
    await client.close()


async def test_the_old_socket_on_the_other_process_gets_resumed_elsewhere(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    old = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(old)
    await post(old, session_id, SLOW)
    seen = [await old.recv() for _ in range(3)]

    new = await ProtocolClient.connect(server_b.url)
    assert (await resume(new, session_id, token, seen[-1]["seq"]))["type"] == "session_resumed"
    frames = await old.until("session_end")
    assert frames[-1] == {"type": "session_end", "data": {"session_id": session_id, "reason": "resumed_elsewhere"}}
    with pytest.raises(asyncio.TimeoutError):
        await old.recv(timeout=0.5)
    rest = await new.until("processing_end")
    all_frames = seen + [f for f in frames if "seq" in f]
    # The old socket may have seen a few more frames before it was told; the new one gets everything after seen.
    check_sequence(seen + rest, session_id)
    assert [f["seq"] for f in all_frames] == list(range(1, len(all_frames) + 1))
    deltas, message = deltas_and_message(seen + rest)
    assert deltas == message == SLOW_REPLY
    await old.close()
    await new.close()


async def test_holder_killed_mid_turn_the_resumed_client_gets_turn_interrupted(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    frames = [await client.recv() for _ in range(15)]  # past the first checkpoint (1 s)
    server_a.kill()
    with pytest.raises(Exception):  # noqa: B017 (the socket is gone, whichever way websockets says it)
        while True:
            frames.append(await client.recv(timeout=5))

    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, frames[-1]["seq"])
    assert resumed["type"] == "session_resumed"
    rest = await client.until("processing_end", timeout=20)
    assert [f["type"] for f in rest] == ["error", "processing_end"]
    assert rest[0]["data"]["code"] == "turn_interrupted"
    check_sequence(frames + rest, session_id)
    row = await reply_row(session_id)
    assert row.status == MessageStatus.INTERRUPTED and SLOW_REPLY.startswith(row.content) and row.content

    # The session lives on, on B.
    frames = await client.post(session_id, "again")
    assert frames[1]["data"] == "Echo: again"
    assert await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2
    assert (await ChatSession.objects.aget(id=session_id)).ended_at is None
    await client.close()


async def test_sigterm_mid_turn_drains_and_the_client_resumes_elsewhere(daphne_factory, fake_llm):
    """A deploy: the process finishes the turn in progress and the one queued behind it, refuses new
    ones, closes the socket with 1012; the client resumes on the other process with nothing lost."""
    server_a = daphne_factory(**FAST_LIVENESS, R2D2_DRAIN_SECONDS="20")
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    await post(client, session_id, "queued one")
    frames = [await client.recv() for _ in range(3)]
    server_a.process.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        return (await asyncio.to_thread(http_get, server_a.port, "/healthz")).status == 503

    assert await async_wait_until(draining, timeout=10)
    await post(client, session_id, "too late")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frames.append(await client.recv(timeout=25))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, repr(closed.value)
    refusals = [f for f in frames if "seq" not in f]
    assert [f["data"]["code"] for f in refusals] == ["server_draining"]
    frames = [f for f in frames if "seq" in f]
    check_sequence(frames, session_id)
    assert [f["data"] for f in frames if f["type"] == "message"] == [SLOW_REPLY, "Echo: queued one"]
    assert server_a.process.wait(10) is not None  # and then the process exits

    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, frames[-1]["seq"])
    assert resumed["data"] == {"session_id": session_id, "last_seq": frames[-1]["seq"]}
    more = await client.post(session_id, "on the new process")
    check_sequence(frames + more, session_id)
    assert more[1]["data"] == "Echo: on the new process"
    assert await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).acount() == 3
    await client.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
async def test_redis_restarted_inside_the_window(daphne_factory, fake_llm, private_redis):  # noqa: F811
    """Redis goes away and comes back empty while a resumable session is detached: the process
    holding it still replays every frame from its own memory."""
    server = daphne_factory(REDIS_URL=private_redis.url)
    client = await ProtocolClient.connect(server.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    before = [await client.recv() for _ in range(3)]
    await client.connection.close()
    private_redis.stop()
    await asyncio.sleep(1.0)  # the behaviour under test: an outage, with the turn going on meanwhile
    private_redis.start()

    client = await ProtocolClient.connect(server.url)
    assert (await resume(client, session_id, token, before[-1]["seq"]))["type"] == "session_resumed"
    after = await client.until("processing_end")
    check_sequence(before + after, session_id)
    deltas, message = deltas_and_message(before + after)
    assert deltas == message == SLOW_REPLY
    frames = await client.post(session_id, "after the restart")
    check_sequence(frames, session_id, first=after[-1]["seq"] + 1)
    await client.close()
