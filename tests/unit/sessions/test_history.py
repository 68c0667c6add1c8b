"""chat/sessions/history.py: transcripts and continued sessions follow the current branch, and mark other versions."""

from __future__ import annotations

import pytest

from chat.models import ChatMessage, ChatSession, Role
from chat.sessions import history
from chat.web.transcripts import as_markdown

pytestmark = pytest.mark.django_db


def test_the_transcript_is_the_current_branch_with_other_versions_marked():
    session = ChatSession.objects.create(model="gpt-4o-mini", system_message="be brief")
    say = lambda role, text, parent: ChatMessage.objects.create(  # noqa: E731
        session=session, role=role, content=text, parent=parent
    )
    system = say(Role.SYSTEM, "be brief", None)
    u1 = say(Role.USER, "one", None)
    r1 = say(Role.ASSISTANT, "first answer", u1)
    r1b = say(Role.ASSISTANT, "second answer", u1)
    u2 = say(Role.USER, "two", r1)  # on the first answer's branch
    r2 = say(Role.ASSISTANT, "R2", u2)

    # No anchor: the newest message is the leaf (r2), so the first answer's branch is shown.
    assert [m.id for m in history.messages_of_session(session)] == [system.id, u1.id, r1.id, u2.id, r2.id]
    marked = {m.id for m in history.messages_of_session(session) if m.other_versions}
    assert marked == {r1.id}

    session.branch_anchor = r1b.id  # switched to the regenerated answer
    session.save()
    shown = history.messages_of(session)
    assert [m.content for m in shown] == ["be brief", "one", "second answer"]
    text = as_markdown(session, shown)
    assert "second answer" in text and "first answer" not in text and "other versions exist" in text

    continued = ChatSession.objects.create(model="gpt-4o-mini", continued_from=session)
    assert history._load(continued.id).history == [("user", "one"), ("assistant", "second answer")]
