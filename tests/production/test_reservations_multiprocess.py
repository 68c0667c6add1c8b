"""A reservation left by a SIGKILLed process is settled exactly once (issue 26), on two live Daphne processes
sharing PostgreSQL and Redis.

A message queued behind a slow turn holds its reservation in the shared counters; its process is killed; the
client resumes on the other process, which answers the message. The key is charged what the model reported
for that turn, once: not its reservation as well. The turn the killed process was answering keeps what it
reserved as its charge (the model's own count died with the process)."""

from __future__ import annotations

import asyncio
import math

import pytest
from asgiref.sync import sync_to_async

from chat.accounts import auth
from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.client import ProtocolClient
from tests.e2e.test_resume import SLOW, post, resume, start, wait_for
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_accounting_multiprocess import settled_usage

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

CAP = 100  # the key's output cap: what a turn reserves for its reply


async def test_a_message_queued_on_a_killed_process_is_charged_once(daphne_factory, fake_llm):
    env = {**FAST_LIVENESS, "R2D2_REQUIRE_AUTH": "1"}
    server_a, server_b = daphne_factory(**env), daphne_factory(**env)
    row, key = await sync_to_async(auth.create_api_key)("killed", tokens_per_day=100_000, max_output_tokens=CAP)
    headers = {"Authorization": f"Bearer {key}"}

    client = await ProtocolClient.connect(server_a.url, additional_headers=headers)
    session_id, token = await start(client)
    await post(client, session_id, SLOW)
    await post(client, session_id, "queued behind it", stream=False)
    frames = [await client.recv() for _ in range(4)]  # processing_start and the first deltas

    async def both_saved() -> bool:
        return await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2

    await wait_for(both_saved)
    await asyncio.sleep(0.3)  # the queued message's reservation is recorded just after its row
    server_a.kill()
    with pytest.raises(Exception):  # noqa: B017 (the socket is gone, whichever way websockets says it)
        while True:
            frames.append(await client.recv(timeout=5))

    client = await ProtocolClient.connect(server_b.url, additional_headers=headers)
    assert (await resume(client, session_id, token, frames[-1]["seq"]))["type"] == "session_resumed"
    interrupted = await client.until("processing_end", timeout=20)
    assert [f["type"] for f in interrupted] == ["error", "processing_end"]
    answered = await client.until("processing_end", timeout=20)
    assert [f["type"] for f in answered] == ["processing_start", "message", "processing_end"]
    assert answered[1]["data"] == "Echo: queued behind it"

    reply = await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).alast()
    reported = reply.prompt_tokens + reply.completion_tokens
    slow_reserved = math.ceil(len(SLOW) / 4) + CAP
    spent = await settled_usage(client)
    assert spent["tokens_today"]["used"] == reported + slow_reserved, (spent["tokens_today"], reported, slow_reserved)
    await client.close()


async def test_a_message_queued_on_a_killed_process_and_never_resumed_gives_its_reservation_back(
    daphne_factory, fake_llm
):
    """Nobody takes the session over: the sweep that ends it as orphaned marks the queued message `failed` and
    gives back what it reserved, once; the turn the killed process was answering keeps its reservation."""
    env = {**FAST_LIVENESS, "R2D2_REQUIRE_AUTH": "1"}
    server_a, server_b = daphne_factory(**env), daphne_factory(**env)
    row, key = await sync_to_async(auth.create_api_key)("swept", tokens_per_day=100_000, max_output_tokens=CAP)
    headers = {"Authorization": f"Bearer {key}"}

    client = await ProtocolClient.connect(server_a.url, additional_headers=headers)
    session_id = await client.start_session()
    await post(client, session_id, SLOW)
    await post(client, session_id, "queued behind it", stream=False)
    [await client.recv() for _ in range(4)]

    async def both_saved() -> bool:
        return await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2

    await wait_for(both_saved)
    await asyncio.sleep(0.3)
    other = await ProtocolClient.connect(server_b.url, additional_headers=headers)  # B beats, and sweeps
    server_a.kill()

    async def swept() -> bool:
        return (await ChatSession.objects.aget(id=session_id)).end_reason == EndReason.ORPHANED

    await wait_for(swept, timeout=20)
    queued = await ChatMessage.objects.aget(session_id=session_id, content="queued behind it")
    assert queued.status == MessageStatus.FAILED
    spent = await settled_usage(other)
    assert spent["tokens_today"]["used"] == math.ceil(len(SLOW) / 4) + CAP, spent["tokens_today"]
    await other.close()
