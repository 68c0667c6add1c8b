"""chat/sessions/heartbeat.py: the sweep that interrupts replies this process's sessions left `incomplete`.

It runs every few seconds beside the turns, which may be saving the very rows it reads: a reply its turn saves
`complete` (and then sends whole to its client) must stay complete, and one whose first save is landing must not
be interrupted under its turn. The races are forced with PostgreSQL's own locks.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from chat import llm
from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.sessions.heartbeat import interrupt_stale_replies
from chat.sessions.liveness import PROCESS_ID
from chat.turns import draft, pgpool
from chat.turns.messages import Lease
from testkit.wait import async_wait_until, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

_MESSAGES = ChatMessage._meta.db_table
_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
    "AND query LIKE %s"
)


def waiting(monitor: psycopg.Connection, statement: str) -> bool:
    """A statement starting with `statement` waits for a lock in this test's database."""
    return monitor.execute(_WAITING, (statement + "%",)).fetchone()[0] > 0


def test_a_reply_saved_complete_while_the_sweep_runs_stays_complete():
    """The sweep reads a reply as `incomplete` while its turn's final save, which marks it `complete` (the client
    then receives it whole), is committing: the row stays complete. (The sweep's status condition sat in a
    subquery, which PostgreSQL does not re-check against the row committed meanwhile: it was saved `interrupted`.)"""
    session = ChatSession.objects.create(model="m", owner_process=PROCESS_ID)
    reply = ChatMessage.objects.create(
        session=session, role=Role.ASSISTANT, content="Echo: hi", status=MessageStatus.INCOMPLETE
    )
    swept: list[int] = []

    def sweep() -> None:
        try:
            swept.append(interrupt_stale_replies(*draft.streaming()))
        finally:
            connections.close_all()

    params = pgpool.connection_params()
    with psycopg.connect(**params) as final, psycopg.connect(**params, autocommit=True) as monitor:
        # The turn's final save: its UPDATE holds the row until it commits.
        final.execute(f"UPDATE {_MESSAGES} SET status = %s WHERE id = %s", (MessageStatus.COMPLETE, reply.id))
        sweeping = threading.Thread(target=sweep)
        sweeping.start()
        assert wait_until(lambda: waiting(monitor, f'UPDATE "{_MESSAGES}"'), timeout=10)
        final.commit()
        sweeping.join(10)
    assert swept == [0]
    reply.refresh_from_db()
    assert reply.status == MessageStatus.COMPLETE


async def test_a_reply_whose_first_save_lands_as_the_sweep_starts_is_not_interrupted():
    """The heartbeat asks which rows this process's turns are writing while a streaming reply's first save is on its
    way (its row id not known yet), and sweeps once that save has landed: the reply, still being written, is not
    interrupted under its turn."""
    session = await ChatSession.objects.acreate(model="m", owner_process=PROCESS_ID)
    user = await ChatMessage.objects.acreate(
        session=session, role=Role.USER, content="hi", status=MessageStatus.STARTED
    )
    writing = draft.Draft(Lease(session.id, session.fence), "m", llm.Reply(), user.id)
    writing.add("Echo: hi")
    params = pgpool.connection_params()
    async with (
        await psycopg.AsyncConnection.connect(**params) as lock,
        await psycopg.AsyncConnection.connect(**params, autocommit=True) as monitor,
    ):
        await lock.execute(f"LOCK TABLE {_MESSAGES} IN SHARE MODE")  # the reply's INSERT waits for it

        async def inserting() -> bool:
            cursor = await monitor.execute(_WAITING, (f"INSERT INTO {_MESSAGES}%",))
            return (await cursor.fetchone())[0] > 0

        saving = asyncio.ensure_future(writing.save(MessageStatus.INCOMPLETE))
        assert await async_wait_until(inserting, timeout=10)
        taken = draft.streaming()  # as the heartbeat does before it sweeps
        await lock.commit()
    await saving
    assert await sync_to_async(interrupt_stale_replies)(*taken) == 0
    row = await ChatMessage.objects.aget(id=writing.row_id)
    assert (row.status, row.content) == (MessageStatus.INCOMPLETE, "Echo: hi")
