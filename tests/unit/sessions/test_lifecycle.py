"""chat/sessions/lifecycle.py: a session's life, and ending it from outside its socket."""

import uuid

import pytest

from chat.models import ChatSession, EndReason
from chat.sessions import lifecycle
from chat.sessions.lifecycle import Ended

pytestmark = pytest.mark.django_db(transaction=True)


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
