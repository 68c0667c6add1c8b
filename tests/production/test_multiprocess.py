"""Several live Daphne processes sharing this machine's Redis and PostgreSQL.

What a user of the admin or an operator notices: a session held by one process
can be ended from anywhere, cannot be used from another process, and a process
that dies does not leave sessions that look open forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
from asgiref.sync import sync_to_async

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role, ServerProcess
from testkit.client import ProtocolClient
from testkit.wait import async_wait_until
from tests.production.conftest import FAST_LIVENESS, http_get

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

#: A reply of 40 words, one every 0.1 s: long enough to be mid-stream when something happens.
SLOW = "[[token_delay=0.1 text=" + "_".join(f"word{i}" for i in range(40)) + "]] tell me a long story"


async def start_streaming(client: ProtocolClient, session_id: str) -> None:
    """Post a slow message and return once the first token has arrived (the model is mid-stream)."""
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"
    assert (await client.recv())["type"] == "message_delta"


async def session(session_id: str) -> ChatSession:
    return await ChatSession.objects.aget(id=session_id)


async def wait_for_end(session_id: str, timeout: float = 10.0) -> ChatSession:
    async def ended() -> bool:
        return (await session(session_id)).ended_at is not None

    await async_wait_until(ended, timeout=timeout, interval=0.1)
    return await session(session_id)


async def test_operator_ends_a_session_held_by_another_process(daphne_factory, fake_llm, manage):
    """`manage.py end_session` (its own process) reaches the process holding the session through Redis:
    the generation stops, the client gets `session_end` with reason `operator`; the other process's
    session is untouched, and neither process lets a connection use the other's session."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client_a = await ProtocolClient.connect(server_a.url)
    client_b = await ProtocolClient.connect(server_b.url)
    session_a = await client_a.start_session()
    session_b = await client_b.start_session()

    # Ownership across processes: B cannot post to, cancel or end A's session (and vice versa).
    for action in ("chatbot_post_message", "chatbot_session_end", "chatbot_cancel"):
        await client_b.send({"action": action, "session_id": session_a, "user_message": "hijack"})
        reply = await client_b.recv()
        assert reply["type"] == "error" and reply["data"]["code"] == "session_not_owned", (action, reply)
    await client_a.send({"action": "chatbot_post_message", "session_id": session_b, "user_message": "hijack"})
    assert (await client_a.recv())["data"]["code"] == "session_not_owned"

    await start_streaming(client_a, session_a)
    result = await sync_to_async(manage)("end_session", session_a)
    assert result.returncode == 0, result.stderr
    assert "its client was told" in result.stdout

    frames = await client_a.until("session_end")
    assert frames[-1] == {"type": "session_end", "data": {"session_id": session_a, "reason": "operator"}}
    assert "message" not in [f["type"] for f in frames], "the generation must stop, not finish"
    assert fake_llm.wait_for(lambda f: f.disconnects >= 1), "the upstream stream was not closed"

    ended = await session(session_a)
    assert ended.end_reason == EndReason.OPERATOR
    partial = await ChatMessage.objects.filter(session_id=session_a, role=Role.ASSISTANT).aget()
    assert partial.status == MessageStatus.CANCELLED and partial.content.startswith("word0")

    # The ended session is refused; B's session carries on.
    await client_a.send({"action": "chatbot_post_message", "session_id": session_a, "user_message": "again"})
    assert (await client_a.recv())["data"]["code"] == "session_ended"
    frames = await client_b.post(session_b, "still here?")
    assert {"type": "message", "data": "Echo: still here?"} in frames
    assert (await session(session_b)).ended_at is None
    await client_a.close()
    await client_b.close()


async def test_end_session_command_when_the_holding_process_is_gone(daphne_factory, fake_llm, manage):
    """If the process holding the session was killed, the operator's command ends it in the database."""
    server = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    server.kill()

    result = await sync_to_async(manage)("end_session", session_id, R2D2_PROCESS_STALE_SECONDS="0.5")
    assert result.returncode == 0, result.stderr
    assert "is gone" in result.stderr and "ended in the database" in result.stdout
    assert (await session(session_id)).end_reason == EndReason.OPERATOR

    again = await sync_to_async(manage)("end_session", session_id)
    assert again.returncode == 0 and "already ended" in again.stdout
    unknown = await sync_to_async(manage)("end_session", str(uuid.uuid4()))
    assert unknown.returncode != 0 and "No session has id" in unknown.stderr


async def test_killed_process_sessions_are_orphaned_by_a_live_process(daphne_factory, fake_llm):
    """SIGKILL mid-generation: the dead process's sessions look open only until its heartbeat goes stale,
    then the surviving process's sweep ends them as `orphaned`; the survivor's own sessions stay live."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client_a = await ProtocolClient.connect(server_a.url)
    client_b = await ProtocolClient.connect(server_b.url)
    session_a = await client_a.start_session()
    session_b = await client_b.start_session()
    await start_streaming(client_a, session_a)

    server_a.kill()
    # Just killed: its heartbeat is still fresh, so nobody may judge it gone yet.
    assert (await session(session_a)).ended_at is None

    ended = await wait_for_end(session_a)
    assert ended.end_reason == EndReason.ORPHANED
    assert (await session(session_b)).ended_at is None
    frames = await client_b.post(session_b, "are you there?")
    assert {"type": "message", "data": "Echo: are you there?"} in frames
    assert (await session(session_b)).ended_at is None
    await client_b.close()


async def test_orphans_are_ended_by_the_command_and_at_start_up(daphne_factory, fake_llm, manage):
    """With no live process left, `manage.py end_orphaned_sessions` ends a killed process's sessions once
    it is stale (not before), and a newly started process sweeps at start-up (its first request)."""
    first = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(first.url)
    streaming, idle = await client.start_session(), await client.start_session()
    await start_streaming(client, streaming)
    first.kill()

    early = await sync_to_async(manage)("end_orphaned_sessions", "--stale-after", "2")
    assert early.returncode == 0 and "Ended 0 orphaned session(s)." in early.stdout
    await asyncio.sleep(2.5)  # the behaviour under test: the dead process's heartbeat passes the 2 s staleness
    dry = await sync_to_async(manage)("end_orphaned_sessions", "--stale-after", "2", "--dry-run")
    assert streaming in dry.stdout and idle in dry.stdout and "2 orphaned session(s) would be ended." in dry.stdout
    late = await sync_to_async(manage)("end_orphaned_sessions", "--stale-after", "2")
    assert "Ended 2 orphaned session(s)." in late.stdout
    assert {(await session(s)).end_reason for s in (streaming, idle)} == {EndReason.ORPHANED}

    # Start-up: a second victim, then a fresh process whose first request (the health check) sweeps.
    second = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(second.url)
    victim = await client.start_session()
    second.kill()
    await asyncio.sleep(2.5)  # stale now (2 s), and still not ended: only a sweep ends it
    assert (await session(victim)).ended_at is None
    third = daphne_factory(**{**FAST_LIVENESS, "R2D2_ORPHAN_SWEEP_SECONDS": "3600"})  # only the start-up sweep
    assert (await sync_to_async(http_get)(third.port, "/healthz")).status == 200
    assert (await wait_for_end(victim, timeout=5)).end_reason == EndReason.ORPHANED
    assert await ServerProcess.objects.alive(stale_after=2).acount() == 1


async def test_a_frozen_process_learns_its_sessions_were_orphaned(daphne_factory, fake_llm):
    """A process frozen (SIGSTOP: a paused VM, a long stall) past the staleness window has its sessions
    ended as orphaned by the other process; when it resumes it tells their clients so, and the session
    cannot be used, instead of carrying on with a conversation the database says is over."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client_a = await ProtocolClient.connect(server_a.url)
    session_a = await client_a.start_session()
    assert (await sync_to_async(http_get)(server_b.port, "/healthz")).status == 200  # B beats and sweeps

    os.kill(server_a.process.pid, signal.SIGSTOP)
    try:
        assert (await wait_for_end(session_a)).end_reason == EndReason.ORPHANED
    finally:
        os.kill(server_a.process.pid, signal.SIGCONT)

    assert await client_a.recv() == {"type": "session_end", "data": {"session_id": session_a, "reason": "orphaned"}}
    await client_a.send({"action": "chatbot_post_message", "session_id": session_a, "user_message": "still there?"})
    assert (await client_a.recv())["data"]["code"] == "session_ended"
    fresh = await client_a.start_session()
    assert {"type": "message", "data": "Echo: back"} in await client_a.post(fresh, "back")
    await client_a.close()
