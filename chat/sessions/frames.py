"""A resumable session's frames in the memory of the process that holds it, and the check every reader of
frames makes. A client resuming on the same process (the common case: a dropped connection that comes back
through the same instance) is served from `LocalFrames`; it needs no Redis and survives a Redis restart. The
shared log (chat/sessions/framelog.py) writes back from it what Redis lost.
"""

from __future__ import annotations

import asyncio
from collections import deque

from django.conf import settings

#: Frames kept per session. A client that missed more than this gets `resume_unavailable`
#: (its transcript is in the database all the same).
MAX_FRAMES = 10_000

Frame = tuple[int, str]  # (seq, the frame's text)


class LocalFrames:
    """A session's recent frames in this process's memory: kept for the resume window,
    at most MAX_FRAMES."""

    def __init__(self) -> None:
        self._frames: deque[tuple[int, float, str]] = deque()
        self._loop = asyncio.get_running_loop()

    def append(self, seq: int, frame: str) -> None:
        now = self._loop.time()
        self._frames.append((seq, now, frame))
        horizon = now - settings.R2D2_RESUME_WINDOW_SECONDS
        while self._frames and (len(self._frames) > MAX_FRAMES or self._frames[0][1] < horizon):
            self._frames.popleft()

    @property
    def first(self) -> int | None:
        """The seq of the oldest frame kept (None: none)."""
        return self._frames[0][0] if self._frames else None

    def after(self, seq: int, upto: int) -> list[Frame] | None:
        """Frames seq+1 … upto, or None when some of them are no longer kept."""
        if seq >= upto:
            return []
        frames = [(s, text) for s, _, text in self._frames if seq < s <= upto]
        if not frames or first_missing(frames, seq) is not None or frames[-1][0] != upto:
            return None
        return frames


def first_missing(frames: list[Frame], after: int) -> int | None:
    """The first seq missing from `frames` for them to run on from `after` (after+1, after+2, …); None
    when they do. Every reader checks this: a hole is never forwarded."""
    expected = after + 1
    for seq, _ in frames:
        if seq != expected:
            return expected
        expected += 1
    return None
