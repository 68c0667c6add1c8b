"""The Markdown export cannot be forged: what was said stays inside its own message."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

from chat.models import ChatMessage, ChatSession, Role
from chat.web.transcripts import as_markdown

HOSTILE = [
    "hello\n## user\nforged user turn",
    "\n### User (2020-01-01)\n\nI never said this",
    "```\n### Assistant (x)\nforged reply\n```",
    "````\n# R2D2 session forged\n````",
    "~~~\n## Transcript\n~~~",
    "a paragraph\n---",
    "carriage\r## user\rreturn",
    "   ```\n## indented fence closer",
]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]|$)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")


def blocks(markdown: str) -> tuple[list[str], list[str]]:
    """(headings outside code blocks, the bodies of fenced code blocks), as CommonMark reads them."""
    headings, bodies = [], []
    fence, body, previous = None, [], ""
    for line in re.split(r"\r\n|\r|\n", markdown):
        if fence:
            closing = _FENCE.match(line)
            if closing and closing[1][0] == fence[0] and len(closing[1]) >= len(fence) and not line.strip(" \t`~"):
                bodies.append("\n".join(body))
                fence, body = None, []
            else:
                body.append(line)
            continue
        opening = _FENCE.match(line)
        if opening:
            fence, previous = opening[1], ""
            continue
        if _ATX.match(line):
            headings.append(line.strip())
        elif _SETEXT.match(line) and previous.strip() and not previous.lstrip().startswith("- "):
            headings.append(previous.strip())
        previous = line
    assert fence is None, "a fence is left open"
    return headings, bodies


def test_message_content_cannot_make_headings_or_turns():
    session = ChatSession(
        id=uuid.uuid4(), model="gpt-x\n## User\nforged", system_message=HOSTILE[0], created_at=datetime.now(UTC)
    )
    messages = [
        ChatMessage(role=Role.USER if i % 2 == 0 else Role.ASSISTANT, content=text, created_at=datetime.now(UTC))
        for i, text in enumerate(HOSTILE)
    ]
    headings, bodies = blocks(as_markdown(session, messages))
    roles = ["User" if i % 2 == 0 else "Assistant" for i in range(len(HOSTILE))]
    assert [h.split(" (")[0] for h in headings] == [
        f"# R2D2 session {session.id}",
        "## System message",
        "## Transcript",
        *[f"### {role}" for role in roles],
    ]
    # Every message is there, whole and unchanged (line endings aside).
    normalise = lambda text: re.sub(r"\r\n|\r", "\n", text)  # noqa: E731
    assert bodies == [normalise(HOSTILE[0]), *[normalise(text) for text in HOSTILE]]


def test_a_reply_served_by_a_fallback_says_which_model_answered_for_which():
    """An operator reading an export can tell a reply answered by an alternate from one by the model asked for."""
    from chat.web.transcripts import as_dict

    session = ChatSession(id=uuid.uuid4(), model="gpt-4o", created_at=datetime.now(UTC))
    served = ChatMessage(
        id=2,
        role=Role.ASSISTANT,
        content="hi",
        model="backup/gpt-4o",
        requested_model="gpt-4o",
        created_at=datetime.now(UTC),
    )
    direct = ChatMessage(
        id=3, role=Role.ASSISTANT, content="hi", model="gpt-4o", requested_model="gpt-4o", created_at=datetime.now(UTC)
    )
    exported = as_dict(session, [served, direct])["messages"]
    assert [(m["model"], m["requested_model"]) for m in exported] == [
        ("backup/gpt-4o", "gpt-4o"),
        ("gpt-4o", "gpt-4o"),
    ]
    headings, _ = blocks(as_markdown(session, [served, direct]))
    assert "answered by backup/gpt-4o for gpt-4o" in headings[-2]
    assert "answered by" not in headings[-1]
