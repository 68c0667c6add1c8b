"""Migration 0010: a session saved before branches reads as one straight branch, in the order its turns ran."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from django.apps import apps
from django.db import connection

from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.sessions import history

pytestmark = pytest.mark.django_db

migration = importlib.import_module("chat.migrations.0010_message_tree")


def test_an_old_session_reads_as_one_branch_in_the_order_its_turns_ran():
    session = ChatSession.objects.create(model="gpt-4o-mini")
    say = lambda role, text, **kw: ChatMessage.objects.create(session=session, role=role, content=text, **kw)  # noqa: E731
    say(Role.SYSTEM, "be brief")
    u1 = say(Role.USER, "one")
    u2 = say(Role.USER, "two (sent while one was answered)")  # saved before the reply to one
    r1 = say(Role.ASSISTANT, "R1", reply_to=u1)
    r2 = say(Role.ASSISTANT, "R2", reply_to=u2)
    u3 = say(Role.USER, "three", status=MessageStatus.FAILED)  # a turn that failed: no reply
    u4 = say(Role.USER, "four")
    r4 = say(Role.ASSISTANT, "R4")  # before replies named their message (migration 0007)
    other = ChatSession.objects.create(model="gpt-4o-mini")
    lone = ChatMessage.objects.create(session=other, role=Role.USER, content="alone")

    migration.straight_branches(apps, SimpleNamespace(connection=connection))

    branch, branched = history.current_branch(session)
    assert [m.id for m in branch] == [u1.id, r1.id, u2.id, r2.id, u3.id, u4.id, r4.id]
    assert branched == set()
    parents = dict(ChatMessage.objects.filter(session=session).values_list("id", "parent_id"))
    assert parents[u1.id] is None and parents[r1.id] == u1.id and parents[u2.id] == r1.id
    assert parents[r2.id] == u2.id and parents[u4.id] == u3.id and parents[r4.id] == u4.id
    assert ChatMessage.objects.get(id=lone.id).parent_id is None
    # What a continued session remembers of it: the same turns, as the model was sent them.
    memory = history._load(session.id)
    assert [text for _, text in memory.history] == [
        "one",
        "R1",
        "two (sent while one was answered)",
        "R2",
        "three",
        "four",
        "R4",
    ]
