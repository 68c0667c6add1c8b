"""A process judges another gone only from a view of the database its own silence does not explain
(chat/sessions/liveness.py `OwnView`; issue 26: after an outage the first process whose beat got through
swept every other live process's sessions)."""

from __future__ import annotations

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from chat.sessions import lifecycle, liveness, resume
from chat.sessions.lifecycle import Ended
from chat.sessions.liveness import OwnView


@pytest.fixture
def view(monkeypatch, settings) -> OwnView:
    settings.R2D2_PROCESS_STALE_SECONDS, settings.R2D2_HEARTBEAT_SECONDS = 2, 0.3
    fresh = OwnView()
    monkeypatch.setattr(liveness, "own_view", fresh)
    return fresh


def test_the_sweep_waits_for_a_staleness_window_of_beats_without_a_gap(view):
    assert not view.steady(now=100), "never beaten: the first sweep after start-up waits"
    view.reached(now=100)
    assert not view.steady(now=101.9)
    view.reached(now=101)
    assert view.steady(now=102)
    view.missed()  # an outage: a beat failed
    assert not view.steady(now=103)
    view.reached(now=108)  # the first beat that got through again
    assert not view.steady(now=109.9) and view.steady(now=110)


def test_a_late_beat_is_a_gap(view):
    """Frozen (SIGSTOP, a paused VM) or stalled for more than half the window: everyone's rows aged with ours."""
    view.reached(now=100)
    view.reached(now=101)
    view.reached(now=102.5)  # 1.5 s after the last: more than half of 2 s, and two heartbeats
    assert not view.steady(now=103) and not view.clear(now=102.9)
    assert view.steady(now=104.5)


def test_one_judgement_is_clear_unless_something_cut_this_process_off(view):
    assert view.clear(now=0), "a process without a heartbeat (a command) reads the rows as they are"
    view.reached(now=100)
    assert view.clear(now=100), "started, never cut off"
    view.missed()
    view.reached(now=105)
    assert not view.clear(now=105.5)
    assert view.clear(now=105.7), "two heartbeats (0.3 s) of beats since: a live process has beaten again"
    assert not view.steady(now=105.7), "the sweep waits the whole staleness window"


@pytest.mark.django_db(transaction=True)
async def test_a_resume_takes_a_stale_holder_for_alive_while_this_process_was_cut_off(view):
    row = await ChatSession.objects.acreate(model="m", owner_process="other-host:1:abc", resume_token_hash="x")
    assert await resume._free(row), "its holder never beat: gone"
    view.missed()  # this process's beats failed too: the holder's may have stopped for the same reason
    assert not await resume._free(row)


@pytest.mark.django_db(transaction=True)
async def test_an_end_also_tells_a_stale_holder_while_this_process_was_cut_off(view, monkeypatch, settings):
    told: list[str] = []

    async def tell_holder(session: ChatSession, reason: EndReason) -> None:
        told.append(str(session.id))

    monkeypatch.setattr(lifecycle, "tell_holder", tell_holder)
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
    quiet = await ChatSession.objects.acreate(model="m", owner_process="dead-host:1:abc", owner_channel="c!1")
    assert await lifecycle.request_end(quiet.id) == Ended.OWNER_GONE
    assert told == []  # nothing cut this process off: its heartbeat says gone
    view.missed()
    maybe = await ChatSession.objects.acreate(model="m", owner_process="dead-host:1:abc", owner_channel="c!1")
    assert await lifecycle.request_end(maybe.id) == Ended.OWNER_GONE  # ended in the database all the same
    assert told == [str(maybe.id)]  # and its holder, if alive, tells its client


@pytest.mark.django_db(transaction=True)
async def test_a_session_ended_in_the_database_leaves_nothing_open(view, settings):
    """Ended by its client or an operator while its holder is gone (or cannot tell whether it is): the reply it
    left streaming is interrupted, its queued message failed, as the orphan sweep would have left them."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    row = await ChatSession.objects.acreate(model="m", owner_process="dead-host:1:abc")
    asked = await ChatMessage.objects.acreate(session=row, role=Role.USER, content="q", status=MessageStatus.STARTED)
    streaming = await ChatMessage.objects.acreate(
        session=row, role=Role.ASSISTANT, content="half", status=MessageStatus.INCOMPLETE, reply_to=asked
    )
    queued = await ChatMessage.objects.acreate(
        session=row, role=Role.USER, content="next", status=MessageStatus.ACCEPTED
    )
    assert (await lifecycle.request_end(row.id, EndReason.CLIENT)).in_database
    assert (await ChatMessage.objects.aget(id=streaming.id)).status == MessageStatus.INTERRUPTED
    assert (await ChatMessage.objects.aget(id=queued.id)).status == MessageStatus.FAILED
