"""A turn's reply as its client has seen it, saved as it goes (chat/turns/conversation.py's turns write it).

A reply is saved at the end of its turn, and while it streams at most R2D2_CHECKPOINT_SECONDS behind what was
sent (its row marked `incomplete` until it is done). Each save is safe to run again after a storage outage
(chat/ops/storage.py): the row's first save keeps its `created_at`, by which a save that committed unanswered
is found again, and each later one rewrites the text after what the row held.
"""

from __future__ import annotations

import asyncio
import weakref
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from chat import llm
from chat.models import MessageStatus, Role
from chat.turns import messages
from chat.turns.messages import Lease

#: The replies this process's turns are writing now (a draft lives as long as its turn, or its deferred save
#: after an outage): any other reply its sessions left `incomplete` (its last save failed: the database
#: restarted mid-turn) is interrupted by the heartbeat (chat/sessions/heartbeat.py).
_drafts: weakref.WeakSet[Draft] = weakref.WeakSet()


def streaming() -> tuple[set[int], datetime]:
    """The reply rows being written by a turn of this process, and a moment from which any reply row may be one
    too: a first save still in flight (its row id not known yet) made its row with an earlier `created_at`,
    and a turn that starts after this was asked makes its row later."""
    rows, since = set(), timezone.now()
    for draft in list(_drafts):
        if draft.row_id is not None:
            rows.add(draft.row_id)
        elif draft._created_at is not None:
            since = min(since, draft._created_at)
    return rows, since


class Draft:
    """A reply as the client has seen it, saved at the end, and while it streams at most
    R2D2_CHECKPOINT_SECONDS behind what was sent (marked incomplete until it is done)."""

    def __init__(self, lease: Lease, model: str, reply: llm.Reply, reply_to: int, *, row_id: int | None = None) -> None:
        self.lease = lease
        # The row a failure is recorded on: the user message, or a regeneration's own (empty) reply row.
        self.reply_to = reply_to
        self.model = model
        self.reply = reply
        self._parts: list[str] = []  # joined when saved: `+=` on a long reply copies it per chunk
        self._text = ""
        self.row_id: int | None = row_id  # a regeneration's own (empty) reply row, made when it was accepted
        self._saved_chars = 0  # how much of `text` the row holds
        self._created_at: datetime | None = None  # the row's, made at its first save (found again by it)
        self._loop = asyncio.get_running_loop()
        self._saved_at = self._loop.time()
        _drafts.add(self)

    def add(self, text: str) -> None:
        self._parts.append(text)

    @property
    def said(self) -> bool:
        return bool(self._parts or self._text)

    @property
    def text(self) -> str:
        """Everything said so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    async def checkpoint(self) -> None:
        interval = settings.R2D2_CHECKPOINT_SECONDS
        if interval <= 0 or self._loop.time() - self._saved_at < interval:
            return
        self._saved_at = self._loop.time()
        await self.save(MessageStatus.INCOMPLETE)

    async def save(self, status: MessageStatus) -> None:
        saving = asyncio.ensure_future(self._write(status, self.text))
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            # Cancelled (Stop, or the socket closed) while a checkpoint was being written: let it
            # finish, so the final save knows the row it wrote and appends to it.
            await saving
            raise

    async def _write(self, status: MessageStatus, text: str) -> None:
        usage = {
            "prompt_tokens": self.reply.prompt_tokens,
            "completion_tokens": self.reply.completion_tokens,
            "latency_ms": self.reply.latency_ms,
            "status": status,
        }
        if self.row_id is None and self._created_at is not None:  # a first save failed unanswered: committed?
            self.row_id = await messages.written(self.lease.session_id, Role.ASSISTANT, self._created_at)
        if self.row_id is None:
            self._created_at = self._created_at or timezone.now()
            # The model that answered (a fallback chain's member), and the one asked for.
            self.row_id = await messages.save_reply(
                self.lease,
                reply_to=self.reply_to,
                content=text,
                model=self.reply.model or self.model,
                requested_model=self.model,
                created_at=self._created_at,
                **usage,
            )
        else:
            saved, more = self._saved_chars, text[self._saved_chars :]
            await messages.extend_reply(self.lease, row_id=self.row_id, saved=saved, more=more, **usage)
        self._saved_chars = len(text)

    async def abandon(self) -> None:
        """The model failed midway (cut off, stalled, out of time): what it said is saved, marked
        interrupted, whether or not a checkpoint had saved any of it yet; nothing said, the turn failed."""
        if self.said or self.row_id is not None:
            await self.save(MessageStatus.INTERRUPTED)
        else:
            await messages.set_status(self.lease, self.reply_to, MessageStatus.FAILED)
