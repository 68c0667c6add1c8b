"""chat/sessions/framelog.py: the frames a resuming client gets back, from this process's memory and from Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.conf import settings as django_settings

from chat.sessions import framelog
from chat.sessions.framelog import LocalFrames, SharedLog


async def test_a_client_gets_exactly_the_frames_it_missed():
    frames = LocalFrames()
    for seq in range(1, 6):
        frames.append(seq, f"frame {seq}")
    assert frames.after(2, 5) == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]
    assert frames.after(2, 4) == [(3, "frame 3"), (4, "frame 4")]  # up to what the holder has sent, no further
    assert frames.after(5, 5) == []  # missed nothing


async def test_frames_no_longer_kept_make_the_resume_unavailable(monkeypatch):
    """More than MAX_FRAMES since the client's last seq: None (the client gets `resume_unavailable`), never a gap."""
    monkeypatch.setattr(framelog, "MAX_FRAMES", 3)
    frames = LocalFrames()
    for seq in range(1, 6):
        frames.append(seq, f"frame {seq}")
    assert frames.after(1, 5) is None  # frames 2 and 3 are gone
    assert frames.after(2, 5) == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]


async def test_frames_older_than_the_resume_window_are_dropped(settings):
    settings.R2D2_RESUME_WINDOW_SECONDS = 0.05
    frames = LocalFrames()
    frames.append(1, "old")
    await asyncio.sleep(0.1)  # the behaviour under test is time passing: the window is 0.05 s
    frames.append(2, "new")
    assert frames.after(0, 2) is None
    assert frames.after(1, 2) == [(2, "new")]


@pytest.fixture
async def shared_log():
    log = SharedLog(django_settings.REDIS_URL)
    session_id = uuid.uuid4()
    yield log, session_id
    await log._redis().delete(log.key(session_id))
    await log.close()


@pytest.mark.redis
async def test_the_shared_log_replays_in_order_and_knows_the_last_seq(shared_log):
    log, session_id = shared_log
    assert await log.last_seq(session_id) == 0
    await asyncio.gather(*(log.append(session_id, seq, f"frame {seq}") for seq in (1, 2, 3)))
    assert await log.after(session_id, 1) == [(2, "frame 2"), (3, "frame 3")]
    assert await log.last_seq(session_id) == 3
    assert await log.tail(session_id, 2, block_ms=10) == [(3, "frame 3")]


@pytest.mark.redis
async def test_the_shared_log_refuses_a_seq_written_twice(shared_log):
    """Redis orders the entries: a second writer of seq 2 (a holder that lost the session) changes nothing."""
    log, session_id = shared_log
    await log.append(session_id, 1, "first")
    await log.append(session_id, 2, "the holder's")
    await log.append(session_id, 2, "a stale holder's")
    assert await log.after(session_id, 0) == [(1, "first"), (2, "the holder's")]
