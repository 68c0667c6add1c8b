"""A principal across server processes: revocation reaches every process, quotas are shared through Redis."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.accounts import auth
from testkit.client import ProtocolClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

make_key = sync_to_async(auth.create_api_key)


async def connect(server, key: str) -> ProtocolClient:
    return await ProtocolClient.connect(server.url, additional_headers={"Authorization": f"Bearer {key}"})


def code_of(frame: dict) -> str | None:
    return frame["data"]["code"] if frame["type"] == "error" else None


async def test_revoking_closes_a_socket_held_by_another_process_within_5_s(daphne_factory, fake_llm, manage):
    server_a, server_b = daphne_factory(R2D2_REQUIRE_AUTH="1"), daphne_factory(R2D2_REQUIRE_AUTH="1")
    _, key = await make_key("ci")
    on_a, on_b = await connect(server_a, key), await connect(server_b, key)
    await on_a.start_session()
    await on_b.start_session()

    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await sync_to_async(manage)("revoke_api_key", "ci")  # a third process
    assert result.returncode == 0, result.stderr
    for client in (on_a, on_b):
        frame = await client.recv(timeout=5)
        assert code_of(frame) == "unauthorized" and "revoked" in frame["data"]["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.recv(timeout=5)
        assert closed.value.rcvd.code == 4401
    assert loop.time() - began < 5 + 3  # the command's own start-up (Django) included


async def test_quotas_hold_across_two_processes(daphne_factory, fake_llm):
    server_a, server_b = daphne_factory(R2D2_REQUIRE_AUTH="1"), daphne_factory(R2D2_REQUIRE_AUTH="1")

    # Messages per minute: 2 in all, whichever process they reach.
    _, key = await make_key("mpm", messages_per_minute=2)
    a, b = await connect(server_a, key), await connect(server_b, key)
    on_a, on_b = await a.start_session(), await b.start_session()
    assert (await a.post(on_a, "one"))[-1]["type"] == "processing_end"
    assert (await b.post(on_b, "two"))[-1]["type"] == "processing_end"
    await a.send({"action": "chatbot_post_message", "session_id": on_a, "user_message": "three"})
    frame = await a.recv()
    assert code_of(frame) == "quota_exceeded" and frame["data"]["message"].startswith("Messages per minute")
    requests = len(fake_llm.requests)
    await b.send({"action": "chatbot_post_message", "session_id": on_b, "user_message": "four"})
    assert code_of(await b.recv()) == "quota_exceeded"
    assert len(fake_llm.requests) == requests  # nothing reached the model
    await b.send({"action": "chatbot_session_end", "session_id": on_b})
    assert (await b.recv())["type"] == "session_end"  # the socket stays usable

    # Tokens per day: the first turn (its prompt and its reply of at most 10 tokens fit in 20) spends 11;
    # the other process then refuses a message that might need 11 more.
    _, key = await make_key("tpd", tokens_per_day=20, max_output_tokens=10)
    a, b = await connect(server_a, key), await connect(server_b, key)
    on_a, on_b = await a.start_session(), await b.start_session()
    assert {"type": "message", "data": "Echo: a long enough question"} in await a.post(on_a, "a long enough question")
    await asyncio.sleep(0.3)  # settled as the turn ends
    await b.send({"action": "chatbot_post_message", "session_id": on_b, "user_message": "more"})
    frame = await b.recv()
    assert code_of(frame) == "quota_exceeded" and "resets at 00:00 UTC" in frame["data"]["message"]

    # Concurrent sessions: one live session in all.
    _, key = await make_key("sessions", max_sessions=1)
    a, b = await connect(server_a, key), await connect(server_b, key)
    first = await a.start_session()
    await b.send({"action": "chatbot_session_start"})
    frame = await b.recv()
    assert code_of(frame) == "quota_exceeded" and frame["data"]["message"].startswith("Concurrent sessions")
    await a.send({"action": "chatbot_session_end", "session_id": first})
    assert (await a.recv())["type"] == "session_end"
    await b.start_session()

    # Models: the key's list.
    _, key = await make_key("models", models=["gpt-4o-mini"])
    b = await connect(server_b, key)
    await b.send({"action": "chatbot_session_start", "gpt_model": "gpt-4o"})
    assert code_of(await b.recv()) == "model_not_allowed"
    await b.start_session(gpt_model="gpt-4o-mini")
