"""Frames of watching a session from another socket (issue 28): `session_watching`, `session_unwatched` and
`sessions` (their requests are parsed in chat/protocol/__init__.py). The watched session's frames reach a watcher
as its holder's socket gets them, with `session_id` and `seq` appended (`sequenced`), for plain sessions too."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chat.protocol import _instant, encode


def session_watching(session_id: uuid.UUID, messages: list[dict[str, Any]], partial: str | None) -> str:
    """The answer to `chatbot_session_watch`: the conversation as saved so far, and the reply being written."""
    return encode("session_watching", {"session_id": str(session_id), "messages": messages, "partial": partial})


def session_unwatched(session_id: uuid.UUID) -> str:
    return encode("session_unwatched", {"session_id": str(session_id)})


@dataclass(frozen=True, slots=True)
class LiveSession:
    """One of a principal's live sessions, as `chatbot_sessions` lists it."""

    session_id: uuid.UUID
    model: str
    resumable: bool
    answering: bool
    watchers: int
    started_at: datetime
    last_activity: datetime


def sessions(live: list[LiveSession]) -> str:
    """The answer to `chatbot_sessions`: the principal's live sessions, newest first."""
    return encode(
        "sessions",
        [
            {
                "session_id": str(s.session_id),
                "model": s.model,
                "resumable": s.resumable,
                "answering": s.answering,
                "watchers": s.watchers,
                "started_at": _instant(s.started_at),
                "last_activity": _instant(s.last_activity),
            }
            for s in live
        ],
    )


def watch_ended(session_id: uuid.UUID, code: str, message: str) -> str:
    """A watch that cannot go on (frames it missed cannot be had, and neither can a fresh snapshot): one `error`
    naming the session, its `session_id` beside `data` as on the watched frames (`session_unwatched` follows)."""
    return f'{encode("error", {"code": code, "message": message})[:-1]}, "session_id": "{session_id}"}}'
