"""A turn waiting in a session's queue (chat/turns/conversation.py answers them in order), and what it holds of
its principal's budget."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from chat import llm


class Reservation(Protocol):
    """What a turn holds of its principal's budget (chat/accounts/reservations.py's Reservation): a Protocol, so
    turns does not import accounts. Exactly one of `settle_soon` (the model was called) or `release` takes effect."""

    max_output_tokens: int | None

    async def keep(self, session_id: uuid.UUID, fence: int, row_id: int) -> None: ...

    async def cover(self, request: Sequence[dict[str, str]]) -> None: ...
    def settle_soon(self, reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> None: ...
    def release(self) -> None: ...
    def unusable(self, model: str) -> str | None: ...  # why the principal may not use a chain's alternate


class Queued:
    """A message accepted (its row saved as `accepted`) and waiting for its turn."""

    __slots__ = ("content", "system_message", "stream", "row_id", "started", "reservation")
    __slots__ += ("report_model", "answered_by")  # processing_end names the model that answered (issue 27)
    __slots__ += ("parent", "placed", "regenerates", "with_ids", "reply_id")  # its place in the tree (issue 29)

    def __init__(
        self,
        content: str,
        system_message: str | None,
        stream: bool,
        row_id: int,
        started: bool,
        reservation: Reservation | None,
        report_model: bool = False,
    ) -> None:
        self.content, self.system_message, self.stream, self.row_id = content, system_message, stream, row_id
        self.started = started  # saved as `started` already
        # Its quota reservation (chat/accounts/reservations.py): settled once its turn has called the model,
        # released when it never does (refused, or the queue dropped).
        self.reservation = reservation
        # The client asked to be told which model answered (in processing_end); not kept in the row, so a
        # holder that takes the session over does not tell it.
        self.report_model = report_model
        self.answered_by: str | None = None
        self.place(None)
        self.reply_id: int | None = None  # its reply's row, once saved

    def place(self, parent: int | None, *, placed: bool = False, regenerates: bool = False, with_ids: bool = False):
        """Its place in the tree: `placed`, its parent is fixed (an edit's; a regeneration's, the user message it
        answers again, `row_id` then being its empty reply row); otherwise a post's parent is the leaf when its turn
        starts. `with_ids`: its frames name its messages."""
        self.parent, self.placed, self.regenerates, self.with_ids = parent, placed, regenerates, with_ids

    @property
    def message_id(self) -> int:
        """The user message this turn answers."""
        return self.parent if self.regenerates and self.parent is not None else self.row_id
