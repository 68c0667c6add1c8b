"""The orphan sweep's rules, in-process (both modes): whose sessions end, whose do not."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from chat.models import ChatSession, EndReason, ServerProcess
from chat.sessions import lifecycle, liveness
from chat.sessions.liveness import PROCESS_ID

pytestmark = pytest.mark.django_db


def process(process_id: str, seconds_ago: float) -> ServerProcess:
    return ServerProcess.objects.create(
        process_id=process_id, host="ip-10-0-0-1", pid=42, last_seen_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def session(owner: str, seconds_ago: float) -> ChatSession:
    row = ChatSession.objects.create(model="gpt-4o-mini", owner_process=owner)
    ChatSession.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(seconds=seconds_ago))
    return row


def test_only_sessions_of_gone_processes_are_ended():
    process("alive", seconds_ago=1)
    process("gone", seconds_ago=120)
    alive = session("alive", seconds_ago=600)
    gone = session("gone", seconds_ago=600)
    never_beat = session("host:1:deadbeef", seconds_ago=600)  # its process never wrote a row
    just_started = session("new-process", seconds_ago=1)  # its process may not have beaten yet
    already_ended = session("gone", seconds_ago=600)
    ChatSession.objects.filter(pk=already_ended.pk).update(ended_at=timezone.now(), end_reason=EndReason.CLIENT)

    assert lifecycle.end_orphaned(stale_after=45) == 2
    reasons = {s.pk: s.end_reason for s in ChatSession.objects.all()}
    assert reasons[gone.pk] == reasons[never_beat.pk] == EndReason.ORPHANED
    assert reasons[alive.pk] == reasons[just_started.pk] == ""
    assert reasons[already_ended.pk] == EndReason.CLIENT
    assert lifecycle.end_orphaned(stale_after=45) == 0, "the sweep is idempotent"


def test_beat_registers_this_process_and_keeps_it_alive():
    assert liveness.beat() is True
    assert liveness.beat() is False
    assert liveness.is_alive(PROCESS_ID, stale_after=5)
    assert not liveness.is_alive("", stale_after=5)
    ServerProcess.objects.filter(pk=PROCESS_ID).update(last_seen_at=timezone.now() - timedelta(seconds=60))
    assert not liveness.is_alive(PROCESS_ID, stale_after=45)


def test_long_gone_processes_are_forgotten():
    process("recently-gone", seconds_ago=100)
    process("long-gone", seconds_ago=1000)
    lifecycle.end_orphaned(stale_after=45)
    assert set(ServerProcess.objects.values_list("pk", flat=True)) == {"recently-gone"}


def test_end_session_command_without_a_cross_process_channel_layer(settings):
    """With the in-memory layer the command cannot reach a server: it says so and ends the session in the database."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    process("alive", seconds_ago=1)
    row = session("alive", seconds_ago=10)
    out, err = StringIO(), StringIO()
    call_command("end_session", str(row.pk), stdout=out, stderr=err)
    assert "in-memory" in err.getvalue() and "ended in the database" in out.getvalue()
    row.refresh_from_db()
    assert row.end_reason == EndReason.OPERATOR
