"""chat/sessions/delivery.py without a server: a watch that missed frames gets them from its holder, in order, once
each, also when no later frame shows it the gap (a catch-up after its subscription came back); it waits out a Redis
blip; and frames that cannot be had start it over with a fresh snapshot, or end it with an error naming the
session, never a hole."""

from __future__ import annotations

import json
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chat import protocol
from chat.models import ChatSession
from chat.sessions import delivery, feed
from chat.sessions.delivery import Watch
from testkit.wait import async_wait_until

SESSION = uuid.UUID("41eb27a0-d382-40c4-ad38-fbd1cb629b7f")
HOLDER = "specific.holder!hub"


class StubSocket:
    channel_name = "specific.test!1"

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.texts: list[str] = []

    async def send_frame(self, text: str) -> None:
        self.texts.append(text)
        self.frames.append(json.loads(text))


def numbered(seq: int) -> tuple[int, str]:
    return seq, protocol.sequenced(protocol.message_delta(f"d{seq}"), SESSION, seq)


class StubHolder:
    """The holder's process as `ask` reaches it: its recent frames (`watch.replay`), where it is (`watch.join`)."""

    def __init__(self, kept: range, *, fail: int = 0) -> None:
        self.kept = [numbered(seq) for seq in kept]
        self.fail = fail  # the first asks meet a Redis that is restarting
        self.asked: list[dict] = []

    async def ask(self, channel: str, event: dict, *, timeout: float = 10.0) -> dict | None:
        self.asked.append(event)
        if self.fail:
            self.fail -= 1
            raise RedisConnectionError("Connection closed by server.")
        if event["type"] == "watch.replay":
            return {"frames": [[s, t] for s, t in self.kept if event["after"] < s <= event["upto"]]}
        return None


@pytest.fixture(autouse=True)
async def _no_watches_left():
    yield
    delivery.watching.by_session.clear()
    await delivery.holder.spawn.__self__.wait()  # the watches' `_left`, spawned as they ended


@pytest.fixture
def held(monkeypatch):
    def make(kept: range, **kwargs) -> StubHolder:
        stub = StubHolder(kept, **kwargs)
        monkeypatch.setattr(delivery, "ask", stub.ask)
        return stub

    return make


def watching(socket: StubSocket, at: int = 0) -> Watch:
    watch = Watch(socket, SESSION, resumable=False)
    watch.owner = HOLDER
    delivery.watching.by_session[SESSION] = {socket.channel_name: watch}
    watch.begin(feed.Snapshot(messages=[], partial=None, seq=at))
    return watch


async def test_a_gap_is_filled_from_the_holders_recent_frames(held):
    held(range(1, 11))
    socket = StubSocket()
    watch = watching(socket)
    for seq in (1, 2, 5, 6, 6):  # 3 and 4 never came; 6 came twice
        watch.offer(*numbered(seq))
    assert await async_wait_until(lambda: len(socket.frames) == 7, timeout=5)
    assert [f.get("seq") for f in socket.frames] == [None, 1, 2, 3, 4, 5, 6]


async def test_a_catch_up_gets_the_frames_no_later_frame_would_show_missing(held):
    """The subscription came back after the turn's last frames were published: nothing live follows them."""
    held(range(1, 11))
    socket = StubSocket()
    watch = watching(socket)
    watch.offer(*numbered(1))
    watch.catch_up(10)
    watch.offer(*numbered(9))  # a live frame arriving meanwhile, and one after: each once
    watch.offer(*numbered(11))
    assert await async_wait_until(lambda: len(socket.frames) == 12, timeout=5)
    assert [f.get("seq") for f in socket.frames[1:]] == list(range(1, 12))


async def test_a_fill_waits_out_a_redis_blip(held):
    stub = held(range(1, 6), fail=2)
    socket = StubSocket()
    watch = watching(socket)
    watch.catch_up(5)
    assert await async_wait_until(lambda: len(socket.frames) == 6, timeout=5)
    assert [f.get("seq") for f in socket.frames[1:]] == [1, 2, 3, 4, 5]
    assert len(stub.asked) == 3


async def test_frames_that_cannot_be_had_start_the_watch_over(held, monkeypatch):
    """Gone from the holder's recent frames: a fresh `session_watching`, then the frames above it, never a hole."""
    held(range(8, 11))  # 2 … 7 are no longer kept

    async def live(session_id):
        return ChatSession(id=SESSION, owner_channel=HOLDER)

    async def snapshot(watch, session, watcher):
        return feed.Snapshot(messages=[{"role": "user", "content": "hi", "status": "started"}], partial="d8", seq=8)

    monkeypatch.setattr(delivery.lifecycle, "get", live)
    monkeypatch.setattr(delivery, "take_snapshot", snapshot)
    socket = StubSocket()
    watch = watching(socket)
    watch.offer(*numbered(1))
    watch.offer(*numbered(7))
    watch.offer(*numbered(9))
    assert await async_wait_until(lambda: len(socket.frames) == 4, timeout=5)
    types = ["session_watching", "message_delta", "session_watching", "message_delta"]
    assert [f["type"] for f in socket.frames] == types
    assert socket.frames[2]["data"]["partial"] == "d8"
    assert [f.get("seq") for f in socket.frames] == [None, 1, None, 9]
    assert not watch.closed


async def test_a_watch_that_cannot_start_over_ends_with_an_error_naming_its_session(held, monkeypatch):
    held(range(0))

    async def ended(session_id):
        return None

    monkeypatch.setattr(delivery.lifecycle, "get", ended)
    socket = StubSocket()
    watch = watching(socket)
    watch.offer(*numbered(3))
    assert await async_wait_until(lambda: len(socket.frames) == 3, timeout=5)
    assert socket.texts[1:] == [
        '{"type": "error", "data": {"code": "session_ended", "message": "That session has ended; start a new one."}, '
        f'"session_id": "{SESSION}"}}',
        f'{{"type": "session_unwatched", "data": {{"session_id": "{SESSION}"}}}}',
    ]
    assert watch.closed and delivery.watched_by(socket, SESSION) is None
