"""The turn's writes on PostgreSQL run on the event loop (chat/turns/pgpool.py): what a user would see
when the database drops connections or a write is cut short."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus
from chat.sessions import lifecycle
from chat.turns import messages, pgpool
from chat.turns.messages import Lease

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _terminate_turn_connections() -> int:
    """What a PostgreSQL restart or failover does to the pool's connections."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            [pgpool.connection_params()["application_name"]],
        )
        return cursor.fetchone()[0]


async def _fill_pool(size: int) -> None:
    """Several writes at once leave several idle connections in the loop's pool."""
    await asyncio.gather(*(pgpool.fetch_value("SELECT pg_sleep(0.05)", ()) for _ in range(size)))


async def test_dropped_connections_cost_at_most_one_failed_write() -> None:
    session = await ChatSession.objects.acreate()
    await _fill_pool(4)
    assert await sync_to_async(_terminate_turn_connections)() >= 4
    failures = 0
    for n in range(5):
        try:
            await messages.save_user_message(Lease(session.id, session.fence), content=f"m{n}", system_message=None)
        except psycopg.OperationalError:
            failures += 1
    assert failures <= 1
    saved = [m.content async for m in ChatMessage.objects.filter(session=session).order_by("id")]
    assert saved == [f"m{n}" for n in range(failures, 5)]


async def test_a_write_cut_short_never_leaves_a_busy_connection_for_the_next() -> None:
    session = await ChatSession.objects.acreate()
    for _ in range(3):
        slow = asyncio.ensure_future(pgpool.fetch_value("SELECT pg_sleep(2)", ()))
        await asyncio.sleep(0.1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        row_id = await messages.save_reply(
            Lease(session.id, session.fence),
            reply_to=None,
            content="hello",
            model="m",
            prompt_tokens=None,
            completion_tokens=None,
            latency_ms=None,
            status=MessageStatus.INCOMPLETE,
        )
        await messages.extend_reply(
            Lease(session.id, session.fence),
            row_id=row_id,
            saved=len("hello"),
            more=" there",
            prompt_tokens=3,
            completion_tokens=2,
            latency_ms=7,
            status=MessageStatus.COMPLETE,
        )
        reply = await ChatMessage.objects.aget(id=row_id)
        assert (reply.content, reply.status, reply.completion_tokens) == ("hello there", "complete", 2)


async def test_a_message_for_an_ended_or_unknown_session_is_refused_and_not_saved() -> None:
    ended = await ChatSession.objects.acreate()
    assert await lifecycle.end(session_id=ended.id, reason=EndReason.CLIENT)
    for session_id in (ended.id, uuid.uuid4()):
        with pytest.raises(messages.ClientError) as refused:
            await messages.save_user_message(Lease(session_id, 1), content="hi", system_message=None)
        assert refused.value.code == "session_ended"
    assert not await ChatMessage.objects.filter(session_id=ended.id).aexists()
