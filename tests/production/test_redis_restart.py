"""A Redis restart mid-conversation: sockets stay open, turns keep working, the operator still reaches them."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from asgiref.sync import sync_to_async

from chat.models import ChatMessage, ChatSession, EndReason
from chat.sessions.lifecycle import request_end_now
from testkit.client import ProtocolClient
from testkit.redis import PrivateRedis

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


async def test_redis_restart_keeps_sockets_and_sessions(daphne_factory, fake_llm, private_redis, settings):
    """Redis goes away and comes back empty: the client's socket survives and its session still chats."""
    server = daphne_factory(REDIS_URL=private_redis.url)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    assert (await client.post(session_id, "before"))[1]["data"] == "Echo: before"

    private_redis.stop()
    await asyncio.sleep(1.0)  # the behaviour under test: a second with no Redis
    private_redis.start()
    await asyncio.sleep(0.5)  # then a moment with Redis back before the next turn, as after a real restart

    frames = await client.post(session_id, "after")
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]

    # The operator's event still reaches the owner, though Redis forgot the session's group.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chat.channel_layer.RedisChannelLayer",
            "CONFIG": {"hosts": [private_redis.url], "prefix": "r2d2"},
        }
    }
    await sync_to_async(request_end_now)(session_id)
    assert (await client.recv(timeout=15)) == {
        "type": "session_end",
        "data": {"session_id": session_id, "reason": "operator"},
    }
    await client.close()
    assert (await ChatSession.objects.aget(id=session_id)).end_reason == EndReason.OPERATOR
    assert await ChatMessage.objects.filter(session_id=session_id, role="user").acount() == 2
