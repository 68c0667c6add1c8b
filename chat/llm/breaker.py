"""Circuit breakers, one per fallback-chain member (an upstream and a model, named as routed).

A member that failed R2D2_CIRCUIT_FAILURES times within R2D2_CIRCUIT_WINDOW_SECONDS (counted
from the first failure of the window) is **open** for R2D2_CIRCUIT_COOLDOWN_SECONDS: turns go
straight to the next member, with no wait on it. After the cooldown it is **half-open**: the
first turn to look takes the one **probe** (for a cooldown's length; a probe that never reports
back frees it then), the others still skip it; the probe's success closes it, its failure opens
it again. Only failures that are the upstream's count (chat/llm/router.py, `counts_against`).

Shared by every process through Redis when REDIS_URL is set: one Lua script per look at a
chain (all its members in one round trip; a chain seen all closed is trusted for
TRUST_CLOSED_SECONDS) and one per failure, so deciding and changing a state is one atomic
step, on Redis's clock. In this process's memory otherwise. A breaker must
never be the cause of an outage: when Redis fails, every member counts as closed.

Only turns with somewhere else to go look at breakers (a chain of two members or more): a
model without alternates is called as it always was, at no cost.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.conf import settings

from chat.ops import metrics, store
from chat.ops.throttle import warn_throttled

logger = logging.getLogger(__name__)


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    PROBE = 2  # half-open, and this turn is its probe


@dataclass(frozen=True, slots=True)
class Member:
    """A chain member as its breaker knows it: the routed name (the key), and the gauge's labels."""

    routed: str
    upstream: str
    model: str


def _policy() -> tuple[int, float, float]:
    return (
        max(1, settings.R2D2_CIRCUIT_FAILURES),
        settings.R2D2_CIRCUIT_WINDOW_SECONDS,
        settings.R2D2_CIRCUIT_COOLDOWN_SECONDS,
    )


#: A chain this process saw all closed is taken as still closed for this long without asking again: the look
#: is a Redis round trip, 0.16 ms CPU, a tenth of a turn's. A breaker another process opened is then seen at
#: most this late (this process's own failures are seen at once).
TRUST_CLOSED_SECONDS = 0.2
_all_closed_until: dict[tuple[str, ...], float] = {}


async def look(members: Sequence[Member]) -> list[State]:
    """Each member's state for a turn about to walk them (PROBE: this turn probes it)."""
    keys = tuple(m.routed for m in members)
    now = time.monotonic()
    if _all_closed_until.get(keys, 0.0) > now:
        return [State.CLOSED] * len(members)
    try:
        states = await breakers().look(list(keys), *_policy())
    except Exception as exc:  # Redis down: no breaker may stop a turn
        warn_throttled(logger, "circuit breakers unavailable", key="breaker", extra={"error": type(exc).__name__})
        return [State.CLOSED] * len(members)
    for member, state in zip(members, states, strict=True):
        metrics.circuit(member.upstream, member.model, is_open=state == State.OPEN)
    if all(state == State.CLOSED for state in states):
        _all_closed_until[keys] = now + TRUST_CLOSED_SECONDS
    return states


async def failed(member: Member) -> None:
    """The member failed in a way that is its upstream's fault."""
    _all_closed_until.clear()
    try:
        opened = await breakers().failed(member.routed, *_policy())
    except Exception as exc:
        warn_throttled(logger, "circuit breakers unavailable", key="breaker", extra={"error": type(exc).__name__})
        return
    if opened:
        metrics.circuit(member.upstream, member.model, is_open=True)
        logger.warning("circuit opened", extra={"upstream": member.upstream, "model": member.model})


async def probe_succeeded(member: Member) -> None:
    """The member's probe answered: its breaker closes."""
    try:
        await breakers().succeeded(member.routed)
    except Exception as exc:
        warn_throttled(logger, "circuit breakers unavailable", key="breaker", extra={"error": type(exc).__name__})
        return
    metrics.circuit(member.upstream, member.model, is_open=False)
    logger.info("circuit closed", extra={"upstream": member.upstream, "model": member.model})


# Stores ---------------------------------------------------------------------------------


class MemoryBreakers:
    """This process's breakers (no Redis): the same rules as the script below, under a lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, float]] = {}

    async def look(self, keys: list[str], failures: int, window: float, cooldown: float) -> list[State]:
        now = self._clock()
        with self._lock:
            return [self._look(self._states.get(key), now, cooldown) for key in keys]

    @staticmethod
    def _look(state: dict[str, float] | None, now: float, cooldown: float) -> State:
        if not state or not state.get("open_until"):
            return State.CLOSED
        if now < state["open_until"] or now < state.get("probe_until", 0):
            return State.OPEN
        state["probe_until"] = now + cooldown
        return State.PROBE

    async def failed(self, key: str, failures: int, window: float, cooldown: float) -> bool:
        now = self._clock()
        with self._lock:
            state = self._states.setdefault(key, {})
            if state.get("open_until"):
                if now >= state["open_until"]:  # half-open: the probe failed
                    state.update(open_until=now + cooldown, probe_until=0)
                return False
            if now - state.get("since", -window - 1) > window:
                state.update(since=now, count=0)
            state["count"] = state.get("count", 0) + 1
            if state["count"] >= failures:
                state.update(open_until=now + cooldown, probe_until=0, count=0)
                return True
            return False

    async def succeeded(self, key: str) -> None:
        with self._lock:
            self._states.pop(key, None)


# KEYS: one hash per member. ARGV: cooldown. Returns each member's State. Time is Redis's (TIME),
# so processes on machines whose clocks differ agree.
_LOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cooldown = tonumber(ARGV[1])
local states = {}
for i, key in ipairs(KEYS) do
  local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
  if open_until == 0 then
    states[i] = 0
  elseif now < open_until or now < tonumber(redis.call('HGET', key, 'probe_until') or '0') then
    states[i] = 1
  else
    redis.call('HSET', key, 'probe_until', now + cooldown)
    states[i] = 2
  end
end
return states
"""

# KEYS[1]: the member's hash. ARGV: failures, window, cooldown. Returns 1 when this failure opened it.
_FAILED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local failures, window, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl = math.ceil(window + 2 * cooldown) + 60
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > 0 then
  if now >= open_until then
    redis.call('HSET', KEYS[1], 'open_until', now + cooldown, 'probe_until', 0)
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return 0
end
local since = tonumber(redis.call('HGET', KEYS[1], 'since') or '0')
if now - since > window then
  redis.call('HSET', KEYS[1], 'since', now, 'count', 0)
end
local count = redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('EXPIRE', KEYS[1], ttl)
if count >= failures then
  redis.call('HSET', KEYS[1], 'open_until', now + cooldown, 'probe_until', 0, 'count', 0)
  return 1
end
return 0
"""


class RedisBreakers:
    """Breakers shared by every process on one Redis (chat/ops/store.py's client and key rule)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # the deployment's prefix and its database (see `store`)
        self._scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _redis(self):
        client = store.client()
        found = self._scripts.get(client)
        if found is None:
            found = self._scripts[client] = (client, client.register_script(_LOOK), client.register_script(_FAILED))
        return found

    def _name(self, key: str) -> str:
        return f"{self.prefix}:breaker:{key}"

    async def look(self, keys: list[str], failures: int, window: float, cooldown: float) -> list[State]:
        _, look, _ = self._redis()
        return [State(int(s)) for s in await look(keys=[self._name(k) for k in keys], args=[cooldown])]

    async def failed(self, key: str, failures: int, window: float, cooldown: float) -> bool:
        _, _, failed = self._redis()
        return bool(await failed(keys=[self._name(key)], args=[failures, window, cooldown]))

    async def succeeded(self, key: str) -> None:
        client, _, _ = self._redis()
        await client.delete(self._name(key))


def breakers() -> MemoryBreakers | RedisBreakers:
    """This process's breakers: in Redis when REDIS_URL is set, in memory otherwise (chat/ops/store.py)."""
    found = store.one("circuit breakers", memory=MemoryBreakers, redis=_redis_breakers)
    assert found is not None
    return found


def _redis_breakers() -> RedisBreakers:
    # Per deployment, as the quota counters are: deployments (or test runs) sharing a Redis with
    # different databases have their own upstreams.
    database = hashlib.sha256(str(settings.DATABASES["default"]["NAME"]).encode()).hexdigest()[:12]
    return RedisBreakers(store.key(database))


def reset() -> None:
    """Forget the breakers (tests change settings between runs)."""
    store.forget()
    _all_closed_until.clear()
