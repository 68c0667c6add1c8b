"""A principal's quota counters and where they live: Redis (one Lua script to admit, one to adjust: atomic, one
round trip each, each run once per call however often a connection error makes it sent again) when REDIS_URL is
set, this process's memory otherwise; and an anonymous socket's own (`Tally`).

Money is counted in whole nano-dollars (chat/ops/prices.py). Admission and settlement are
chat/accounts/reservations.py; what a principal used, chat/accounts/quotas.py.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from django.conf import settings

from chat.ops import prices, storage, store

if TYPE_CHECKING:
    from chat.accounts.principals import Principal

DAY = 86_400
MINUTE_TTL = 120
DAY_TTL = 2 * DAY
MONTH_TTL = 32 * DAY

# The four counters of a principal, in this order everywhere: messages this minute, tokens
# today, nano-dollars today, nano-dollars this month.
MESSAGES, TOKENS, USD_DAY, USD_MONTH = range(4)


def counter_keys(principal: Principal, now: float) -> tuple[str, ...]:
    """The counters' names for the periods `now` is in (a reservation keeps them: its turn is charged to the
    day it was admitted in), then the two "warned" marks."""
    moment = datetime.fromtimestamp(now, UTC)
    who = principal.quota_key
    day, month = f"{moment:%Y%m%d}", f"{moment:%Y%m}"
    return (
        f"{who}:m:{int(now // 60)}",
        f"{who}:t:{day}",
        f"{who}:d:{day}",
        f"{who}:M:{month}",
        f"{who}:wd:{day}",
        f"{who}:wM:{month}",
    )


def usd_to_nano(usd: float) -> int:
    return round(usd * prices.NANO) if usd > 0 else 0


def limits_of(principal: Principal) -> tuple[int, int, int, int]:
    limits = principal.limits
    return (
        max(0, limits.messages_per_minute),
        max(0, limits.tokens_per_day),
        usd_to_nano(limits.usd_per_day),
        usd_to_nano(limits.usd_per_month),
    )


def next_day(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def next_month(now: float) -> float:
    first = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1).timestamp()


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class Tally:
    """One socket's own figures, what `chatbot_usage` answers an anonymous connection (made at its first message)."""

    __slots__ = ("minute", "messages", "day", "tokens", "usd_day", "month", "usd_month")

    def __init__(self) -> None:
        self.minute = self.messages = self.day = self.tokens = self.usd_day = self.month = self.usd_month = 0

    def message(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self.minute:
            self.minute, self.messages = minute, 0
        self.messages += 1

    def unmessage(self) -> None:
        self.messages = max(0, self.messages - 1)

    def spent(self, tokens: int, nano: int, now: float) -> None:
        self.figures(now)  # a new day or month starts from 0
        self.tokens += tokens
        self.usd_day += nano
        self.usd_month += nano

    def figures(self, now: float) -> tuple[int, int, int, int]:
        moment = datetime.fromtimestamp(now, UTC)
        day, month = int(f"{moment:%Y%m%d}"), int(f"{moment:%Y%m}")
        if day != self.day:
            self.day, self.tokens, self.usd_day = day, 0, 0
        if month != self.month:
            self.month, self.usd_month = month, 0
        messages = self.messages if self.minute == int(now // 60) else 0
        return messages, self.tokens, self.usd_day, self.usd_month


# Where the counters live ----------------------------------------------------------------------

#: (index of the counter past 80% of its money limit, its total) for each limit crossed now.
Crossed = list[tuple[int, int]]

#: A queued message's reservation as recorded in the shared counters: (its session's id, its row, the fence
#: of the holder that may settle it). A process killed with messages queued leaves these; the holder that
#: takes the session over adopts them under its own fence, so exactly one process settles each.
Kept = tuple[str, int, int]


class Counters(Protocol):
    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        """Add `messages`, `tokens` and `nano` unless one would pass its limit (0: none); returns (the
        index of the counter that refused, or None; the four counters before)."""

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
    ) -> Crossed:
        """Add (or give back) amounts; the money counters that now passed 80% of `warn` (nano-dollars per
        day, per month; 0: none) for the first time in their period. With `kept`: only if that record of a
        reservation is still there under that fence, and it goes in the same step (settled exactly once)."""

    async def read(self, keys: tuple[str, ...]) -> list[int]: ...

    async def keep(self, kept: Kept, record: str) -> bool:
        """Record a queued message's reservation where another process can find it; False when these
        counters die with this process (nothing to find)."""

    async def adopt(self, session_id: str, fence: int, row_ids: Sequence[int] | None) -> dict[int, str]:
        """The records of those messages (None: all) an earlier holder kept (fence below `fence`), now under
        `fence`."""


_TTLS = (MINUTE_TTL, DAY_TTL, DAY_TTL, MONTH_TTL)


class MemoryCounters:
    """One process's counters: enough when there is one process (no REDIS_URL)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()  # event loops of other threads (tests, the admin) share them

    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        need = (messages, tokens, nano, nano)
        with self._lock:
            used = [self._get(key) for key in keys[:4]]
            for index in range(4):
                if limits[index] > 0 and used[index] + need[index] > limits[index]:
                    return index, used
            for index in range(4):
                if need[index]:
                    self._add(keys[index], need[index], _TTLS[index])
        return None, used

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
    ) -> Crossed:
        crossed: Crossed = []  # `kept`: never, see `keep`
        with self._lock:
            totals = [self._add(keys[index], delta, _TTLS[index]) for index, delta in enumerate((messages, tokens))]
            totals += [self._add(keys[index], nano, _TTLS[index]) for index in (USD_DAY, USD_MONTH)]
            for index, limit, mark in ((USD_DAY, warn[0], keys[4]), (USD_MONTH, warn[1], keys[5])):
                if limit > 0 and totals[index] * 5 >= limit * 4 and not self._get(mark):
                    self._add(mark, 1, _TTLS[index])
                    crossed.append((index, totals[index]))
        return crossed

    async def read(self, keys: tuple[str, ...]) -> list[int]:
        with self._lock:
            return [self._get(key) for key in keys[:4]]

    async def keep(self, kept: Kept, record: str) -> bool:
        return False  # no other process shares these counters: a reservation lives and dies with its turn

    async def adopt(self, session_id: str, fence: int, row_ids: Sequence[int] | None) -> dict[int, str]:
        return {}

    def _get(self, key: str) -> int:
        value, expires = self._values.get(key, (0, 0.0))
        return value if expires > time.time() else 0

    def _add(self, key: str, amount: int, ttl: int) -> int:
        now = time.time()
        value, expires = self._values.get(key, (0, 0.0))
        if expires <= now:
            if not amount:
                return 0
            value, expires = 0, now + ttl
            self._forget_expired(now)
        value = max(0, value + amount)
        self._values[key] = (value, expires)
        return value

    def _forget_expired(self, now: float) -> None:
        if len(self._values) > 10_000:
            self._values = {k: v for k, v in self._values.items() if v[1] > now}


# Admission: check every limit against what is used, then add the message and its reservation, or
# nothing. KEYS: the four counters, then the call's record. ARGV: their four limits (0: none), the messages
# (1, or 0 for a reservation grown at its turn), tokens and nano-dollars to add, the TTLs of a minute's, a
# day's and a month's counter, then the record's TTL. Run twice with the same record (a retry after the
# reply was lost), it answers what it answered the first time and adds nothing (see `RedisCounters._once`).
_ADMIT = """
local done = redis.call('GET', KEYS[5])
if done then
  local found = {}
  for n in string.gmatch(done, '%S+') do table.insert(found, n) end
  return found
end
local raw = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local need = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[7])}
local ttl = {ARGV[8], ARGV[9], ARGV[9], ARGV[10]}
local used = {}
for i = 1, 4 do raw[i] = raw[i] or '0'; used[i] = tonumber(raw[i]) end
local refused = 0
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and used[i] + need[i] > limit then
    refused = i
    break
  end
end
if refused == 0 then
  for i = 1, 4 do
    if need[i] ~= 0 then
      redis.call('INCRBY', KEYS[i], need[i])
      if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
    end
  end
end
redis.call('SET', KEYS[5], refused .. ' ' .. table.concat(raw, ' '), 'EX', ARGV[11])
return {refused, used[1], used[2], used[3], used[4]}
"""


# Settlement or release: add the differences (never below 0); mark and report a money counter
# that passed 80% of its limit, once a period. KEYS: the four counters, the two marks (and, for a
# kept reservation, its session's records), then the call's record. ARGV: the message, token and
# nano-dollar differences, the day's and month's limits to warn at (0: none), the three TTLs (and the
# record's field and the fence it must be under: otherwise another holder adopted it, or it was settled
# already, and nothing changes), then the call's record's TTL. Run twice with the same record, it
# answers what it answered the first time and changes nothing.
_ADJUST = """
local once = KEYS[#KEYS]
local done = redis.call('GET', once)
if done then
  local found = {}
  for n in string.gmatch(done, '%S+') do table.insert(found, tonumber(n)) end
  return found
end
if #KEYS > 7 then
  local record = redis.call('HGET', KEYS[7], ARGV[9])
  if not record or tonumber(string.sub(record, 1, string.find(record, ' ', 1, true) - 1)) ~= tonumber(ARGV[10]) then
    return {}
  end
  redis.call('HDEL', KEYS[7], ARGV[9])
end
local delta = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[3])}
local ttl = {ARGV[6], ARGV[7], ARGV[7], ARGV[8]}
local limits = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local total = {0, 0, 0, 0}
for i = 1, 4 do
  if delta[i] ~= 0 then
    local n = redis.call('INCRBY', KEYS[i], delta[i])
    if n < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      n = 0
    end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
    total[i] = n
  elseif i > 2 and limits[i - 2] > 0 then
    total[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
local crossed = {}
for j = 1, 2 do
  local i = j + 2
  if limits[j] > 0 and total[i] * 5 >= limits[j] * 4 and redis.call('SET', KEYS[4 + j], 1, 'NX', 'EX', ttl[i]) then
    table.insert(crossed, i - 1)
    table.insert(crossed, total[i])
  end
end
local record = {}
for k, n in ipairs(crossed) do record[k] = string.format('%d', n) end
redis.call('SET', once, table.concat(record, ' '), 'EX', ARGV[#ARGV])
return crossed
"""


# A queued message's reservation, recorded: one hash per session, a field per message, "<fence> <record>".
# KEYS: the hash, then the call's record. ARGV: the field, the fence, the record, the hash's TTL, then the
# call's record's TTL. Run twice with the same record, it writes nothing (the record it wrote may have been
# settled, and so deleted, meanwhile).
_KEEP = """
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[5]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
"""

# A new holder adopts the records its predecessors left: those under an older fence move to its own; those
# already under its own come again (so a retry after the reply was lost finds what the first call took: each
# is settled once all the same, `_ADJUST` deleting the record under that fence).
# KEYS: the hash. ARGV: the new fence, then the fields (none: all). Returns field, record, field, record...
_ADOPT = """
local fields = {}
for i = 2, #ARGV do fields[i - 1] = ARGV[i] end
if #ARGV == 1 then fields = redis.call('HKEYS', KEYS[1]) end
local adopted = {}
for _, field in ipairs(fields) do
  local value = redis.call('HGET', KEYS[1], field)
  if value then
    local space = string.find(value, ' ', 1, true)
    if tonumber(string.sub(value, 1, space - 1)) <= tonumber(ARGV[1]) then
      local record = string.sub(value, space + 1)
      redis.call('HSET', KEYS[1], field, ARGV[1] .. ' ' .. record)
      table.insert(adopted, field)
      table.insert(adopted, record)
    end
  end
end
return adopted
"""


#: Where each script is in `RedisCounters._redis()` (after the client).
_ADMIT_AT, _ADJUST_AT, _KEEP_AT, _ADOPT_AT = range(1, 5)

#: Seconds a script's record of a call outlives the storage window: a retry comes within the window.
ONCE_SECONDS = 60


class RedisCounters:
    """Counters shared by every process on one Redis (chat/ops/store.py's client and key rule)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # the deployment's prefix and its database (see `counters`)
        self._scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _redis(self):
        client = store.client()
        found = self._scripts.get(client)
        if found is None:
            scripts = (client.register_script(script) for script in (_ADMIT, _ADJUST, _KEEP, _ADOPT))
            found = self._scripts[client] = (client, *scripts)
        return found

    def _names(self, keys: Sequence[str]) -> list[str]:
        return [f"{self.prefix}:quota:{key}" for key in keys]

    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        args = [*limits, messages, tokens, nano, *_TTLS[:2], MONTH_TTL]
        which, *used = await self._once(_ADMIT_AT, self._names(keys[:4]), args)
        return (int(which) - 1 if int(which) else None), [int(n) for n in used]

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
    ) -> Crossed:
        names, args = self._names(keys), [messages, tokens, nano, *warn, *_TTLS[:2], MONTH_TTL]
        if kept is not None:
            names.append(self._kept(kept[0]))
            args += [kept[1], kept[2]]
        found = await self._once(_ADJUST_AT, names, args)
        return [(int(found[n]), int(found[n + 1])) for n in range(0, len(found), 2)]

    async def read(self, keys: tuple[str, ...]) -> list[int]:
        client, names = self._redis()[0], self._names(keys[:4])
        return [int(n or 0) for n in await storage.retry(lambda: client.mget(names))]

    async def keep(self, kept: Kept, record: str) -> bool:
        session_id, row_id, fence = kept
        await self._once(_KEEP_AT, [self._kept(session_id)], [row_id, fence, record, DAY_TTL])
        return True

    async def adopt(self, session_id: str, fence: int, row_ids: Sequence[int] | None) -> dict[int, str]:
        if row_ids is not None and not row_ids:
            return {}
        adopt, keys, args = self._redis()[_ADOPT_AT], [self._kept(session_id)], [fence, *(row_ids or ())]
        found = await storage.retry(lambda: adopt(keys=keys, args=args))  # run again, it finds the same
        return {int(found[n]): _text(found[n + 1]) for n in range(0, len(found), 2)}

    async def _once(self, script: int, keys: list[str], args: list) -> list:
        """Run a script that changes counters, tried again on a connection error within R2D2_STORAGE_RETRY_SECONDS
        (chat/ops/storage.py): a reset may cut it off after Redis ran it, so the call carries an id of its own,
        made once here, under which the script records what it answered (for ONCE_SECONDS); run again with it,
        the script answers the same and changes nothing, so a message is reserved, and a reservation settled,
        once. A Redis restarted empty has lost that record, and the counters with it: the retry then counts in
        the new, empty counters (what was used before the restart is forgotten, as on any restart of a cache)."""
        run = self._redis()[script]
        keys = [*keys, f"{self.prefix}:quota:once:{uuid.uuid4().hex}"]
        args = [*args, ONCE_SECONDS + math.ceil(storage.window())]
        return await storage.retry(lambda: run(keys=keys, args=args))

    def _kept(self, session_id: str) -> str:
        return f"{self.prefix}:quota:kept:{session_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def counters() -> Counters:
    """This process's counters: in Redis when REDIS_URL is set, in memory otherwise (chat/ops/store.py)."""
    found = store.one("quota counters", memory=MemoryCounters, redis=_redis_counters)
    assert found is not None
    return found


def _redis_counters() -> RedisCounters:
    # Principal ids are those of one database: deployments (or test runs) sharing a Redis with different
    # databases must not share counters.
    database = hashlib.sha256(str(settings.DATABASES["default"]["NAME"]).encode()).hexdigest()[:12]
    return RedisCounters(store.key(database))


def reset_counters() -> None:
    """Forget the counters (tests change settings between runs)."""
    store.forget()
