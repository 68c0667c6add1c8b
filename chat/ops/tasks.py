"""Work in the background that must neither be lost nor fail silently.

The event loop keeps only a weak reference to a task: one nobody holds may be collected
before it ends. A `Background` holds its tasks until they end, logs a failure with its
traceback (the work's own name says what failed), and can be waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Background:
    """One kind of background work (`what` names it in the log when one fails)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", self.what, exc_info=task.exception())

    async def wait(self) -> None:
        """Until every task started, and every task those start, has ended (tests; a process stopping)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
