"""chat/accounts/quotas.py without a socket: limits, admission and settlement, money, the counters (in memory,
and in Redis when REDIS_URL is set)."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from chat import llm
from chat.accounts import counters, principals, quotas, reservations
from chat.accounts.principals import Principal
from chat.models import ApiKey, UserLimits
from chat.ops import metrics, prices
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode
from testkit.server import ROOT, server_env

#: With REDIS_URL, a principal's first admission rebuilds its counters from the database (chat/accounts/seeding.py).
pytestmark = pytest.mark.django_db

NOON = datetime(2026, 11, 26, 12, 0, 10, tzinfo=UTC).timestamp()
REQUEST = [{"role": "user", "content": "x" * 40}]  # 10 tokens, estimated


def principal(**limits) -> Principal:
    """A key no other test (or earlier run on the same Redis) has counted for."""
    base = {"messages_per_minute": 0, "tokens_per_day": 0, "max_sessions": 0}
    return Principal(api_key_id=random.randrange(10**12), label="ci", limits=principals.Limits(**{**base, **limits}))


async def admit(who: Principal, *, prompt: int = 10, cap: int | None = None, model: str = "m", now: float = NOON):
    return await reservations.admit(who, model=model, prompt_tokens_estimate=prompt, max_output_tokens=cap, now=now)


async def refusal(who: Principal, **kwargs) -> ClientError:
    with pytest.raises(ClientError) as refused:
        await admit(who, **kwargs)
    return refused.value


def test_a_keys_own_limits_override_the_settings(settings):
    settings.R2D2_QUOTA_MESSAGES_PER_MINUTE, settings.R2D2_QUOTA_TOKENS_PER_DAY = 20, 1000
    settings.R2D2_QUOTA_MAX_SESSIONS, settings.R2D2_QUOTA_MODELS = 8, ["gpt-4o-mini"]
    settings.R2D2_QUOTA_USD_PER_DAY, settings.R2D2_QUOTA_USD_PER_MONTH = 1.0, 0.0
    limits = principals.limits_for_key(
        ApiKey(
            messages_per_minute=3,
            tokens_per_day=0,
            allowed_models="a, b",
            usd_per_month=Decimal("30.5"),
            max_output_tokens=200,
        )
    )
    assert limits == principals.Limits(
        messages_per_minute=3,
        tokens_per_day=0,
        max_sessions=8,
        models=("a", "b"),
        usd_per_day=1.0,
        usd_per_month=30.5,
        max_output_tokens=200,
    )
    assert principals.limits_for_key(ApiKey()) == principals.default_limits()
    # A person's own money limits (the admin's "spending limits"), the settings' elsewhere.
    own = principals.limits_for_user(UserLimits(usd_per_day=Decimal("2.5")))
    assert (own.usd_per_day, own.usd_per_month, own.tokens_per_day) == (2.5, 0.0, 1000)
    assert principals.limits_for_user(None) == principals.default_limits()


async def test_messages_per_minute_reset_at_the_next_minute():
    who = principal(messages_per_minute=2)
    await admit(who, now=NOON)
    await admit(who, now=NOON + 1)
    refused = await refusal(who, now=NOON + 2)
    assert refused.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.message == "Messages per minute: the limit is 2; resets in 48 s."
    await admit(who, now=NOON + 50)  # the next minute


async def test_a_reservation_holds_budget_until_settled_with_what_the_model_reported():
    """Admission reserves the estimated prompt and the reply's cap; settling charges the model's counts instead."""
    who = principal(tokens_per_day=100)
    first = await admit(who, prompt=10, cap=40)  # holds 50
    assert first.max_output_tokens == 40 and first.reserved == (50, 0)
    second = await admit(who, prompt=10, cap=40)  # holds 100: all of it
    refused = await refusal(who, prompt=10, cap=40, now=NOON + 5)
    assert refused.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.message == (
        "Tokens per day: 100 of 100 used; this message needs up to 50 tokens (its prompt and reply); "
        "resets at 00:00 UTC (in 12 h 0 min)."
    )
    await first.settle(llm.Reply(prompt_tokens=12, completion_tokens=8, sent=True), REQUEST, "")
    assert (await quotas.usage(who, now=NOON))["tokens_today"] == 20 + 50
    await admit(who, prompt=10, cap=20, now=NOON + 6)  # 30 fits in what settling gave back
    second.release()  # never reached the model: all of it comes back
    await reservations.settled()
    assert (await quotas.usage(who, now=NOON))["tokens_today"] == 20 + 30
    await admit(who, prompt=10, cap=40, now=NOON + 12 * 3600)  # tomorrow starts from 0


async def test_without_a_cap_a_turn_reserves_the_expected_reply(settings):
    settings.R2D2_QUOTA_RESERVE_OUTPUT_TOKENS = 500
    who = principal(tokens_per_day=505)
    reservation = await admit(who, prompt=5)
    assert reservation.reserved == (505, 0) and reservation.max_output_tokens is None
    assert "needs up to 505 tokens" in (await refusal(who, prompt=5)).message


async def test_a_burst_of_concurrent_admissions_never_reserves_past_the_limit():
    """60 admissions at once against 1,000 tokens of 60 each: exactly 16 fit, whatever the interleaving."""
    who = principal(tokens_per_day=1000)
    outcomes = await asyncio.gather(*(admit(who, prompt=20, cap=40) for _ in range(60)), return_exceptions=True)
    admitted = [o for o in outcomes if isinstance(o, reservations.Reservation)]
    assert len(admitted) == 16
    assert all(isinstance(o, ClientError) and o.code == ErrorCode.QUOTA_EXCEEDED for o in outcomes if o not in admitted)
    assert (await quotas.usage(who, now=NOON))["tokens_today"] == 960


async def test_money_limits_per_day_and_per_month_name_their_reset(settings):
    settings.R2D2_MODEL_PRICES = "priced=1000:2000,free=0"  # $ per million: 1 m$ a prompt token, 2 m$ a reply token
    who = principal(usd_per_day=0.05)
    reservation = await admit(who, model="priced", prompt=10, cap=10)  # 10 m$ + 20 m$
    assert reservation.reserved == (20, 30_000_000)
    refused = await refusal(who, model="priced", prompt=10, cap=10)
    assert refused.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.message == (
        "Dollars per day: $0.03 of $0.05 spent; this message needs up to $0.03 (its prompt and reply); "
        "resets at 00:00 UTC (in 12 h 0 min)."
    )
    await reservation.settle(llm.Reply(prompt_tokens=10, completion_tokens=1, sent=True), REQUEST, "")
    assert (await quotas.usage(who, now=NOON))["usd_today"] == 0.012
    await admit(who, model="free", prompt=10_000, cap=10_000)  # priced at 0: free, and admitted

    monthly = principal(usd_per_month=0.01)
    refused = await refusal(monthly, model="priced", prompt=10, cap=10)
    assert refused.message.startswith("Dollars per month: $0.00 of $0.01 spent")
    assert refused.message.endswith("resets at 00:00 UTC on 2026-12-01 (a calendar month).")


async def test_a_principal_with_a_money_limit_may_use_only_priced_models(settings):
    settings.R2D2_MODEL_PRICES = "priced=0.15:0.60"
    limited, free_to_spend = principal(usd_per_month=10.0), principal()
    for check in (lambda: quotas.check_model(limited, "unpriced"), None):
        with pytest.raises(ClientError) as refused:
            check() if check else await admit(limited, model="unpriced")
        assert refused.value.code == ErrorCode.MODEL_NOT_ALLOWED
        assert "'unpriced' has no price" in refused.value.message
    quotas.check_model(limited, "priced")
    quotas.check_model(free_to_spend, "unpriced")
    await admit(free_to_spend, model="unpriced")


async def test_eighty_percent_of_a_money_limit_warns_once_a_period(settings, caplog):
    """Judged as turns settle, whether they cost more or less than they reserved; once a period."""
    settings.R2D2_MODEL_PRICES = "priced=1000:1000"  # 1 m$ a token
    who = principal(usd_per_day=0.2)
    before = metrics.SPEND_WARNINGS.labels("usd_per_day")._value.get()
    with caplog.at_level(logging.WARNING, logger="chat.accounts.quotas"):
        # Each reserves 1 + 100 m$; they cost 70 m$ (35%), then 95 more (82.5%: less than reserved), then 5.
        for spent, cap in ((70, 100), (95, 100), (5, 1)):
            reservation = await admit(who, model="priced", prompt=1, cap=cap)
            await reservation.settle(llm.Reply(prompt_tokens=spent, completion_tokens=0, sent=True), REQUEST, "")
    warnings = [r for r in caplog.records if r.getMessage() == "spending past 80% of a limit"]
    assert len(warnings) == 1
    assert (warnings[0].limit, warnings[0].spent_usd, warnings[0].limit_usd) == ("usd_per_day", 0.165, 0.2)
    assert metrics.SPEND_WARNINGS.labels("usd_per_day")._value.get() == before + 1
    assert quotas.near_limit(who, await quotas.usage(who, now=NOON)) == ["usd_per_day"]


def test_tokens_used_prefers_the_models_count_and_charges_a_request_sent():
    assert reservations.tokens_used(llm.Reply(prompt_tokens=3, completion_tokens=4), REQUEST, "hello") == (3, 4)
    assert reservations.tokens_used(llm.Reply(headers_received=True), REQUEST, "y" * 9) == (10, 3)
    # Cancelled after the request went out, before the first token: at least the prompt.
    assert reservations.tokens_used(llm.Reply(sent=True), REQUEST, "") == (10, 0)
    assert reservations.tokens_used(llm.Reply(), REQUEST, "") == (0, 0)  # refused or unreachable: nothing


def test_the_prompt_estimate_follows_what_the_prompt_keeps(settings):
    settings.R2D2_MAX_CONTEXT_CHARS = 100
    post = PostMessage(session_id=None, user_message="u" * 20, system_message=None, stream=False)
    assert reservations.estimate_prompt_tokens("s" * 20, [("user", "a" * 40)], post) == 20  # 80 characters
    # A long history is cut to the budget, as chat/turns/prompt.py cuts it.
    assert reservations.estimate_prompt_tokens("s" * 20, [("user", "a" * 4000)], post) == 25
    renamed = PostMessage(session_id=None, user_message="u" * 20, system_message="", stream=False)
    assert reservations.estimate_prompt_tokens("s" * 20, [], renamed) == 5


async def test_anonymous_reserves_nothing_and_keeps_its_sockets_own_figures(settings):
    settings.R2D2_MODEL_PRICES = "m=1000:1000"
    tally = counters.Tally()
    reservation = await reservations.admit(
        principals.ANONYMOUS, model="m", prompt_tokens_estimate=10, max_output_tokens=None, tally=tally, now=NOON
    )
    assert reservation.reserved == (0, 0)
    await reservation.settle(llm.Reply(prompt_tokens=5, completion_tokens=5, sent=True), REQUEST, "")
    figures = await quotas.figures(principals.ANONYMOUS, tally=tally, socket_sessions=1)
    assert (figures.tokens_today, figures.usd_today, figures.sessions) == (10, 0.01, 1)
    assert figures.tokens_per_day is None and figures.max_sessions == settings.R2D2_MAX_SESSIONS_PER_CONNECTION


def test_prices_parse_and_a_bad_entry_is_named():
    assert prices.parse("a=0.15:0.60, anthropic.claude-v1:0=3:15,free=0") == {
        "a": (0.15, 0.60),
        "anthropic.claude-v1:0": (3.0, 15.0),
        "free": (0.0, 0.0),
    }
    for text, named in [("a=cheap", "'a=cheap'"), ("a=1,b", "'b'"), ("a=-1:2", "'a=-1:2'"), ("=1", "'=1'")]:
        with pytest.raises(prices.PriceError) as bad:
            prices.parse(text)
        assert named in str(bad.value), text


def test_prices_that_do_not_parse_stop_start_up_naming_the_entry():
    """Any process (the server, a command) refuses to start, saying which entry is wrong."""
    env = server_env(None, R2D2_MODEL_PRICES="gpt-4o-mini=0.15:0.60,gpt-4o=2.50:ten")
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured: R2D2_MODEL_PRICES: 'gpt-4o=2.50:ten' has a price that is not a number" in (
        result.stderr
    )


@pytest.mark.redis
async def test_redis_admission_is_atomic_across_processes_and_keys_expire(settings):
    """Two counter objects (two processes) on one Redis: a burst through both admits exactly what fits;
    settling and the 80% mark are shared; every key carries a TTL."""
    import redis.asyncio as redis

    prefix = f"r2d2-test-{random.randrange(10**9)}"
    first = counters.RedisCounters(prefix)
    second = counters.RedisCounters(prefix)
    keys = counters.counter_keys(principal(), NOON)
    limits = (0, 1000, 0, 0)
    with pytest.raises(counters.Unseeded):  # nothing rebuilt from the database yet: nothing admitted
        await first.admit(keys, limits, 1, 60, 0)
    await second.seed(keys, (0, 0, 0, 0), day=True, month=True)
    outcomes = await asyncio.gather(*((first, second)[n % 2].admit(keys, limits, 1, 60, 0) for n in range(40)))
    assert sum(refused is None for refused, _, _ in outcomes) == 16
    assert {refused for refused, _, _ in outcomes} == {None, counters.TOKENS}
    assert (await second.read(keys))[: counters.USD_DAY] == [16, 960]
    assert await first.adjust(keys, 0, -60, 700, (1000, 0)) == []  # 70%
    assert await second.adjust(keys, 0, 0, 0, (1000, 0)) == []
    assert await first.adjust(keys, 0, 0, 200, (1000, 0)) == [(counters.USD_DAY, 900)]
    assert await second.adjust(keys, 0, 0, -10, (1000, 0)) == []  # past 80% already told
    assert await first.read(keys) == [16, 900, 890, 890]
    client = redis.Redis.from_url(settings.REDIS_URL)
    names = [f"{prefix}:quota:{key}" for key in keys[:5]]
    ttls = [await client.ttl(name) for name in names]
    assert 0 < ttls[0] <= counters.MINUTE_TTL and all(0 < ttl <= counters.MONTH_TTL for ttl in ttls)
    await client.delete(*names)
    await client.aclose()


async def test_a_queued_message_whose_prompt_grew_reserves_the_difference_or_is_refused():
    """Admitted before the replies ahead of it existed, a message's real prompt is covered at its turn."""
    who = principal(tokens_per_day=100)
    queued = await admit(who, prompt=10, cap=10)  # 20 reserved
    await queued.cover([{"role": "user", "content": "x" * 40}])  # 10 tokens: as estimated, nothing more
    await queued.cover([{"role": "user", "content": "x" * 160}])  # 40 tokens: 30 more
    assert queued.reserved == (50, 0)
    late = await admit(who, prompt=10, cap=10)  # 70 in all
    with pytest.raises(ClientError) as refused:
        await late.cover([{"role": "user", "content": "x" * 200}])  # 40 more: 110
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.value.message.startswith(
        "Tokens per day: 70 of 100 used; its prompt grew by 40 tokens with the replies before it; resets at 00:00 UTC"
    )
