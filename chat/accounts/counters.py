"""A principal's quota counters and where they live: Redis (one Lua script to admit, one to adjust: atomic, one
round trip each, each run once per call however often a connection error makes it sent again; the scripts are
chat/accounts/scripts.py) when REDIS_URL is set, this process's memory otherwise; and an anonymous socket's own
(`Tally`).

Redis is a cache of what the database records: counters it lost (a restart with nothing kept, a failover to a
replica that lagged) are rebuilt from the database before the principal is admitted or told its usage again
(`Unseeded`, chat/accounts/seeding.py), so a budget holds across a Redis restart.

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

from chat.accounts import scripts
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

#: The epochs of a principal's counters for a day and a month, as an admission found them (the tokens of their
#: seed markers, chat/accounts/scripts.py): a settlement that finds others knows its reservation was lost with
#: its Redis. ("", ""): none (the in-memory counters, which die with their reservations).
Epochs = tuple[str, str]
NO_EPOCHS: Epochs = ("", "")


class Unseeded(Exception):
    """The counters of a day (`day`, with its minute) or a month (`month`) were not rebuilt from the database
    in this Redis: a new period, or a Redis that lost them. chat/accounts/seeding.py rebuilds them (`seed`)."""

    def __init__(self, day: bool, month: bool) -> None:
        super().__init__(f"quota counters unseeded (day: {day}, month: {month})")
        self.day, self.month = day, month


class Counters(Protocol):
    async def admit(
        self,
        keys: tuple[str, ...],
        limits: Sequence[int],
        messages: int,
        tokens: int,
        nano: int,
        *,
        force: bool = False,
    ) -> tuple[int | None, list[int], Epochs]:
        """Add `messages`, `tokens` and `nano` unless one would pass its limit (0: none); returns (the
        index of the counter that refused, or None; the four counters before; their epochs). Raises
        `Unseeded`, changing nothing, when the counters of `keys`' periods were not rebuilt (unless `force`)."""

    async def seed(self, keys: tuple[str, ...], figures: Sequence[int], *, day: bool, month: bool) -> None:
        """The counters of the day (and its minute) and of the month, unless already seeded: raised to `figures`
        (the database's four), their epochs begun; two processes seeding at once count them once."""

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
        *,
        epochs: Epochs = NO_EPOCHS,
        full: tuple[int, int] = (0, 0),
    ) -> Crossed:
        """Add (or give back) amounts; the money counters that now passed 80% of `warn` (nano-dollars per
        day, per month; 0: none) for the first time in their period. With `kept`: only if that record of a
        reservation is still there under that fence, and it goes in the same step (settled exactly once).
        `epochs`: the admission's; counters of a later epoch are added `full` (tokens, nano-dollars: what the
        turn cost in all) instead, unseeded ones nothing."""

    async def read(self, keys: tuple[str, ...], *, force: bool = False) -> list[int]:
        """The four counters; `Unseeded` when they were not rebuilt (unless `force`)."""

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
        self,
        keys: tuple[str, ...],
        limits: Sequence[int],
        messages: int,
        tokens: int,
        nano: int,
        *,
        force: bool = False,
    ) -> tuple[int | None, list[int], Epochs]:
        need = (messages, tokens, nano, nano)
        with self._lock:
            used = [self._get(key) for key in keys[:4]]
            for index in range(4):
                if limits[index] > 0 and used[index] + need[index] > limits[index]:
                    return index, used, NO_EPOCHS
            for index in range(4):
                if need[index]:
                    self._add(keys[index], need[index], _TTLS[index])
        return None, used, NO_EPOCHS

    async def seed(self, keys: tuple[str, ...], figures: Sequence[int], *, day: bool, month: bool) -> None:
        pass  # never unseeded: these counters and the reservations in them end with the process

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
        *,
        epochs: Epochs = NO_EPOCHS,
        full: tuple[int, int] = (0, 0),
    ) -> Crossed:
        crossed: Crossed = []  # `kept`: never, see `keep`; `epochs`: always NO_EPOCHS
        with self._lock:
            totals = [self._add(keys[index], delta, _TTLS[index]) for index, delta in enumerate((messages, tokens))]
            totals += [self._add(keys[index], nano, _TTLS[index]) for index in (USD_DAY, USD_MONTH)]
            for index, limit, mark in ((USD_DAY, warn[0], keys[4]), (USD_MONTH, warn[1], keys[5])):
                if limit > 0 and totals[index] * 5 >= limit * 4 and not self._get(mark):
                    self._add(mark, 1, _TTLS[index])
                    crossed.append((index, totals[index]))
        return crossed

    async def read(self, keys: tuple[str, ...], *, force: bool = False) -> list[int]:
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


#: Where each script is in `RedisCounters._redis()` (after the client).
_ADMIT_AT, _ADJUST_AT, _KEEP_AT, _ADOPT_AT, _SEED_AT = range(1, 6)

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
            lua = (scripts.ADMIT, scripts.ADJUST, scripts.KEEP, scripts.ADOPT, scripts.SEED)
            found = self._scripts[client] = (client, *(client.register_script(source) for source in lua))
        return found

    def _names(self, keys: Sequence[str]) -> list[str]:
        return [f"{self.prefix}:quota:{key}" for key in keys]

    def _marks(self, keys: Sequence[str]) -> list[str]:
        """The seed markers of `keys`' day and month (named from the counters, so that a reservation recorded
        with its counters' names finds them too)."""
        who, _, day = keys[TOKENS].rsplit(":", 2)
        return self._names((f"{who}:sd:{day}", f"{who}:sM:{keys[USD_MONTH].rsplit(':', 1)[1]}"))

    async def admit(
        self,
        keys: tuple[str, ...],
        limits: Sequence[int],
        messages: int,
        tokens: int,
        nano: int,
        *,
        force: bool = False,
    ) -> tuple[int | None, list[int], Epochs]:
        args = [*limits, messages, tokens, nano, *_TTLS[:2], MONTH_TTL, int(force)]
        which, *found = await self._once(_ADMIT_AT, [*self._names(keys[:4]), *self._marks(keys)], args)
        if int(which) < 0:
            raise Unseeded(day=int(found[0]) == 1, month=int(found[1]) == 1)
        used, epochs = [int(n) for n in found[:4]], (_text(found[4]), _text(found[5]))
        return (int(which) - 1 if int(which) else None), used, epochs

    async def seed(self, keys: tuple[str, ...], figures: Sequence[int], *, day: bool, month: bool) -> None:
        seed, names = self._redis()[_SEED_AT], [*self._names(keys[:4]), *self._marks(keys)]
        args = [*figures, int(day), int(month), *_TTLS[:2], MONTH_TTL, uuid.uuid4().hex[:12]]
        await storage.retry(lambda: seed(keys=names, args=args))  # run again, it finds the markers set

    async def adjust(
        self,
        keys: tuple[str, ...],
        messages: int,
        tokens: int,
        nano: int,
        warn: tuple[int, int],
        kept: Kept | None = None,
        *,
        epochs: Epochs = NO_EPOCHS,
        full: tuple[int, int] = (0, 0),
    ) -> Crossed:
        names = [*self._names(keys[:6]), *self._marks(keys)]
        args = [messages, tokens, nano, *warn, *_TTLS[:2], MONTH_TTL, *epochs, *full]
        if kept is not None:
            names.append(self._kept(kept[0]))
            args += [kept[1], kept[2]]
        found = await self._once(_ADJUST_AT, names, args)
        return [(int(found[n]), int(found[n + 1])) for n in range(0, len(found), 2)]

    async def read(self, keys: tuple[str, ...], *, force: bool = False) -> list[int]:
        client, names = self._redis()[0], [*self._names(keys[:4]), *self._marks(keys)]
        found = await storage.retry(lambda: client.mget(names))
        if not force and (found[4] is None or found[5] is None):
            raise Unseeded(day=found[4] is None, month=found[5] is None)
        return [int(n or 0) for n in found[:4]]

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
        once. A Redis restarted empty has lost that record, and the counters with it: the retry then finds them
        unseeded (`Unseeded`), and they are rebuilt from the database before it counts."""
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
