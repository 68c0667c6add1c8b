"""One session model (issue 19) across two live Daphne processes on PostgreSQL and Redis: exactly one
holder, fenced; the database as the truth of each turn; resume input; the gauges."""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.request

import pytest
import websockets

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.turns import messages
from chat.turns.messages import Fenced, Lease
from testkit.client import ProtocolClient
from tests.e2e.test_resume import SLOW, post, resume, start, wait_for
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_redis_restart import private_redis  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


async def frames_until_quiet(client: ProtocolClient, quiet: float = 1.5) -> list[dict]:
    """Every frame until none comes for `quiet` seconds (or the socket closes)."""
    frames = []
    try:
        while True:
            frames.append(await client.recv(timeout=quiet))
    except (TimeoutError, websockets.ConnectionClosed):
        return frames


def gauge(server, name: str) -> float:
    body = urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5).read().decode()
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.M)]
    return sum(values)


async def test_two_resumes_at_once_exactly_one_holds_the_session(daphne_factory, fake_llm):
    """Two resumes of one session at the same moment, one on each process: one client holds it after,
    the other was refused or told `resumed_elsewhere`; seqs go on without a duplicate, and closing the
    loser's socket does not end the session."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    first = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(first)
    frames = await first.post(session_id, "hello")
    last = frames[-1]["seq"]
    await first.close()

    clients = [await ProtocolClient.connect(server_a.url), await ProtocolClient.connect(server_b.url)]
    answers = await asyncio.gather(*(resume(c, session_id, token, last) for c in clients))
    later = await asyncio.gather(*(frames_until_quiet(c) for c in clients))
    holders = []
    for client, answer, rest in zip(clients, answers, later, strict=True):
        kinds = [answer["type"]] + [f["type"] for f in rest]
        assert kinds.count("session_resumed") + kinds.count("error") == 1, kinds  # exactly one answer
        lost = any(f["type"] == "session_end" and f["data"].get("reason") == "resumed_elsewhere" for f in rest)
        if answer["type"] == "session_resumed" and not lost:
            holders.append(client)
        elif answer["type"] == "error":
            assert answer["data"]["code"] == "resume_unavailable", answer
    assert len(holders) == 1, (answers, later)
    [winner] = holders
    loser = clients[1 - clients.index(winner)]
    await loser.close()

    frames = await winner.post(session_id, "still here?")
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(last + 1, last + 1 + len(frames))), seqs
    assert frames[1]["data"] == "Echo: still here?"
    assert (await ChatSession.objects.aget(id=session_id)).ended_at is None
    await winner.close()


async def test_two_resumes_at_once_on_one_process(daphne_factory, fake_llm):
    server = daphne_factory(**FAST_LIVENESS)
    first = await ProtocolClient.connect(server.url)
    session_id, token = await start(first)
    last = (await first.post(session_id, "hello"))[-1]["seq"]
    await first.close()
    clients = [await ProtocolClient.connect(server.url) for _ in range(3)]
    await asyncio.gather(*(resume(c, session_id, token, last) for c in clients))
    later = await asyncio.gather(*(frames_until_quiet(c, 1.0) for c in clients))
    still_holding = [
        c for c, rest in zip(clients, later, strict=True) if not any(f["type"] == "session_end" for f in rest)
    ]
    assert len(still_holding) == 1
    for client in clients:
        if client is not still_holding[0]:
            await client.close()
    frames = await still_holding[0].post(session_id, "one holder")
    assert [f["seq"] for f in frames] == list(range(last + 1, last + 1 + len(frames)))
    await still_holding[0].close()
    await wait_for(lambda: _gauge_is(server, "r2d2_live_sessions", 1.0))


async def _gauge_is(server, name: str, value: float) -> bool:
    return await asyncio.to_thread(gauge, server, name) == value


async def test_a_fenced_holder_writes_nothing_and_tells_its_client(daphne_factory, fake_llm):
    """Another process took the session over (the fence grew) while this holder still thinks it holds it:
    its next write is refused, no row is written, and its client is told `resumed_elsewhere`."""
    server = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server.url)
    session_id, _ = await start(client)
    await client.post(session_id, "first")
    session = await ChatSession.objects.aget(id=session_id)
    await ChatSession.objects.filter(id=session_id).aupdate(fence=session.fence + 1)  # a take-over elsewhere

    await post(client, session_id, "written by nobody")
    frames = await frames_until_quiet(client)
    ends = [f for f in frames if f["type"] == "session_end"]
    assert ends and ends[-1]["data"] == {"session_id": session_id, "reason": "resumed_elsewhere"}, frames
    assert not await ChatMessage.objects.filter(session_id=session_id, content="written by nobody").aexists()
    await client.close()


NO_USAGE = {"prompt_tokens": None, "completion_tokens": None, "latency_ms": None}


async def test_every_write_is_conditioned_on_the_fence():
    """Without a socket: each turn write with a stale fence raises Fenced and changes nothing."""
    session = await ChatSession.objects.acreate(model="m", owner_process="p", fence=3)
    stale, current = Lease(session.id, 2), Lease(session.id, 3)
    with pytest.raises(Fenced):
        await messages.save_user_message(stale, content="x", system_message=None)
    user_row = await messages.save_user_message(current, content="y", system_message=None)
    with pytest.raises(Fenced):
        await messages.save_reply(
            stale,
            reply_to=user_row,
            content="z",
            model="m",
            prompt_tokens=None,
            completion_tokens=None,
            latency_ms=None,
        )
    reply = await messages.save_reply(
        current, reply_to=user_row, content="z", model="m", prompt_tokens=None, completion_tokens=None, latency_ms=None
    )
    with pytest.raises(Fenced):
        await messages.extend_reply(
            stale,
            row_id=reply,
            saved=1,
            more="!",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1,
            status=MessageStatus.COMPLETE,
        )
    with pytest.raises(Fenced):
        await messages.set_status(stale, user_row, MessageStatus.FAILED)
    rows = [(r.role, r.content, r.status) async for r in ChatMessage.objects.filter(session=session).order_by("id")]
    assert rows == [(Role.USER, "y", MessageStatus.ACCEPTED), (Role.ASSISTANT, "z", MessageStatus.COMPLETE)]


async def test_messages_queued_on_a_killed_holder_are_answered_by_the_new_one(daphne_factory, fake_llm):
    """The holder dies mid-turn, before the reply's first save, with two messages queued: the client
    resumes elsewhere, the turn it saw start ends for it (turn_interrupted, processing_end; its message
    is marked interrupted, not answered twice), and the queued messages are answered there, in order,
    streamed as they were asked."""
    server_a = daphne_factory(**FAST_LIVENESS, R2D2_CHECKPOINT_SECONDS="60")
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    await post(client, session_id, "queued one")
    await post(client, session_id, "queued two")
    frames = [await client.recv() for _ in range(5)]
    server_a.kill()
    frames += await frames_until_quiet(client, 3)

    client = await ProtocolClient.connect(server_b.url)
    assert (await resume(client, session_id, token, frames[-1]["seq"]))["type"] == "session_resumed"
    rest = await client.until("processing_end", timeout=20)
    assert [f["type"] for f in rest][-2:] == ["error", "processing_end"]
    assert rest[-2]["data"]["code"] == "turn_interrupted"
    answers = []
    for _ in range(2):
        turn = await client.until("processing_end", timeout=20)
        rest += turn
        assert "message_delta" in [f["type"] for f in turn]  # post() asked for a stream
        answers += [f["data"] for f in turn if f["type"] == "message"]
    assert answers == ["Echo: queued one", "Echo: queued two"]
    assert await frames_until_quiet(client, 1.5) == []  # the interrupted one is not answered again
    seqs = [f["seq"] for f in frames + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert await messages.unanswered(session_id) == []
    interrupted = await ChatMessage.objects.aget(session_id=session_id, content=SLOW)
    assert interrupted.status == MessageStatus.INTERRUPTED
    await client.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
async def test_holder_killed_and_redis_restarted_the_resume_is_refused_not_silent(
    daphne_factory,
    fake_llm,
    private_redis,  # noqa: F811
):
    """The frames after last_seq are gone with Redis and the holder with its memory: the resume is refused
    (`resume_unavailable`) instead of accepted with a turn that never ends; the transcript stays readable."""
    server_a = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    frames = [await client.recv() for _ in range(4)]
    server_a.kill()
    private_redis.stop()
    await asyncio.sleep(0.5)  # the behaviour under test: Redis restarts (and forgets) while A is dead
    private_redis.start()

    client = await ProtocolClient.connect(server_b.url)
    answer = await resume(client, session_id, token, frames[-1]["seq"])
    assert answer["type"] == "error" and answer["data"]["code"] == "resume_unavailable", answer
    assert await frames_until_quiet(client, 1.0) == []  # exactly one answer
    assert await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).aexists()
    await client.close()


async def test_resume_input(daphne_factory, fake_llm):
    """A last_seq above the last seq produced is refused on either process; nonsense is a documented error."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    last = (await client.post(session_id, "hello"))[-1]["seq"]
    await client.close()
    for server in (server_b, server_a):
        client = await ProtocolClient.connect(server.url)
        answer = await resume(client, session_id, token, last + 5)
        assert answer["type"] == "error" and answer["data"]["code"] == "resume_unavailable", answer
        for nonsense in (-1, 2**64, 1.5, "3", True):
            answer = await resume(client, session_id, token, nonsense)
            assert answer["type"] == "error" and answer["data"]["code"] == "invalid_field_type", (nonsense, answer)
        # The honest client still resumes.
        assert (await resume(client, session_id, token, last))["type"] == "session_resumed"
        await client.close()


async def test_gauges_return_to_zero(daphne_factory, fake_llm):
    """Sockets and sessions of every kind, resumed across processes, all closed: both gauges read 0, never below."""
    servers = [daphne_factory(**FAST_LIVENESS, R2D2_RESUME_WINDOW_SECONDS="1") for _ in range(2)]
    clients = [await ProtocolClient.connect(s.url) for s in servers for _ in range(2)]
    plain = [await c.start_session() for c in clients]
    session_id, token = await start(clients[0])
    last = (await clients[0].post(session_id, "hi"))[-1]["seq"]
    other = await ProtocolClient.connect(servers[1].url)
    assert (await resume(other, session_id, token, last))["type"] == "session_resumed"
    await clients[1].send({"action": "chatbot_session_end", "session_id": plain[1]})
    for client in [*clients, other]:
        await client.close()
    for server in servers:
        await wait_for(lambda server=server: _gauge_is(server, "r2d2_open_sockets", 0.0))
        await wait_for(lambda server=server: _gauge_is(server, "r2d2_live_sessions", 0.0), timeout=20)


async def test_a_socket_daphne_kills_while_a_take_over_waits_is_uncounted(daphne_factory, fake_llm):
    """The client gives up while its resume waits for the other process to finish a long turn: Daphne
    cancels the consumer after its close timeout (disconnect() never runs), and the gauges still
    come back to 0 on both processes."""
    server_a, server_b = daphne_factory(**FAST_LIVENESS), daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, "[[token_delay=0.6 text=" + "_".join(["w"] * 40) + "]] long")
    first = await client.recv()
    await client.connection.close()

    client = await ProtocolClient.connect(server_b.url)
    assert (await resume(client, session_id, token, first["seq"]))["type"] == "session_resumed"
    await wait_for(lambda: _gauge_is(server_b, "r2d2_open_sockets", 1.0))
    await client.connection.close()  # while B's consumer is still busy taking the session over
    await wait_for(lambda: _gauge_is(server_b, "r2d2_open_sockets", 0.0), timeout=20)
    await wait_for(lambda: _gauge_is(server_b, "r2d2_live_sessions", 0.0), timeout=40)
    await wait_for(lambda: _gauge_is(server_a, "r2d2_live_sessions", 0.0), timeout=40)
    assert (await ChatSession.objects.aget(id=session_id)).ended_at is None  # released: still resumable
