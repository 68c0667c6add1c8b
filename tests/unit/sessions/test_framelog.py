"""The frame log (chat/sessions/framelog.py) has no holes: appends are fenced, in order and retried, a lost log
is written back from the holder's memory, and readers find any hole. Against the real Redis (REDIS_URL), a
TCP proxy in between where a test needs the connection to fail."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from django.conf import settings

from chat.sessions import framelog
from chat.sessions import frames as local_frames
from chat.sessions.framelog import Fenced, LogWriter, SharedLog, answer
from chat.sessions.frames import LocalFrames, first_missing


def text(seq: int) -> str:
    return f'{{"type": "message_delta", "data": "word{seq} ", "seq": {seq}}}'


def frames(*seqs: int) -> list[tuple[int, str]]:
    return [(seq, text(seq)) for seq in seqs]


# Readers' check, and this process's memory (no Redis) ------------------------------------------


def test_first_missing_finds_the_hole_a_reader_must_not_forward():
    assert first_missing(frames(4, 5, 6), 3) is None
    assert first_missing([], 3) is None
    assert first_missing(frames(5, 6), 3) == 4  # the log starts above what was asked
    assert first_missing(frames(4, 6, 7), 3) == 5  # a hole in the middle


async def test_local_frames_replay_only_a_contiguous_run():
    local = LocalFrames()
    for seq in (1, 2, 4):
        local.append(seq, text(seq))
    assert local.after(0, 2) == frames(1, 2)
    assert local.after(0, 4) is None
    assert local.after(4, 4) == []


# The append script, on the real Redis --------------------------------------------------------


class Proxy:
    """A TCP proxy to the test's Redis that can drop every connection and refuse new ones (a reset, a restart),
    or hold what passes through it (Redis or the network slow)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.down = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until `restore`."""
        self.down = True
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.down = False

    def pause(self) -> None:
        """Hold everything sent either way until `resume`."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def stop(self) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def log():
    shared = SharedLog(settings.REDIS_URL)
    yield shared
    await shared.close()


@pytest.fixture
def session_id(log: SharedLog):
    session_id = uuid.uuid4()
    yield session_id
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(log.key(session_id), f"{log.key(session_id)}:meta")
    client.close()


@pytest.fixture
async def proxy():
    url = redis_url()
    server = await Proxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    yield server
    await server.stop()


def redis_url():
    from urllib.parse import urlsplit

    return urlsplit(settings.REDIS_URL)


def through(proxy: Proxy) -> str:
    url = redis_url()
    return url._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


async def seqs(log: SharedLog, session_id: uuid.UUID) -> list[int]:
    return [seq for seq, _ in (await log.after(session_id, 0)).frames]


def writer_for(log: SharedLog, session_id: uuid.UUID, *, fence: int = 1, logged: int = 0, fenced: list | None = None):
    local = LocalFrames()
    on_fenced = (lambda: fenced.append(True)) if fenced is not None else (lambda: None)
    return local, LogWriter(log, session_id=session_id, fence=fence, local=local, logged=logged, on_fenced=on_fenced)


async def produce(local: LocalFrames, writer: LogWriter, *seqs: int) -> None:
    for seq in seqs:
        local.append(seq, text(seq))
        await writer.wrote(seq, text(seq))


@pytest.mark.redis
async def test_the_log_refuses_a_jump_and_a_retry_writes_nothing_twice(log, session_id):
    """Redis itself accepts a stream id that jumps (the hole of issue 26): the append does not."""
    assert await answer(log.append(session_id, 1, frames(1, 2))) == 2
    assert await answer(log.append(session_id, 1, frames(4))) == 2  # seq 3 is missing: nothing written
    assert await seqs(log, session_id) == [1, 2]
    assert await answer(log.append(session_id, 1, frames(1, 2, 3, 4))) == 4  # a retry: 1 and 2 skipped
    kept = await log.after(session_id, 0)
    assert kept.frames == frames(1, 2, 3, 4) and (kept.start, kept.last) == (1, 4)


@pytest.mark.redis
async def test_frames_an_older_r2d2_appended_are_neither_written_over_nor_a_poison(log, session_id):
    """During a rolling deploy a holder of the previous version appends with a plain XADD, leaving the record
    of where the log ends behind: the script goes by the stream, and fails no batch for it."""
    import redis.asyncio as redis

    assert await answer(log.append(session_id, 1, frames(1, 2))) == 2
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for seq in (3, 4):
            await client.xadd(log.key(session_id), {"f": text(seq)}, id=f"{seq}-0")
        assert await answer(log.append(session_id, 1, frames(5))) == 5  # a gap by the record, not by the stream
        for seq in (6, 7):
            await client.xadd(log.key(session_id), {"f": text(seq)}, id=f"{seq}-0")
        assert await answer(log.append(session_id, 1, frames(6))) == 7  # there already: not an error
    finally:
        await client.aclose()
    assert await answer(log.append(session_id, 1, frames(8))) == 8
    assert await seqs(log, session_id) == list(range(1, 9))


@pytest.mark.redis
async def test_a_fenced_out_holders_late_appends_are_refused(log, session_id):
    fenced: list[bool] = []
    local, old = writer_for(log, session_id, fence=1, fenced=fenced)
    await produce(local, old, 1, 2, 3)
    assert await log.fence(session_id, 2) == 3  # another process took the session over
    await produce(local, old, 4)
    await old.flush(5)
    assert fenced == [True]
    assert await seqs(log, session_id) == [1, 2, 3]
    with pytest.raises(Fenced):
        await answer(log.append(session_id, 1, frames(4)))
    # The new holder goes on from where the log ends.
    new_local, new = writer_for(log, session_id, fence=2, logged=3)
    await produce(new_local, new, 4, 5)
    assert await seqs(log, session_id) == [1, 2, 3, 4, 5]


@pytest.mark.redis
async def test_a_failed_append_is_retried_in_order_and_later_frames_wait_behind_it(session_id, proxy, caplog):
    """Redis unreachable for longer than redis-py's own retries: the appends fail, the holder's frames
    go on without waiting for the log, and once Redis is back the log holds every frame, in order."""
    log = SharedLog(through(proxy))
    try:
        local, writer = writer_for(log, session_id)
        await produce(local, writer, 1, 2, 3)
        proxy.cut()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await produce(local, writer, 4, 5, 6)
        assert loop.time() - started < 3 * framelog.STALL_SECONDS  # the conversation does not stop
        assert writer.lagging
        with caplog.at_level(logging.WARNING, logger="chat.sessions.framelog"):
            await asyncio.sleep(6)  # redis-py gives up (about 10 retries, up to 1 s apart)
        assert "frame log append failed" in caplog.text
        proxy.restore()
        assert await writer.flush(15)  # no later frame needed to set it going
        assert not writer.lagging
        assert await seqs(log, session_id) == list(range(1, 7))
        await produce(local, writer, 7, 8)
        assert (await log.after(session_id, 0)).frames == frames(*range(1, 9))
    finally:
        await log.close()


@pytest.mark.redis
async def test_a_slow_log_does_not_hold_up_the_holders_frames(session_id, proxy):
    """Redis answers late: each frame waits for the log at most STALL_SECONDS, the log catches up after."""
    log = SharedLog(through(proxy))
    try:
        local, writer = writer_for(log, session_id)
        await produce(local, writer, 1, 2)
        proxy.pause()
        await asyncio.wait_for(produce(local, writer, 3, 4, 5), 3 * framelog.STALL_SECONDS)
        assert writer.lagging
        proxy.resume()
        assert await writer.flush(10)
        assert (await log.after(session_id, 0)).frames == frames(1, 2, 3, 4, 5)
    finally:
        await log.close()


@pytest.mark.redis
async def test_a_lost_log_is_written_back_by_its_live_holder(log, session_id):
    """Redis restarted empty (or failed over without the log): the holder writes back what it keeps,
    when a reader asks it to check, and at its next frame."""
    import redis.asyncio as redis

    local, writer = writer_for(log, session_id)
    await produce(local, writer, 1, 2, 3, 4, 5)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        await client.delete(log.key(session_id), f"{log.key(session_id)}:meta")
        writer.check()  # a reader found the log short
        assert await writer.flush(5)
        assert await seqs(log, session_id) == [1, 2, 3, 4, 5]

        await client.delete(log.key(session_id), f"{log.key(session_id)}:meta")
        await produce(local, writer, 6)  # the next frame finds the log empty: the holder writes it all back
        assert await writer.flush(5)
        kept = await log.after(session_id, 0)
        assert [seq for seq, _ in kept.frames] == [1, 2, 3, 4, 5, 6] and kept.start == 1
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_log_restarted_above_what_memory_keeps_says_where_it_starts(log, session_id):
    """A new holder whose log was lost keeps only its own frames (from 8): the log restarts at 8, and a
    reader asking from below is told where it starts instead of being served a hole."""
    local, writer = writer_for(log, session_id, logged=7)
    await produce(local, writer, 8, 9)
    assert await writer.flush(5)
    kept = await log.after(session_id, 3)
    assert (kept.start, kept.last) == (8, 9)
    assert first_missing(kept.frames, 3) == 4


@pytest.mark.redis
async def test_a_reader_finds_a_hole_left_by_an_unfenced_writer(log, session_id):
    """A log written as before issue 26 (a plain XADD jumps): the reader sees the hole."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for seq in (1, 2, 4):
            await client.xadd(log.key(session_id), {"f": text(seq)}, id=f"{seq}-0")
    finally:
        await client.aclose()
    kept = await log.after(session_id, 1)
    assert (kept.start, kept.last) == (1, 4)
    assert first_missing(kept.frames, 1) == 3


# This process's memory: what a client resuming here gets ------------------------------------------


async def test_a_client_gets_exactly_the_frames_it_missed():
    kept = LocalFrames()
    for seq in range(1, 6):
        kept.append(seq, f"frame {seq}")
    assert kept.after(2, 5) == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]
    assert kept.after(2, 4) == [(3, "frame 3"), (4, "frame 4")]  # up to what the holder has sent, no further
    assert kept.after(5, 5) == []  # missed nothing


async def test_frames_no_longer_kept_make_the_resume_unavailable(monkeypatch):
    """More than MAX_FRAMES since the client's last seq: None (the client gets `resume_unavailable`), never a gap."""
    monkeypatch.setattr(local_frames, "MAX_FRAMES", 3)
    kept = LocalFrames()
    for seq in range(1, 6):
        kept.append(seq, f"frame {seq}")
    assert kept.after(1, 5) is None  # frames 2 and 3 are gone
    assert kept.after(2, 5) == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]


async def test_frames_older_than_the_resume_window_are_dropped(settings):
    settings.R2D2_RESUME_WINDOW_SECONDS = 0.05
    kept = LocalFrames()
    kept.append(1, "old")
    await asyncio.sleep(0.1)  # the behaviour under test is time passing: the window is 0.05 s
    kept.append(2, "new")
    assert kept.after(0, 2) is None
    assert kept.after(1, 2) == [(2, "new")]
