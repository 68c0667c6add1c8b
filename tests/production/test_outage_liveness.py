"""After a PostgreSQL outage that stopped every process's heartbeat, nobody is judged dead for it (issue 26).

Three live Daphne processes share PostgreSQL through a TCP proxy (testkit/cut_link.py) and Redis. An outage
longer than the staleness window leaves every process's heartbeat row stale; the first process whose beat
gets through afterwards must not take that for death: the live processes keep their sessions (no
`resumed_elsewhere`, no `orphaned`, posts answered), while a process that really died meanwhile is still
swept. And a message whose turn was answered `storage_unavailable` during the outage is never answered later,
also when its session moves to another process.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.wait import async_wait_until
from tests.e2e.test_resume import post, resume, start
from tests.production import test_storage_outage
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_storage_outage import through

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

cut_link = test_storage_outage.cut_link  # a fixture: PostgreSQL through a proxy that the test cuts

#: The outage: four staleness windows (FAST_LIVENESS: 2 s), the retry window 1 s.
OUTAGE_SECONDS = 8


async def session_row(session_id: str) -> ChatSession:
    return await ChatSession.objects.aget(id=session_id)


async def wait_for(predicate, timeout: float = 20.0) -> None:
    assert await async_wait_until(predicate, timeout=timeout, interval=0.1), "timed out"


async def test_after_an_outage_live_processes_keep_their_sessions_and_a_dead_ones_are_swept(cut_link, daphne_factory):
    """PostgreSQL unreachable for 8 s (staleness 2 s); a third process is SIGKILLed during it. Once it is back,
    the dead process's plain session ends `orphaned` and its resumable one is released, within a few sweeps;
    the two live processes' sessions, plain and resumable, stay theirs: no frame arrives unasked, and each
    answers its next message."""
    env = through(cut_link, R2D2_STORAGE_RETRY_SECONDS="1", **FAST_LIVENESS)
    one, two, doomed = daphne_factory(**env), daphne_factory(**env), daphne_factory(**env)
    clients = [await ProtocolClient.connect(server.url) for server in (one, two, doomed)]
    live: list[tuple[ProtocolClient, str]] = []
    for client in clients[:2]:
        live.append((client, await client.start_session()))
        live.append((client, (await start(client))[0]))
    dead_plain = await clients[2].start_session()
    dead_resumable, _ = await start(clients[2])
    owners = {session_id: (await session_row(session_id)).owner_process for _, session_id in live}
    for _, session_id in live:  # each answers before the outage
        assert [f["type"] for f in await _post(live, session_id, "before")] == _ANSWERED

    loop = asyncio.get_running_loop()
    await cut_link.cut()
    restore_at = loop.time() + OUTAGE_SECONDS
    doomed.kill()
    await asyncio.sleep(restore_at - loop.time())
    await cut_link.restore()

    async def dead_swept() -> bool:
        plain, resumable = await session_row(dead_plain), await session_row(dead_resumable)
        return plain.end_reason == EndReason.ORPHANED and resumable.owner_process == ""

    await wait_for(dead_swept, timeout=15)  # within a staleness window and a few sweeps of the outage's end
    await asyncio.sleep(1.5)  # a few more sweeps and beats, for a mistaken one to be seen by its victim
    for client in clients[:2]:
        unasked = []  # no session_end (orphaned, resumed_elsewhere), nothing at all
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                unasked.append(await client.recv(timeout=0.2))
        assert unasked == []
    for _, session_id in live:
        frames = await _post(live, session_id, "after the outage")
        assert [f["type"] for f in frames] == _ANSWERED, frames
        assert frames[1]["data"] == "Echo: after the outage"
        row = await session_row(session_id)
        assert row.ended_at is None and row.owner_process == owners[session_id]
    for client in clients[:2]:
        await client.close()


_ANSWERED = ["processing_start", "message", "processing_end"]


async def _post(live: list[tuple[ProtocolClient, str]], session_id: str, text: str) -> list[dict]:
    [client] = [client for client, held in live if held == session_id]
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text})
    frames = await client.until("processing_end")
    return [{k: v for k, v in f.items() if k not in {"seq", "session_id"}} for f in frames]


async def test_a_message_failed_by_an_outage_is_not_answered_by_the_next_holder(cut_link, daphne_factory):
    """Only the first process loses PostgreSQL, for 4 s: a queued message whose turn could not start is answered
    `storage_unavailable` ("send it again"), and the other process, which could see the first stop beating,
    rightly releases its resumable session. Once the first is back, the failed message is saved `failed`
    though the session is no longer its to write; the client resumes on the other process, which answers
    the next message and never the failed one."""
    one = daphne_factory(**through(cut_link, R2D2_STORAGE_RETRY_SECONDS="1", **FAST_LIVENESS))
    two = daphne_factory(R2D2_STORAGE_RETRY_SECONDS="1", **FAST_LIVENESS)  # PostgreSQL directly
    client, watcher = await ProtocolClient.connect(one.url), await ProtocolClient.connect(two.url)
    session_id, token = await start(client)
    await post(client, session_id, "[[token_delay=0.05]] " + " ".join(f"w{n}" for n in range(200)))
    assert (await client.recv())["type"] == "processing_start"
    await post(client, session_id, "queued behind it")

    async def queued_saved() -> bool:
        return await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2

    await wait_for(queued_saved)
    await asyncio.sleep(2)  # the other process's beats have been steady for the staleness window
    loop = asyncio.get_running_loop()
    await cut_link.cut()
    restore_at = loop.time() + 4
    first = await client.until("processing_end", timeout=15)
    assert [f["data"]["code"] for f in first if f["type"] == "error"] == ["storage_unavailable"]
    second = await client.until("processing_end", timeout=15)
    assert [f["type"] for f in second] == ["processing_start", "error", "processing_end"], second
    assert second[1]["data"]["code"] == "storage_unavailable"

    async def released() -> bool:  # the other process saw the first stop beating, and could tell
        return (await session_row(session_id)).owner_process == ""

    await wait_for(released, timeout=10)
    await asyncio.sleep(max(0.0, restore_at - loop.time()))
    await cut_link.restore()

    async def marked_failed() -> bool:
        failed = await ChatMessage.objects.aget(session_id=session_id, content="queued behind it")
        return failed.status == MessageStatus.FAILED

    await async_wait_until(marked_failed, timeout=5, interval=0.1)  # asserted below, as the client would see it
    moved = await ProtocolClient.connect(two.url)
    assert (await resume(moved, session_id, token, second[-1]["seq"]))["type"] == "session_resumed"
    frames = await moved.post(session_id, "after the outage")
    assert [f["type"] for f in frames] == _ANSWERED, frames  # not the failed message's turn first
    assert frames[1]["data"] == "Echo: after the outage"
    failed = await ChatMessage.objects.aget(session_id=session_id, content="queued behind it")
    assert failed.status == MessageStatus.FAILED
    assert not await ChatMessage.objects.filter(reply_to=failed).aexists()
    for each in (client, watcher, moved):
        await each.close()


async def test_a_session_whose_socket_closed_during_an_outage_ends_once_the_database_is_back(cut_link, daphne_factory):
    """A plain session's socket closes while PostgreSQL is unreachable for longer than the retry window: its end
    (`disconnect`) is written once the database answers, not dropped. Its process lives, so no sweep would ever
    end it: it would stay live, held by nobody, and count against its principal's live sessions."""
    server = daphne_factory(**through(cut_link, R2D2_STORAGE_RETRY_SECONDS="1", **FAST_LIVENESS))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    await cut_link.cut()
    await client.close()
    await asyncio.sleep(4)  # past the retry window, and past Daphne's wait for the consumer to finish closing
    await cut_link.restore()

    async def ended() -> bool:
        return (await session_row(session_id)).end_reason == EndReason.DISCONNECT

    await wait_for(ended, timeout=15)
