"""Frames of messages as a tree (issue 29): `history`, `branch_switched`, and the ids a turn's frames carry
when it was asked for `"with_ids": true` (its requests are parsed in chat/protocol/__init__.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from chat.protocol import encode

# A turn asked for with `"with_ids": true` names its messages: two more keys after `type` and `data` (before a
# resumable session's `session_id` and `seq`), spliced in as `sequenced` does; without it, the same bytes as ever.


def with_ids(frame: str, **ids: int | None) -> str:
    """`frame` with the given message ids appended as its last keys (null for None)."""
    tail = "".join(f', "{key}": {"null" if value is None else int(value)}' for key, value in ids.items())
    return f"{frame[:-1]}{tail}}}"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    id: int
    parent_id: int | None
    role: str
    content: str
    status: str
    model: str
    created_at: datetime


def history(session_id: uuid.UUID, leaf_id: int | None, entries: list[HistoryEntry]) -> str:
    """The answer to `chatbot_history`: every message of the session, all branches, in creation order."""
    messages = [
        {
            "id": e.id,
            "parent_id": e.parent_id,
            "role": e.role,
            "content": e.content,
            "status": e.status,
            "model": e.model,
            "created_at": e.created_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        for e in entries
    ]
    return encode("history", {"session_id": str(session_id), "leaf_id": leaf_id, "messages": messages})


def branch_switched(session_id: uuid.UUID, leaf_id: int | None) -> str:
    return encode("branch_switched", {"session_id": str(session_id), "leaf_id": leaf_id})
