"""chat/accounts/quotas.py without a socket: limits, counters (in memory, and in Redis when REDIS_URL
is set), messages."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from chat import llm
from chat.accounts import principals, quotas
from chat.accounts.principals import Principal
from chat.models import ApiKey
from chat.protocol.errors import ClientError, ErrorCode

NOON = datetime(2026, 11, 26, 12, 0, 10, tzinfo=UTC).timestamp()


def principal(**limits: int) -> Principal:
    """A key no other test (or earlier run on the same Redis) has counted for."""
    base = {"messages_per_minute": 0, "tokens_per_day": 0, "max_sessions": 0}
    return Principal(api_key_id=random.randrange(10**12), label="ci", limits=principals.Limits(**{**base, **limits}))


def test_a_keys_own_limits_override_the_settings(settings):
    settings.R2D2_QUOTA_MESSAGES_PER_MINUTE, settings.R2D2_QUOTA_TOKENS_PER_DAY = 20, 1000
    settings.R2D2_QUOTA_MAX_SESSIONS, settings.R2D2_QUOTA_MODELS = 8, ["gpt-4o-mini"]
    limits = principals.limits_for_key(ApiKey(messages_per_minute=3, tokens_per_day=0, allowed_models="a, b"))
    assert limits == principals.Limits(messages_per_minute=3, tokens_per_day=0, max_sessions=8, models=("a", "b"))
    assert principals.limits_for_key(ApiKey()) == principals.default_limits()


async def test_messages_per_minute_reset_at_the_next_minute():
    who = principal(messages_per_minute=2)
    await quotas.check_message(who, now=NOON)
    await quotas.check_message(who, now=NOON + 1)
    with pytest.raises(ClientError) as refused:
        await quotas.check_message(who, now=NOON + 2)
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.value.message == "Messages per minute: the limit is 2; resets in 48 s."
    await quotas.check_message(who, now=NOON + 50)  # the next minute


async def test_tokens_per_day_refuse_once_spent_until_midnight_utc():
    who = principal(tokens_per_day=100)
    await quotas.check_message(who, now=NOON)
    await quotas.charge_tokens(who, 120, now=NOON)
    with pytest.raises(ClientError) as refused:
        await quotas.check_message(who, now=NOON + 5)
    assert refused.value.message == "Tokens per day: 120 of 100 used; resets at 00:00 UTC (in 12 h 0 min)."
    await quotas.check_message(who, now=NOON + 12 * 3600)  # tomorrow
    assert (await quotas.usage(who, now=NOON))["tokens_today"] == 120


async def test_principals_do_not_share_counters_and_anonymous_has_none():
    spent = principal(tokens_per_day=10)
    await quotas.charge_tokens(spent, 50, now=NOON)
    other = Principal(api_key_id=spent.api_key_id + 1, limits=spent.limits)
    await quotas.check_message(other, now=NOON)
    await quotas.check_message(Principal(), now=NOON)


def test_tokens_used_prefers_the_models_count_and_estimates_otherwise():
    request = [{"role": "user", "content": "x" * 40}]
    assert quotas.tokens_used(llm.Reply(prompt_tokens=3, completion_tokens=4), request, "hello") == 7
    assert quotas.tokens_used(llm.Reply(headers_received=True), request, "y" * 9) == 10 + 3
    assert quotas.tokens_used(llm.Reply(), request, "") == 0  # refused before it answered


def test_a_keys_model_list():
    who = Principal(api_key_id=1, limits=principals.Limits(0, 0, 0, models=("a",)))
    quotas.check_model(who, "a")
    with pytest.raises(ClientError) as refused:
        quotas.check_model(who, "b")
    assert refused.value.code == ErrorCode.MODEL_NOT_ALLOWED


@pytest.mark.redis
async def test_redis_counters_are_shared_and_expire(settings):
    """Two counter objects (two processes) on one Redis see each other's counts; keys carry a TTL."""
    import redis.asyncio as redis

    first = quotas.RedisCounters(settings.REDIS_URL, "r2d2-test")
    second = quotas.RedisCounters(settings.REDIS_URL, "r2d2-test")
    client = redis.Redis.from_url(settings.REDIS_URL)
    await client.delete("r2d2-test:quota:m", "r2d2-test:quota:t")
    assert await first.count_message("m", "t", ttl=120) == (1, 0)
    assert await second.add("t", 40, ttl=3600) == 40
    assert await second.count_message("m", "t", ttl=120) == (2, 40)
    assert 0 < await client.ttl("r2d2-test:quota:m") <= 120 and 0 < await client.ttl("r2d2-test:quota:t") <= 3600
    await client.delete("r2d2-test:quota:m", "r2d2-test:quota:t")
    await client.aclose()
