"""Where the frames of resumable sessions are kept, so a client that reconnects gets what it missed.

Two places, for two kinds of resume:

- `LocalFrames`: the frames a process produced for a session it holds, in its own
  memory. A client resuming on the same process (the common case: a dropped
  connection that comes back through the same instance) is served from here; it
  needs no Redis and survives a Redis restart.
- `SharedLog`: with REDIS_URL, every frame is also appended to a Redis Stream,
  `<R2D2_CHANNEL_PREFIX>:frames:<session hex>`, whose entry ids are the frames' seqs (`<seq>-0`).
  Another process reads it to replay and to tail a session it is taking over, and
  reads the last seq from it when it becomes the holder. Beside the stream, a hash
  (`…:meta`) keeps the session's fence (the lease's, chat/turns/messages.py) and
  the seq the log starts at. Both expire R2D2_RESUME_WINDOW_SECONDS + 60 s after the
  last append; the stream keeps about MAX_FRAMES.

The log has no holes (issue 26). Redis refuses a stream id at or below the last one
but accepts a jump, so the append is one Lua script (APPEND, one call per batch of
the process's appends) that, per session, refuses a fence lower than the one
recorded (a fenced-out holder's late frames are never written; a higher fence takes
over), skips the seqs already there (a retry is harmless) and appends only the seq
that follows the log's last one, answering where the log now ends. (One call touches
the keys of every session in its batch: a single Redis, or a primary and its replicas,
not Redis Cluster.) Measured, 100 sessions x 200 frames on a private Redis (a shared,
loaded 2-core machine): this process's CPU per frame is that of the plain XADD
pipeline it replaced (23 against 28 us, 46 against 45 under heavier load); Redis's is
3 to 5 times it (7.5 to 15 us against 2 to 3). The holder's
`LogWriter` writes its session's frames in seq order from LocalFrames:

- Healthy, a frame reaches the holder's socket once the log holds it (so whatever a
  client has seen, a take-over elsewhere can replay), waiting at most STALL_SECONDS.
- An append that fails (Redis restarting, a connection reset) or is slower than
  that: the log *lags*. The holder's socket gets its frames without waiting (the
  conversation does not stop), and a background pump retries from the first frame
  the log lacks, in order, with backoff (BACKOFF_SECONDS up to MAX_BACKOFF_SECONDS);
  later frames queue behind it. It gives up after R2D2_RESUME_WINDOW_SECONDS (the
  frames are of no use to a resume any more).
- Where the log ends before the frames the holder sends (Redis restarted empty, or a
  failover lost its tail), the pump writes back what LocalFrames keeps. When memory
  no longer has the frames right after the log's end, the log restarts at the first
  frame kept, and `start` records it: a reader asking from below is told the frames
  are no longer kept, not served a hole.

A reader (chat/sessions/resume.py) checks that the frames it replays or forwards run
on from the seq it asked for (`first_missing`). While the log lags behind a live
holder, a resume elsewhere waits for it to catch up (the holder is asked to check
its log, `check`), and is refused `resume_unavailable` past that wait; a hole found
after `session_resumed` ends the resume with `session_end` `resume_failed`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from chat.ops import storage, store, throttle
from chat.ops.tasks import Background
from chat.sessions.frames import MAX_FRAMES, Frame, LocalFrames

logger = logging.getLogger(__name__)


#: How long a frame waits for the log before it goes to the holder's socket all the same (the log lags).
STALL_SECONDS = 0.5
#: The lagging log's retries: the first pause, doubled after each failure up to the last.
BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0
#: How long a holder letting a session go (a hand-over, a drain) waits for its log to hold every frame.
FLUSH_SECONDS = 10.0
#: Frames per append when the log catches up (one script call: Redis does nothing else meanwhile).
CATCH_UP_FRAMES = 1_000


# KEYS: per session, its stream then its meta hash. ARGV: the keys' ttl, the stream's length cap, then per
# session: its fence, 1 to renew the keys' ttl (else 0), 1 to restart the log at its first frame when the log
# ends before it (else 0), how many frames, then each frame's seq and text, in order. Answers, per session:
# {last, 0} (where the log ends now), or {-1, fence} (a higher fence holds the session: nothing was written).
# The meta hash keeps the fence, the last seq (one HMGET instead of reading the stream's last entry) and the
# seq the log starts at.
APPEND = """
local function stream_last(stream)
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  return #top > 0 and tonumber(string.match(top[1][1], '^%d+')) or 0
end
local ttl, cap = ARGV[1], tonumber(ARGV[2])
local answers, a = {}, 3
for k = 1, #KEYS, 2 do
  local stream, meta = KEYS[k], KEYS[k + 1]
  local fence, renew, reset, n = tonumber(ARGV[a]), ARGV[a + 1] == '1', ARGV[a + 2] == '1', tonumber(ARGV[a + 3])
  local first = a + 4
  a = first + 2 * n
  local record = redis.call('HMGET', meta, 'fence', 'last')
  local held, last = tonumber(record[1]) or 0, tonumber(record[2])
  if fence < held then
    answers[#answers + 1] = {-1, held}
  else
    local changes = {}
    if fence > held then changes[#changes + 1] = 'fence'; changes[#changes + 1] = fence end
    if not last then  -- a new log, or one written before issue 26: its stream says where it ends
      last = stream_last(stream)
      renew = true
    elseif n > 0 and tonumber(ARGV[first]) > last + 1 then  -- a gap by the record: is the stream further on?
      last = stream_last(stream)
    end
    local fresh, was = last == 0, last
    if n > 0 and reset and last < tonumber(ARGV[first]) - 1 then
      redis.call('DEL', stream)
      last, fresh = tonumber(ARGV[first]) - 1, true
    end
    for i = first, first + 2 * n - 1, 2 do
      local seq = tonumber(ARGV[i])
      if seq == last + 1 then
        local added = redis.pcall('XADD', stream, ARGV[i] .. '-0', 'f', ARGV[i + 1])
        if type(added) == 'table' and added.err then  -- the stream is ahead of its record (an older R2D2 wrote it)
          last = stream_last(stream)
        else
          if fresh then changes[#changes + 1] = 'start'; changes[#changes + 1] = seq; fresh = false end
          last = seq
        end
      elseif seq > last + 1 then
        break
      end
    end
    if last ~= was then
      changes[#changes + 1] = 'last'; changes[#changes + 1] = last
      if redis.call('XLEN', stream) > cap then
        redis.call('XTRIM', stream, 'MAXLEN', '~', cap)
        local bottom = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
        changes[#changes + 1] = 'start'; changes[#changes + 1] = tonumber(string.match(bottom[1][1], '^%d+'))
      end
    end
    if #changes > 0 then redis.call('HSET', meta, unpack(changes)) end
    if renew then
      redis.call('EXPIRE', stream, ttl)
      redis.call('EXPIRE', meta, ttl)
    end
    answers[#answers + 1] = {last, 0}
  end
end
return answers
"""


@dataclass(frozen=True)
class Kept:
    """What a session's log holds: the seq it starts at and ends at (0, 0 when empty), and the frames asked for."""

    start: int
    last: int
    frames: list[Frame]


class SharedLog:
    """The Redis Stream of each resumable session's frames (see the module docstring)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url  # None: REDIS_URL's (tests give another, through a proxy)
        self._batches: dict[asyncio.AbstractEventLoop, list[_Append]] = {}
        self._committing: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self._renewed: dict[uuid.UUID, float] = {}  # when each session's keys last had their expiry renewed
        self._script = None

    def _redis(self):
        return store.client(decode=True, url=self.url)  # this event loop's (chat/ops/store.py)

    @staticmethod
    def key(session_id: uuid.UUID) -> str:
        return store.key("frames", session_id.hex)  # R2D2_CHANNEL_PREFIX first, as every key

    def _meta(self, session_id: uuid.UUID) -> str:
        return f"{self.key(session_id)}:meta"

    def append(self, session_id: uuid.UUID, fence: int, frames: list[Frame], *, reset: bool = False) -> Answer:
        """Append `frames` (in seq order) to the session's log under `fence`. The future gives the seq the log
        ends at after it (below the frames' last: the log lacks what comes before them), raises `Fenced` (a
        higher fence holds the session: nothing was written) or Redis's error (nothing known); or, when Redis
        has not answered within STALL_SECONDS, a future of that answer (`answer` waits for it).

        Appends made while a script is in flight are sent together in the next (a group commit): one round
        trip per batch instead of one per frame (measured: 0.60x the turns/s of plain sessions with a round
        trip per frame, 100 streaming sessions on one process)."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = []
            task = loop.create_task(self._commit(loop))
            self._committing.add(task)
            task.add_done_callback(self._committing.discard)
        entry = _Append(session_id, fence, frames, reset, loop.create_future())
        batch.append(entry)
        return entry.done

    async def _commit(self, loop: asyncio.AbstractEventLoop) -> None:
        await asyncio.sleep(0)  # let the other sessions' frames of this loop turn join
        batch = self._batches.pop(loop)
        now = loop.time()
        if len(self._renewed) > 10_000:  # forget sessions renewed long ago (most have ended)
            self._renewed = {key: when for key, when in self._renewed.items() if now - when < 60}
        keys: list[str] = []
        args: list[int | str] = [max(1, int(settings.R2D2_RESUME_WINDOW_SECONDS) + 60), MAX_FRAMES]
        for entry in batch:
            keys += [self.key(entry.session_id), self._meta(entry.session_id)]
            # The keys outlive the window by a minute: renewing them once a minute per session is enough
            # (the script renews a log it finds without a record, such as one Redis lost, at once).
            renew = now - self._renewed.get(entry.session_id, float("-inf")) >= 60
            if renew:
                self._renewed[entry.session_id] = now
            args += [entry.fence, int(renew), int(entry.reset), len(entry.frames)]
            for seq, text in entry.frames:
                args += [seq, text]
        # One timer per batch, not one per frame (asyncio.wait with a timeout per frame: 17 us against 5 us).
        stall = loop.call_later(STALL_SECONDS, _stalled, batch)
        try:
            client = self._redis()
            if self._script is None:
                self._script = client.register_script(APPEND)
            answers = await self._script(keys=keys, args=args, client=client)
        except Exception as exc:
            for entry in batch:
                entry.settle(exception=exc)
            return
        finally:
            stall.cancel()
        for entry, (last, fence) in zip(batch, answers, strict=True):
            if last < 0:
                entry.settle(exception=Fenced(fence))
            else:
                entry.settle(last)

    async def fence(self, session_id: uuid.UUID, fence: int) -> int:
        """Record `fence` as the session's (a new holder's, on taking it over): from now on the log refuses the
        old holder's appends. The seq the log ends at."""
        return await answer(self.append(session_id, fence, []))

    async def after(self, session_id: uuid.UUID, seq: int) -> Kept:
        """Every kept frame with a seq above `seq`, in order, with where the log starts and ends. A read: retried
        through a Redis blip (a resume asked while Redis restarts is answered once it is back)."""
        return await storage.retry(lambda: self._after(session_id, seq))

    async def _after(self, session_id: uuid.UUID, seq: int) -> Kept:
        key = self.key(session_id)
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.hget(self._meta(session_id), "start")
            pipe.xrange(key, min="-", max="+", count=1)
            pipe.xrevrange(key, max="+", min="-", count=1)
            pipe.xrange(key, min=f"{seq + 1}-0", max="+")
            start, bottom, top, entries = await pipe.execute()
        last = _frame(top[0])[0] if top else 0
        # A log written before issue 26 has no recorded start: its first entry is where it starts.
        first = max(int(start or 0), _frame(bottom[0])[0]) if bottom else 0
        return Kept(start=first, last=last, frames=[_frame(entry) for entry in entries])

    async def tail(self, session_id: uuid.UUID, seq: int, block_ms: int) -> list[Frame]:
        """Frames above `seq`, waiting up to `block_ms` for the first one (retried through a Redis blip)."""
        read = lambda: self._redis().xread({self.key(session_id): f"{seq}-0"}, block=block_ms)  # noqa: E731
        window = storage.window()  # the blocking read's own wait on top (none at all: retries off)
        found = await storage.retry(read, within=window + block_ms / 1000 + 1 if window else 0)
        return [_frame(entry) for _, entries in found for entry in entries]

    async def close(self) -> None:
        """Close this event loop's Redis clients (chat/ops/store.py's: a test's loop ending)."""
        await store.close()


#: An append's answer (see SharedLog.append).
Answer = asyncio.Future["int | asyncio.Future[int]"]


async def answer(pending: Answer) -> int:
    """The seq the log ends at after an append, however long Redis takes to say it (raising Fenced or its error)."""
    result = await pending
    return await result if isinstance(result, asyncio.Future) else result


@dataclass(slots=True)
class _Append:
    session_id: uuid.UUID
    fence: int
    frames: list[Frame]
    reset: bool
    done: Answer
    late: asyncio.Future[int] | None = None  # the answer, once `done` said it is slow

    def settle(self, result: int | None = None, *, exception: BaseException | None = None) -> None:
        future = self.late or self.done
        if future.done():  # its waiter was cancelled
            return
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def _stalled(batch: list[_Append]) -> None:
    """Redis has not answered the batch within STALL_SECONDS: its waiters are told so, and given a future of the
    answer instead (the holders' sockets stop waiting for the log)."""
    for entry in batch:
        if not entry.done.done():
            entry.late = entry.done.get_loop().create_future()
            entry.done.set_result(entry.late)


class Fenced(Exception):
    """The log is held under a higher fence: another process took the session over."""

    def __init__(self, fence: int) -> None:
        super().__init__(fence)
        self.fence = fence


class LogWriter:
    """Writes one held session's frames to the shared log, in seq order, from its LocalFrames (see the module
    docstring): inline while the log keeps up, by a background pump while it lags."""

    __slots__ = (
        "log",
        "session_id",
        "fence",
        "local",
        "produced",
        "logged",
        "_on_fenced",
        "_pumping",
        "_inline",
        "_check",
        "_closed",
    )

    def __init__(
        self,
        log: SharedLog,
        *,
        session_id: uuid.UUID,
        fence: int,
        local: LocalFrames,
        logged: int,
        on_fenced: Callable[[], None],
    ) -> None:
        self.log = log
        self.session_id = session_id
        self.fence = fence
        self.local = local
        self.produced = logged  # the last seq this holder produced (it is in `local`)
        self.logged = logged  # where the log ended at its last answer
        self._on_fenced = on_fenced
        self._pumping = False  # the background pump is catching the log up
        self._inline = False  # an inline append is in flight
        self._check = False  # a reader found the log short: check where it ends
        self._closed = False

    @property
    def lagging(self) -> bool:
        return self._pumping

    async def wrote(self, seq: int, text: str) -> None:
        """`seq` was produced (it is in LocalFrames): back once the log holds it, or at once while the log lags
        (the pump appends it behind the frames before it). Called in seq order; never raises."""
        self.produced = max(self.produced, seq)
        if self._closed or self._pumping:
            return
        if self.logged != seq - 1:  # a frame before it has not been sent (its sender was cancelled)
            self._start_pump(None)
            return
        pending = self.log.append(self.session_id, self.fence, [(seq, text)])
        self._inline = True
        try:
            result = await pending
        except asyncio.CancelledError:  # its sender was stopped: the frame goes to the log all the same
            self._start_pump(None)
            raise
        except Exception:  # failed (or fenced): the pump takes it from here
            self._start_pump(pending)
            return
        finally:
            self._inline = False
        if isinstance(result, asyncio.Future):  # slow: the pump waits for its answer, and the socket does not
            self._start_pump(pending)
            return
        self.logged = result
        if self.logged < self.produced or self._check:
            self._start_pump(None)

    def check(self) -> None:
        """A reader found the log short of what this holder produced (lost in a Redis restart, or lagging):
        find where it ends and write what it lacks."""
        if self._closed or self.produced == 0:
            return
        self._check = True
        if not self._pumping and not self._inline:
            self._start_pump(None)

    async def flush(self, timeout: float, *, check: bool = False) -> bool:
        """Wait, at most `timeout`, for the log to hold every frame produced; whether it does."""
        if check:
            self.check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled: a flush happens at a hand-over or a release, not per frame.
        while (self._pumping or self._inline) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return not self._pumping and not self._inline and self.logged >= self.produced

    def close(self) -> None:
        """Write nothing more (the session was taken over)."""
        self._closed = True

    def _start_pump(self, pending: Answer | None) -> None:
        self._pumping = True
        _pumps(self._catch_up(pending))

    async def _catch_up(self, pending: Answer | None) -> None:
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        backoff = BACKOFF_SECONDS
        extra = {"session_id": str(self.session_id)}
        try:
            while not self._closed:
                if pending is None:
                    if self._check:
                        self._check = False
                        self.logged = min(self.logged, self.produced - 1)  # resend the last frame: where is the log?
                    if self.logged >= self.produced:
                        break
                    frames, reset = self._unlogged()
                    if not frames:  # nothing kept to write: the next frame restarts the log
                        break
                    pending = self.log.append(self.session_id, self.fence, frames, reset=reset)
                try:
                    self.logged = await answer(pending)
                    backoff = BACKOFF_SECONDS
                except Fenced:
                    self._closed = True
                    self._on_fenced()
                    return
                except Exception as exc:  # Redis restarting, a connection reset: try again, in order
                    now = loop.time()
                    if failing_since is None:
                        failing_since = now
                        throttle.warn_throttled(
                            logger,
                            "frame log append failed",
                            key="frame log",
                            extra={**extra, "error": type(exc).__name__},
                        )
                    elif now - failing_since > settings.R2D2_RESUME_WINDOW_SECONDS:
                        logger.warning("frame log given up", extra={**extra, "lag": self.produced - self.logged})
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)
                finally:
                    pending = None
            if failing_since is not None:
                seconds = round(loop.time() - failing_since, 3)
                throttle.warn_throttled(
                    logger, "frame log caught up", key="frame log", extra={**extra, "seconds": seconds}
                )
        finally:
            self._pumping = False

    def _unlogged(self) -> tuple[list[Frame], bool]:
        """The frames the log lacks, from the first after its end, and whether the log must restart at them
        (memory no longer has the frames right after its end)."""
        frames = self.local.after(self.logged, self.produced)
        if frames is not None:
            return frames[:CATCH_UP_FRAMES], False
        first = self.local.first
        if first is None:
            return [], False
        return (self.local.after(first - 1, self.produced) or [])[:CATCH_UP_FRAMES], True


#: The writers' pumps, held until they end (a failure logged).
_pumps = Background("frame log catch-up").spawn


def _frame(entry: tuple[str, dict[str, str]]) -> Frame:
    entry_id, fields = entry
    return int(entry_id.split("-", 1)[0]), fields["f"]


def shared() -> SharedLog | None:
    """The shared log when this deployment has Redis (several processes); None on the embedded defaults."""
    return store.one("frame log", memory=None, redis=SharedLog)


def writer(
    session_id: uuid.UUID, fence: int, local: LocalFrames, *, logged: int, on_fenced: Callable[[], None]
) -> LogWriter | None:
    """The writer of a session held here, when this deployment has a shared log."""
    log = shared()
    if log is None:
        return None
    return LogWriter(log, session_id=session_id, fence=fence, local=local, logged=logged, on_fenced=on_fenced)
