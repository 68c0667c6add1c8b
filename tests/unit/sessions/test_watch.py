"""chat/sessions/watch.py without a server: a watch's delivery (snapshot first, then each frame above it once,
in order) and who may watch."""

from __future__ import annotations

import asyncio
import json
import uuid

from chat import protocol
from chat.accounts.principals import Principal
from chat.models import ChatSession
from chat.sessions import feed, watch
from chat.sessions.watch import Watch, may_watch

SESSION = uuid.UUID("41eb27a0-d382-40c4-ad38-fbd1cb629b7f")


class StubSocket:
    channel_name = "specific.test!1"

    def __init__(self, *, stall: asyncio.Event | None = None) -> None:
        self.frames: list[dict] = []
        self.stall = stall

    async def send_frame(self, text: str) -> None:
        if self.stall is not None:
            await self.stall.wait()
        self.frames.append(json.loads(text))


def numbered(seq: int, text: str = "x") -> tuple[int, str]:
    return seq, protocol.sequenced(protocol.message_delta(text), SESSION, seq)


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_snapshot_comes_first_then_only_frames_above_it_once_each_in_order():
    socket = StubSocket()
    watch_ = Watch(socket, SESSION, resumable=False)
    for seq in (3, 4, 5):  # arrived while the snapshot was being taken
        watch_.offer(*numbered(seq))
    watch_.begin(feed.Snapshot(messages=[], partial="ab", seq=4))
    for seq in (5, 6, 6, 7):  # 5 again (a holder that moved), 6 twice
        watch_.offer(*numbered(seq))
    await settled()
    assert socket.frames[0]["type"] == "session_watching" and socket.frames[0]["data"]["partial"] == "ab"
    assert [f["seq"] for f in socket.frames[1:]] == [5, 6, 7]


async def test_a_stalled_socket_does_not_hold_up_the_one_offering():
    """`offer` never waits: the frames queue for that socket alone."""
    stall = asyncio.Event()
    slow, quick = StubSocket(stall=stall), StubSocket()
    watches = [Watch(slow, SESSION, resumable=False), Watch(quick, SESSION, resumable=False)]
    for w in watches:
        w.begin(feed.Snapshot(messages=[], partial=None, seq=0))
    for seq in range(1, 101):
        for w in watches:
            w.offer(*numbered(seq))
    await settled()
    assert len(quick.frames) == 101 and slow.frames == []
    stall.set()
    await settled()
    assert [f.get("seq") for f in slow.frames[1:]] == list(range(1, 101))


async def test_session_end_ends_the_watch():
    socket = StubSocket()
    watch_ = Watch(socket, SESSION, resumable=False)
    watch.watching.by_session[SESSION] = {socket.channel_name: watch_}
    watch_.begin(feed.Snapshot(messages=[], partial=None, seq=0))
    watch_.offer(1, protocol.sequenced(protocol.session_ended_by_server(SESSION, "disconnect"), SESSION, 1))
    watch_.offer(*numbered(2))
    await settled()
    assert [f["type"] for f in socket.frames] == ["session_watching", "session_end"]
    assert watch_.closed and watch.watched_by(socket, SESSION) is None


def test_a_person_and_their_keys_count_as_one():
    by_key = ChatSession(user_id=1, api_key_id=10)
    by_page = ChatSession(user_id=1)
    by_stranger = ChatSession(user_id=2, api_key_id=20)
    person, key, other_key_of_theirs = (
        Principal(user_id=1),
        Principal(user_id=1, api_key_id=10),
        Principal(user_id=1, api_key_id=11),
    )
    assert may_watch(person, by_key) and may_watch(person, by_page)
    assert may_watch(key, by_page) and may_watch(other_key_of_theirs, by_key)
    assert not any(may_watch(p, by_stranger) for p in (person, key, other_key_of_theirs))
    assert not may_watch(Principal(), ChatSession())  # nobody's sessions are nobody's to watch
    assert not may_watch(Principal(api_key_id=30), ChatSession(api_key_id=31))
