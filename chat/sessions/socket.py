"""What session life needs of a client's socket: a small interface, so that chat/sessions/
never imports the consumer (chat/websocket/consumer.py implements it)."""

from __future__ import annotations

import uuid
from typing import Protocol


class SessionSocket(Protocol):
    """A client's open WebSocket, as a session's holder sees it."""

    async def send_frame(self, text: str) -> None:
        """Send one text frame (already encoded)."""

    async def close(self, code: int | None = None) -> None:
        """Close the socket with `code`."""

    def dropped(self, session_id: uuid.UUID) -> None:
        """The session no longer goes through this socket (ended, released, or resumed elsewhere)."""
