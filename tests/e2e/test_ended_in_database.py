"""A session ended in the database (by `manage.py end_session`, from any process): its live server refuses it."""

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command

from chat.models import ChatMessage, ChatSession, EndReason, Role
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
