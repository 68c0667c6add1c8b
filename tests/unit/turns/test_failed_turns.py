"""A message whose turn failed for want of storage ("send it again") is never answered later (issue 26), also
when its session changed hands before the database came back (chat/turns/messages.py `fail_turn`,
`start_turn`; chat/sessions/holder.py's release waits for the failed turn's state)."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from chat import llm
from chat.models import ChatMessage, ChatSession, MessageStatus
from chat.ops import storage
from chat.sessions import holder
from chat.turns import messages
from chat.turns.conversation import Conversation
from chat.turns.messages import Fenced, Lease
from testkit.wait import async_wait_until
from tests.unit.sessions.test_holder import StubSocket, key_principal

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_model_client():
    yield
    await llm.close_clients()


async def saved(session: ChatSession, text: str) -> int:
    return await messages.save_user_message(Lease(session.id, session.fence), content=text, system_message=None)


async def status(row_id: int) -> str:
    return (await ChatMessage.objects.aget(id=row_id)).status


async def taken_over(session: ChatSession) -> Lease:
    """Another holder claims the session: its fence grows."""
    await ChatSession.objects.filter(id=session.id).aupdate(fence=session.fence + 1)
    return Lease(session.id, session.fence + 1)


async def test_a_failed_turn_is_marked_failed_after_the_session_changed_hands_unless_it_was_started():
    session = await ChatSession.objects.acreate(model="m")
    old = Lease(session.id, session.fence)
    waiting, answered = await saved(session, "failed while waiting"), await saved(session, "started elsewhere")
    new = await taken_over(session)
    assert await messages.start_turn(new, answered, None, MessageStatus.STARTED)
    await messages.fail_turn(old, waiting)
    await messages.fail_turn(old, answered)
    assert await status(waiting) == MessageStatus.FAILED
    assert await status(answered) == MessageStatus.STARTED, "the new holder's turn is its own"
    await messages.fail_turn(new, answered)  # under the lease: any status
    assert await status(answered) == MessageStatus.FAILED


async def test_a_failed_message_is_not_started_again():
    session = await ChatSession.objects.acreate(model="m")
    lease = Lease(session.id, session.fence)
    failed, waiting = await saved(session, "failed"), await saved(session, "waiting")
    await messages.fail_turn(lease, failed)
    assert not await messages.start_turn(lease, failed, None, MessageStatus.STARTED)
    assert await messages.start_turn(lease, waiting, None, MessageStatus.STARTED)
    assert await messages.start_turn(lease, waiting, None, MessageStatus.STARTED), "a retried start starts it"
    with pytest.raises(Fenced):
        await messages.start_turn(Lease(session.id, session.fence + 1), waiting, None, MessageStatus.STARTED)


async def test_a_taken_over_message_failed_meanwhile_is_skipped_and_the_next_answered(fake_llm):
    session = await ChatSession.objects.acreate(model="gpt-4o-mini")
    failed = await saved(session, "failed meanwhile")
    await saved(session, "still waiting")
    frames: list[dict] = []

    async def send(text: str) -> None:
        frames.append(json.loads(text))

    new = await taken_over(session)
    conversation = Conversation(lease=new, model=session.model, send=send)
    pending = await messages.unanswered(session.id)
    await messages.fail_turn(Lease(session.id, session.fence), failed)  # the old holder's write lands now
    conversation.requeue(pending, lambda _: None)
    assert await async_wait_until(lambda: [f["type"] for f in frames].count("processing_end") >= 1, timeout=10)
    await asyncio.sleep(0.2)  # the behaviour under test: nothing more comes (the failed one is not answered after)
    assert [(f["type"], f["data"]) for f in frames if f["type"] == "message"] == [("message", "Echo: still waiting")]
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
    assert await status(failed) == MessageStatus.FAILED


async def test_a_release_waits_for_the_failed_turns_state(fake_llm, settings):
    """The session is handed to another process only once what its failed turn left is written: the next
    holder finds the message `failed`, not waiting."""
    settings.R2D2_STORAGE_RETRY_SECONDS = 5
    socket = StubSocket()
    held, _ = await holder.start(
        socket, model="gpt-4o-mini", principal=await key_principal(), resumable=True, client_address=None
    )
    session = await ChatSession.objects.aget(id=held.session_id)
    row_id = await saved(session, "failed by an outage")
    failures = 0

    async def mark() -> None:  # the database answers again after a few attempts
        nonlocal failures
        failures += 1
        if failures <= 4:
            raise psycopg.OperationalError("connection refused")
        await messages.fail_turn(held.lease, row_id)

    storage.eventually(mark, what="test", key=held.session_id)
    await held.release()
    assert await status(row_id) == MessageStatus.FAILED
    assert (await ChatSession.objects.aget(id=held.session_id)).owner_process == ""
