"""chat/llm/breaker.py: open after N failures within the window, one probe after the cooldown, the probe decides.

The same rules in memory (a clock the test moves) and in Redis (its own clock: short cooldowns)."""

import asyncio
import random

import pytest

from chat.llm import breaker
from chat.llm.breaker import MemoryBreakers, RedisBreakers, State
from chat.ops import store as chat_store

CLOSED, OPEN, PROBE = State.CLOSED, State.OPEN, State.PROBE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_opens_after_the_failures_within_the_window_only():
    clock = Clock()
    store = MemoryBreakers(clock)
    policy = (3, 60.0, 30.0)  # failures, window, cooldown
    assert [await store.failed("a", *policy) for _ in range(2)] == [False, False]
    clock.now += 61  # the window passed: those two no longer count
    assert [await store.failed("a", *policy) for _ in range(2)] == [False, False]
    assert await store.look(["a", "b"], *policy) == [CLOSED, CLOSED]
    assert await store.failed("a", *policy) is True  # the third within 60 s
    assert await store.look(["a", "b"], *policy) == [OPEN, CLOSED]
    assert await store.failed("a", *policy) is False  # already open: no second opening
    clock.now += 29.9
    assert await store.look(["a"], *policy) == [OPEN]


async def test_after_the_cooldown_one_probe_and_it_decides():
    clock = Clock()
    store = MemoryBreakers(clock)
    policy = (1, 60.0, 30.0)
    await store.failed("a", *policy)
    clock.now += 30
    assert await store.look(["a"], *policy) == [PROBE]
    assert await store.look(["a"], *policy) == [OPEN]  # one probe at a time
    await store.failed("a", *policy)  # the probe failed: open for another cooldown
    clock.now += 29
    assert await store.look(["a"], *policy) == [OPEN]
    clock.now += 1
    assert await store.look(["a"], *policy) == [PROBE]
    await store.succeeded("a")
    assert await store.look(["a"], *policy) == [CLOSED]
    assert await store.failed("a", *policy) is True  # counting starts afresh


async def test_a_probe_that_never_reports_frees_it_after_a_cooldown():
    clock = Clock()
    store = MemoryBreakers(clock)
    policy = (1, 60.0, 30.0)
    await store.failed("a", *policy)
    clock.now += 30
    assert await store.look(["a"], *policy) == [PROBE]
    clock.now += 30
    assert await store.look(["a"], *policy) == [PROBE]


@pytest.fixture
async def redis_store(settings):
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: run with REDIS_URL set (.ci/run does)")
    store = RedisBreakers(f"r2d2-test-{random.randrange(10**9)}")
    yield store
    client, _, _ = store._redis()
    keys = await client.keys(f"{store.prefix}:*")
    if keys:
        await client.delete(*keys)
    await chat_store.close()


@pytest.mark.redis
async def test_in_redis_the_same_rules_atomically_and_keys_expire(redis_store):
    """Many processes looking at once at a half-open breaker: exactly one probes."""
    policy = (2, 60.0, 0.3)
    assert await redis_store.failed("a", *policy) is False
    opened = await asyncio.gather(*(redis_store.failed("a", *policy) for _ in range(10)))
    assert opened.count(True) == 1  # concurrent failures open it once
    assert await redis_store.look(["a", "b"], *policy) == [OPEN, CLOSED]
    client, _, _ = redis_store._redis()
    assert 0 < await client.ttl(f"{redis_store.prefix}:breaker:a") <= 61 + 60
    await asyncio.sleep(0.35)
    others = [RedisBreakers(redis_store.prefix) for _ in range(5)]  # other processes
    looks = await asyncio.gather(*(s.look(["a"], *policy) for s in [redis_store, *others] for _ in range(4)))
    assert sorted(state for [state] in looks).count(PROBE) == 1
    await redis_store.failed("a", *policy)  # the probe failed
    assert await others[0].look(["a"], *policy) == [OPEN]
    await asyncio.sleep(0.35)
    assert await others[1].look(["a"], *policy) == [PROBE]
    await others[1].succeeded("a")
    assert await redis_store.look(["a"], *policy) == [CLOSED]
    for other in others:
        await other._redis()[0].aclose()


async def test_a_breaker_store_that_fails_counts_as_closed(settings):
    """Redis down: no breaker may stop a turn."""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    breaker.reset()
    try:
        members = [breaker.Member("gpt-4o", "openai", "gpt-4o"), breaker.Member("alt/x", "alt", "x")]
        assert await breaker.look(members) == [CLOSED, CLOSED]
        await breaker.failed(members[0])
    finally:
        breaker.reset()
