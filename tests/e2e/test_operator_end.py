"""The operator's end reaches a live server's client even when Redis has forgotten everything."""

import pytest
import redis.asyncio as redis
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.models import ChatSession, EndReason
from chat.sessions.lifecycle import request_end_now
from testkit.client import ProtocolClient

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]


async def test_operator_end_survives_lost_group_membership(daphne, fake_llm):
    """After a Redis restart its keys are gone; the event still reaches the holder through its process's channel."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    connection = redis.from_url(settings.REDIS_URL)
    await connection.flushdb()  # what a restart of a non-persistent Redis does
    await connection.aclose()

    await sync_to_async(request_end_now)(session_id)
    frame = await client.recv()
    assert frame == {"type": "session_end", "data": {"session_id": session_id, "reason": "operator"}}
    await client.close()
    session = await ChatSession.objects.aget(id=session_id)
    assert session.end_reason == EndReason.OPERATOR
