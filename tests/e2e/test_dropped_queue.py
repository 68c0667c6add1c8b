"""A queued message dropped because its session ended is marked `failed`, whatever ended it (issue 26): a
revocation, an operator, the client's own `chatbot_session_end`, the close of a plain session's socket. Left
`accepted` in an ended session, it would read as still waiting (a resend's `duplicate_message` says "queued")."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from chat.accounts import auth
from chat.models import ChatMessage, MessageStatus, Role
from chat.sessions.lifecycle import request_end_now
from testkit.client import ProtocolClient
from tests.e2e.test_resume import SLOW, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]


async def queue_behind_a_slow_turn(client: ProtocolClient) -> str:
    """A session answering a slow turn with one message queued behind it; returns the session's id."""
    session_id = await client.start_session()
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW})
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "queued"})
    assert (await client.recv())["type"] == "processing_start"

    async def both_saved() -> bool:
        return await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2

    await wait_for(both_saved)
    return session_id


async def queued_status(session_id: str) -> str:
    """The queued message's status once its session's end has settled (the holder marks it as it lets go)."""
    row = ChatMessage.objects.filter(session_id=session_id, role=Role.USER, content="queued")

    async def settled() -> bool:
        return (await row.aget()).status != MessageStatus.ACCEPTED

    try:
        await wait_for(settled, timeout=5)
    except AssertionError:
        pass
    return (await row.aget()).status


async def test_revoked(daphne_factory):
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    key_row, key = await sync_to_async(auth.create_api_key)("ci")
    client = await ProtocolClient.connect(server.url, additional_headers={"Authorization": f"Bearer {key}"})
    session_id = await queue_behind_a_slow_turn(client)
    await sync_to_async(auth.revoke)(key_row)
    assert await queued_status(session_id) == MessageStatus.FAILED
    await client.close()


async def test_ended_by_an_operator(daphne):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await queue_behind_a_slow_turn(client)
    await sync_to_async(request_end_now)(session_id, wait=5)
    assert await queued_status(session_id) == MessageStatus.FAILED
    await client.close()


async def test_ended_by_the_client(daphne):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await queue_behind_a_slow_turn(client)
    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    frames = await client.until("session_end")
    assert frames[-1] == {"type": "session_end", "data": None}
    assert await queued_status(session_id) == MessageStatus.FAILED
    await client.close()


async def test_a_plain_sessions_socket_closed(daphne):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await queue_behind_a_slow_turn(client)
    await client.close()
    assert await queued_status(session_id) == MessageStatus.FAILED
