"""A session's transcript as operators export it: JSON for tools, Markdown for people."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from chat.models import ChatMessage, ChatSession, MessageStatus


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def as_dict(session: ChatSession, messages: Iterable[ChatMessage]) -> dict[str, Any]:
    """The session and every message in order, with the numbers the admin shows."""
    return {
        "session_id": str(session.id),
        "model": session.model,
        "system_message": session.system_message,
        "started_at": _iso(session.created_at),
        "ended_at": _iso(session.ended_at),
        "end_reason": session.end_reason or None,
        "client_address": session.client_address,
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,  # messages form a tree: regenerated and edited versions are siblings
                "role": m.role,
                "content": m.content,
                "time": _iso(m.created_at),
                "status": m.status,
                "model": m.model or None,  # the model that answered
                # the one asked for: it differs when a fallback chain (R2D2_FALLBACKS) moved on
                "requested_model": m.requested_model or None,
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "latency_ms": m.latency_ms,
            }
            for m in messages
        ],
    }


def _fenced(text: str) -> list[str]:
    """Text as a fenced code block no line of it can close: the fence is longer than any run of
    backticks inside, so content such as "\n## user\n..." stays content, never a heading or a turn."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _one_line(value: object) -> str:
    """A header fact on one line: a client-chosen model name with a newline cannot start a heading."""
    return " ".join(str(value).split())


def as_markdown(session: ChatSession, messages: Iterable[ChatMessage]) -> str:
    """A readable transcript: a header with the session's facts, then one section per message (the current
    branch, as chat/sessions/history.py's `messages_of_session` gives it, marks where other versions exist)."""
    lines = [
        f"# R2D2 session {session.id}",
        "",
        f"- Model: {_one_line(session.model)}",
        f"- Started: {_iso(session.created_at)}",
        f"- Ended: {_iso(session.ended_at) or 'still live'}"
        + (f" ({session.get_end_reason_display()})" if session.end_reason else ""),
        f"- Client address: {session.client_address or 'unknown'}",
    ]
    if session.system_message:
        lines += ["", "## System message", "", *_fenced(session.system_message)]
    lines += ["", "## Transcript"]
    for m in messages:
        facts = [_iso(m.created_at) or ""]
        if m.prompt_tokens is not None or m.completion_tokens is not None:
            facts.append(f"{m.prompt_tokens or 0} prompt + {m.completion_tokens or 0} completion tokens")
        if m.latency_ms is not None:
            facts.append(f"{m.latency_ms} ms")
        if m.requested_model and m.model and m.requested_model != m.model:
            facts.append(f"answered by {_one_line(m.model)} for {_one_line(m.requested_model)}")
        if m.status != MessageStatus.COMPLETE:
            facts.append(m.get_status_display().lower())
        if getattr(m, "other_versions", False):
            facts.append("other versions exist")
        lines += ["", f"### {m.get_role_display()} ({', '.join(facts)})", "", *_fenced(m.content)]
    return "\n".join(lines) + "\n"
