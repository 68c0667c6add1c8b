"""chat/accounts/seeding.py against a real Redis and the database: counters Redis lost are rebuilt from what the
database records before anyone is admitted or told their usage; two processes rebuilding at once count once;
a reservation lost with Redis is settled with what its turn cost in all."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings as django

from chat import llm
from chat.accounts import auth, counters, quotas, reservations, seeding
from chat.models import ChatMessage, ChatSession, Role

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

NOON = datetime(2026, 11, 26, 12, 0, 10, tzinfo=UTC)
PRICES = "priced=1:2"  # $ per million tokens: 1,000 nano-dollars a prompt token, 2,000 a completion token


@sync_to_async
def recorded_spend():
    """A key and what the database records of it: replies today, earlier this month, last month; messages this
    minute and the minute before; another key's reply today, which is not its."""
    row, _ = auth.create_api_key("seeded", tokens_per_day=100_000, usd_per_day=1, max_output_tokens=10)
    other, _ = auth.create_api_key("another")
    mine = ChatSession.objects.create(model="priced", api_key=row)
    theirs = ChatSession.objects.create(model="priced", api_key=other)

    def saved(session, role, at, content="", **usage):
        message = ChatMessage.objects.create(session=session, role=role, content=content, **usage)
        ChatMessage.objects.filter(id=message.id).update(created_at=at)

    reply = Role.ASSISTANT
    saved(mine, reply, NOON - timedelta(hours=1), model="priced", prompt_tokens=100, completion_tokens=50)
    # Unpriced, and the model counted no completion: its text, characters / 4 (41 -> 11 tokens).
    saved(mine, reply, NOON - timedelta(minutes=10), "x" * 41, model="unpriced", prompt_tokens=10)
    saved(mine, reply, NOON - timedelta(days=1), model="priced", prompt_tokens=0, completion_tokens=10)
    saved(mine, reply, NOON - timedelta(days=5), model="priced", prompt_tokens=1000, completion_tokens=0)
    saved(mine, reply, NOON - timedelta(days=30), model="priced", prompt_tokens=10**6, completion_tokens=0)
    saved(theirs, reply, NOON, model="priced", prompt_tokens=10**6, completion_tokens=0)
    for at in (NOON - timedelta(seconds=5), NOON - timedelta(seconds=9), NOON - timedelta(seconds=70)):
        saved(mine, Role.USER, at, "hello")
    return auth.principal_for_key(row)


#: What the database says of that key at NOON.
RECORDED = {
    "messages_this_minute": 2,
    "tokens_today": 150 + 21,
    "usd_today": 0.0002,  # 100 x 1,000 + 50 x 2,000 nano-dollars; the unpriced reply costs nothing
    "usd_this_month": 0.00122,  # and 10 x 2,000 yesterday, 1,000 x 1,000 five days ago
}


async def forget(principal) -> None:
    """What a Redis restarted empty forgets of this principal (and what an earlier run left of the same key id)."""
    client = aioredis.Redis.from_url(django.REDIS_URL)
    try:
        pattern = f"{counters.counters().prefix}:quota:{principal.quota_key}:*"
        names = [name async for name in client.scan_iter(match=pattern)]
        if names:
            await client.delete(*names)
    finally:
        await client.aclose()


@pytest.fixture
async def principal(settings):
    settings.R2D2_MODEL_PRICES = PRICES
    found = await recorded_spend()
    await forget(found)
    yield found
    await forget(found)


async def admit(principal, now: float) -> reservations.Reservation:
    """A message whose turn reserves 20 tokens (a prompt of 10, an output cap of 10)."""
    return await reservations.admit(principal, model="priced", prompt_tokens_estimate=10, max_output_tokens=10, now=now)


async def test_counters_redis_lost_are_rebuilt_from_the_database(principal):
    assert await quotas.usage(principal, now=NOON.timestamp()) == RECORDED
    # Seeded: Redis answers from now on (a reply saved meanwhile is counted by its settlement, not read again).
    await sync_to_async(ChatMessage.objects.create)(
        session=await ChatSession.objects.filter(api_key_id=principal.api_key_id).afirst(),
        role=Role.ASSISTANT,
        model="priced",
        prompt_tokens=7,
        completion_tokens=0,
    )
    assert await quotas.usage(principal, now=NOON.timestamp()) == RECORDED

    # Redis restarts empty: the budget it forgot is rebuilt before the next admission, which is judged on it.
    await forget(principal)
    limits = counters.limits_of(principal)
    keys = counters.counter_keys(principal, NOON.timestamp())
    refused, used, _ = await seeding.admit(principal, NOON.timestamp(), keys, limits, 1, 10, 10_000)
    assert refused is None
    assert used == [2, 171, 200_000, 1_220_000]
    # What the usage frame says: the rebuilt figures and the new reservation.
    assert (await quotas.usage(principal, now=NOON.timestamp()))["tokens_today"] == 181


async def test_two_processes_rebuilding_at_once_count_once(principal):
    """Eight admissions at once find the counters unseeded, each reads the database and seeds: counted once."""
    keys = counters.counter_keys(principal, NOON.timestamp())
    limits = counters.limits_of(principal)
    outcomes = await asyncio.gather(
        *(seeding.admit(principal, NOON.timestamp(), keys, limits, 1, 10, 10_000) for _ in range(8))
    )
    assert all(refused is None for refused, _, _ in outcomes)
    assert await counters.counters().read(keys) == [2 + 8, 171 + 80, 200_000 + 80_000, 1_220_000 + 80_000]

    # Two counter objects (two processes) seeding the same figures at once, directly: once.
    await forget(principal)
    prefix = counters.counters().prefix
    first, second = counters.RedisCounters(prefix), counters.RedisCounters(prefix)
    figures = (2, 171, 200_000, 1_220_000)
    await asyncio.gather(*(c.seed(keys, figures, day=True, month=True) for c in (first, second, first, second)))
    assert await first.read(keys) == list(figures)


async def test_a_reservation_redis_lost_is_settled_with_what_its_turn_cost(principal):
    """Admitted, then Redis restarts empty: the rebuild cannot know the turn (its reply is not saved yet), so
    its settlement adds what it cost in all; one released adds nothing; one whose counters are not rebuilt yet
    is left to the rebuild, which reads its reply from the database."""
    now = NOON.timestamp()
    answered = await admit(principal, now)
    dropped = await admit(principal, now)
    assert (await quotas.usage(principal, now=now))["tokens_today"] == 171 + 40

    await forget(principal)
    assert (await quotas.usage(principal, now=now))["tokens_today"] == 171  # rebuilt: no turn in progress
    await answered.settle(llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True, model="priced"), [], "abc")
    dropped.release()
    await reservations.settled()
    spent = await quotas.usage(principal, now=now)
    assert spent["tokens_today"] == 171 + 15
    assert spent["usd_today"] == pytest.approx(0.0002 + (12 * 1000 + 3 * 2000) / 1e9)

    # Lost again, and settled before anything rebuilt the counters: left alone (the reply is in the database by
    # the time they are rebuilt, and counted there).
    late = await admit(principal, now)
    await forget(principal)
    await late.settle(llm.Reply(prompt_tokens=100, completion_tokens=0, sent=True, model="priced"), [], "")
    await reservations.settled()
    assert await counters.counters().read(counters.counter_keys(principal, now), force=True) == [0, 0, 0, 0]
