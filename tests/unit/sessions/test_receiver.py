"""chat/sessions/receiver.py without Redis: the one receive loop of the hub, the watches' channel and their
subscription outlives failed receives (reconnecting before it receives again, logged once each way) and one
message its handler fails on."""

from __future__ import annotations

import asyncio
import logging

import pytest
from channels.layers import get_channel_layer
from redis.exceptions import ConnectionError as RedisConnectionError

from chat.sessions.receiver import ProcessChannel, receive_forever


async def test_the_loop_reconnects_after_failures_and_goes_on(caplog):
    script: list[object] = ["a", RedisConnectionError("gone"), RedisConnectionError("still gone"), "b", "boom", "c"]
    handled: list[str] = []
    reconnects: list[int] = []
    done = asyncio.Event()

    async def receive() -> str:
        if not script:
            await asyncio.Event().wait()  # nothing more comes
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        if not script:
            done.set()
        return item

    async def reconnect() -> None:
        reconnects.append(len(script))

    def handle(item: str) -> None:
        if item == "boom":
            raise ValueError("a bad message")
        handled.append(item)

    caplog.set_level(logging.INFO, logger="chat.sessions.receiver")
    task = asyncio.create_task(receive_forever("test", receive, handle, reconnect=reconnect))
    await asyncio.wait_for(done.wait(), 5)
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handled == ["a", "b", "c"]
    assert reconnects == [4, 3]  # before each receive that followed a failure, none after it succeeded
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["receive failed", "receiving again", "received message not handled"]


async def test_a_process_channel_is_made_once_per_loop_and_receives():
    got: list[dict] = []
    fresh: list[bool] = []
    inbox = ProcessChannel("test", got.append, fresh=lambda: fresh.append(True))
    names = await asyncio.gather(inbox.name(), inbox.name())
    assert names[0] == names[1] == await inbox.name() and fresh == [True]
    await get_channel_layer().send(names[0], {"type": "x"})
    try:
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [{"type": "x"}]
    finally:
        inbox._task.cancel()
