"""How this process receives what other processes send it, so that a Redis restart or a killed connection costs it
nothing: one receive loop (`receive_forever`) for its own channel-layer channels (the hub's, chat/sessions/hub.py;
the watches', chat/sessions/watch.py) and for the watches' Redis subscription (chat/sessions/subscription.py), and
one way to keep a channel-layer channel of its own per event loop (`ProcessChannel`).

A failed receive is logged once when the failures start and once when they end, and tried again with backoff
(chat/ops/storage.py's delays: at once, then doubling up to a second, jittered), for as long as it takes: the
process needs its channels back whenever Redis is. A receiver that loses something when its connection drops
(a subscription: what was published meanwhile never reaches it) is given `reconnect`, awaited before each
receive that follows a failure; it fetches what was lost (or starts that) and raises while Redis is still away.

The channel layer's own receive (chat/channel_layer.py) already outlives Redis (it retries inside, and a channel
of this process needs nothing registered again), so its loops meet no failure here but a bug's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from channels.layers import get_channel_layer

from chat.ops import storage

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def receive_forever(
    what: str,
    receive: Callable[[], Awaitable[T]],
    handle: Callable[[T], object],
    *,
    reconnect: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """`handle(await receive())`, over and over, until cancelled; through failures as the module docstring says.
    `handle` must not wait (it queues, or spawns what waits): the next receive comes after it."""
    loop = asyncio.get_running_loop()
    failing_since: float | None = None
    delay = 0.0
    while True:
        try:
            if failing_since is not None and reconnect is not None:
                await reconnect()
            item = await receive()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if failing_since is None:
                failing_since = loop.time()
                logger.warning("receive failed", extra={"receiver": what, "error": type(exc).__name__})
            delay = min(storage.MAX_DELAY, max(storage.FIRST_DELAY, 2 * delay))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            continue
        if failing_since is not None:
            seconds = round(loop.time() - failing_since, 3)
            logger.warning("receiving again", extra={"receiver": what, "seconds": seconds})
            failing_since, delay = None, 0.0
        try:
            handle(item)
        except Exception:  # one bad message must not stop the process's channel
            logger.exception("received message not handled", extra={"receiver": what})


class ProcessChannel:
    """A channel-layer channel of this process's own, made at first use on each event loop (tests run several),
    with the one task receiving on it; `handle` gets each message, `fresh` runs when a new channel is made
    (what was kept for the old one is of no use)."""

    def __init__(
        self, what: str, handle: Callable[[dict[str, Any]], object], *, fresh: Callable[[], None] | None = None
    ) -> None:
        self.what = what
        self._handle = handle
        self._fresh = fresh
        self._name: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def name(self) -> str:
        loop = asyncio.get_running_loop()
        if self._name is None or self._loop is not loop or self._task is None or self._task.done():
            layer = get_channel_layer()
            name = await layer.new_channel()
            if self._loop is not loop or self._task is None or self._task.done():  # nobody made one meanwhile
                if self._fresh is not None:
                    self._fresh()
                self._name, self._loop = name, loop
                self._task = loop.create_task(
                    receive_forever(self.what, lambda: layer.receive(name), self._handle), name=f"r2d2-{self.what}"
                )
        assert self._name is not None
        return self._name
