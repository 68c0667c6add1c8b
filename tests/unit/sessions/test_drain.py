"""chat/sessions/drain.py without a server: what a SIGTERM'd process does, in order, with stand-in sessions and sockets.

The holders are stand-ins (a turn that is busy for a while, `stop_for_drain` recorded); the sockets record their close.
"""

from __future__ import annotations

import asyncio

import pytest

from chat.edge.daphne import CLOSE_SERVICE_RESTART
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import drain, holder


class Turns:
    def __init__(self, busy_for: float) -> None:
        self._until = asyncio.get_running_loop().time() + busy_for

    @property
    def busy(self) -> bool:
        return asyncio.get_running_loop().time() < self._until


class StubHolder:
    def __init__(self, busy_for: float = 0.0, resumable: bool = False) -> None:
        self.conversation = Turns(busy_for)
        self.resumable = resumable
        self.stopped_busy: bool | None = None  # whether its turn was still running when it was stopped

    async def stop_for_drain(self) -> None:
        self.stopped_busy = self.conversation.busy


class StubSocket:
    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def send_frame(self, text: str) -> None:
        pass

    async def close(self, code: int | None = None) -> None:
        self.closed_with = code

    def dropped(self, session_id) -> None:
        pass


@pytest.fixture(autouse=True)
def _not_draining(monkeypatch):
    """Draining is the process's state: each test starts, and leaves, a process that is not."""
    monkeypatch.setattr(drain, "draining", False)
    monkeypatch.setattr(drain, "_sockets", type(drain._sockets)())


def hold(monkeypatch, *holders: StubHolder) -> None:
    monkeypatch.setattr(holder, "held_here", lambda: list(holders))


async def test_new_work_is_refused_with_server_draining_once_draining(monkeypatch):
    hold(monkeypatch)
    drain.refuse_if_draining()  # not draining: nothing refused
    await drain.drain(seconds=0)
    with pytest.raises(ClientError) as refused:
        drain.refuse_if_draining()
    assert refused.value.code == ErrorCode.SERVER_DRAINING


async def test_turns_in_progress_end_before_sessions_are_stopped_and_sockets_closed(monkeypatch):
    working, idle = StubHolder(busy_for=0.3), StubHolder()
    hold(monkeypatch, working, idle)
    sockets = [StubSocket(), StubSocket()]
    for socket in sockets:
        drain.watch(socket)
    await drain.drain(seconds=10)
    assert working.stopped_busy is False and idle.stopped_busy is False  # stopped after the turn ended
    assert [socket.closed_with for socket in sockets] == [CLOSE_SERVICE_RESTART] * 2


async def test_a_turn_still_running_at_the_deadline_is_stopped(monkeypatch):
    stuck = StubHolder(busy_for=3600)
    hold(monkeypatch, stuck)
    socket = StubSocket()
    drain.watch(socket)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await drain.drain(seconds=0.2)
    assert stuck.stopped_busy is True  # cut short: its turn is interrupted (Holder.stop_for_drain)
    assert socket.closed_with == CLOSE_SERVICE_RESTART
    assert loop.time() - started < 3  # the deadline (0.2 s), then the close frames' 0.5 s: not the turn's hour
