"""Waiting for a condition instead of a fixed sleep: as fast as the machine allows, patient when it is busy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last answer as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def async_wait_until(
    predicate: Callable[[], object | Awaitable[object]], timeout: float = 20.0, interval: float = 0.05
) -> bool:
    """`wait_until` on the event loop: `predicate` may be a plain or an async function (a database read)."""

    async def check() -> bool:
        answer = predicate()
        if asyncio.iscoroutine(answer):
            answer = await answer
        return bool(answer)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return await check()
