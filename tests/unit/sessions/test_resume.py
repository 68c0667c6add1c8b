"""Take-over forwarding (chat/sessions/resume.py) never sends a hole, against the real Redis (REDIS_URL)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as redis
from django.conf import settings

from chat.sessions import resume
from chat.sessions.framelog import SharedLog

pytestmark = pytest.mark.redis


class Recorder:
    """A client's socket as the session code sees it (chat/sessions/socket.py), keeping what it is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_frame(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int | None = None) -> None:
        pass

    def dropped(self, session_id: uuid.UUID) -> None:
        pass


@pytest.fixture
async def log_with_a_hole():
    """A session's log holding seqs 1, 2, 3 and 5 (as an append that failed used to leave it)."""
    log, session_id = SharedLog(settings.REDIS_URL), uuid.uuid4()
    client = redis.Redis.from_url(settings.REDIS_URL)
    for seq in (1, 2, 3, 5):
        await client.xadd(log.key(session_id), {"f": f"frame {seq}"}, id=f"{seq}-0")
    yield log, session_id
    await client.delete(log.key(session_id))
    await client.aclose()
    await log.close()


@pytest.mark.parametrize("block_ms", [0, 100])
async def test_forwarding_stops_before_a_hole(log_with_a_hole, block_ms):
    """Reading the log to its end (after the claim) or tailing it (during the hand-over): the client gets
    the frames up to the hole, then nothing more (the take-over ends with `session_end` `resume_failed`)."""
    log, session_id = log_with_a_hole
    socket = Recorder()
    with pytest.raises(resume._Hole):
        await resume._forward(socket, log, session_id, 1, block_ms=block_ms)
    assert socket.sent == ["frame 2", "frame 3"]
    assert await resume._forward(socket, log, session_id, 5, block_ms=block_ms) == 5  # nothing after 5
    assert socket.sent == ["frame 2", "frame 3"]
