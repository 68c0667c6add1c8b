"""chat/sessions/lifecycle.py: a session's life, and ending it from outside its socket."""

import uuid

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command

from chat.models import ChatMessage, ChatSession, EndReason, Role
from chat.sessions import lifecycle
from chat.sessions.lifecycle import Ended
from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_session_ended_in_the_database_takes_no_more_messages(daphne, fake_llm, settings):
    """Whichever path ended it: here the command, which cannot reach the server (in-memory layer in the
    command's process), ends it in the database; the server then refuses the next message and saves nothing."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    assert (await client.post(session_id, "before"))[1] == {"type": "message", "data": "Echo: before"}

    await sync_to_async(call_command)("end_session", session_id)
    for _ in range(2):  # refused, and refused again: the socket stays usable
        await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "after"})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["data"]["code"] == "session_ended"
    other = await client.start_session()
    assert (await client.post(other, "new one"))[1] == {"type": "message", "data": "Echo: new one"}
    await client.close()

    said = [
        m
        async for m in ChatMessage.objects.filter(session_id=session_id, role=Role.USER).values_list(
            "content", flat=True
        )
    ]
    assert said == ["before"]
    assert (await ChatSession.objects.aget(id=session_id)).end_reason == EndReason.OPERATOR


async def test_request_end_outcomes(settings):
    """Unknown, already ended, and a live session held by a process that never beat: ended in the database."""
    assert await lifecycle.request_end(uuid.uuid4()) == Ended.NOT_FOUND
    gone = await ChatSession.objects.acreate(model="m", owner_process="dead-host:1:abc")
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
    # With a cross-process layer the owner is judged by its heartbeat, before anything is sent.
    assert await lifecycle.request_end(gone.id) == Ended.OWNER_GONE
    row = await ChatSession.objects.aget(id=gone.id)
    assert row.end_reason == EndReason.OPERATOR and row.ended_at is not None
    assert await lifecycle.request_end(gone.id) == Ended.ALREADY
