"""chat/accounts/reservations.py: admission, reservations and their settlement, on the in-memory counters."""

from __future__ import annotations

import random
import time

import pytest

from chat import llm
from chat.accounts import principals, quotas, reservations
from chat.accounts.counters import Tally
from chat.accounts.principals import Principal
from chat.protocol.errors import ClientError, ErrorCode

#: With REDIS_URL, a principal's first admission rebuilds its counters from the database (chat/accounts/seeding.py).
pytestmark = pytest.mark.django_db

REQUEST = [{"role": "user", "content": "x" * 40}]  # 10 tokens, estimated


def principal(**limits) -> Principal:
    base = {"messages_per_minute": 0, "tokens_per_day": 0, "max_sessions": 0}
    return Principal(api_key_id=random.randrange(10**12), label="unit", limits=principals.Limits(**{**base, **limits}))


async def admit(who: Principal, prompt: int = 10, cap: int | None = 50) -> reservations.Reservation:
    return await reservations.admit(who, model="m", prompt_tokens_estimate=prompt, max_output_tokens=cap)


async def used(who: Principal) -> tuple[int, int]:
    figures = await quotas.usage(who)
    return figures["messages_this_minute"], figures["tokens_today"]


async def test_admission_reserves_the_prompt_and_the_reply_cap():
    who = principal(tokens_per_day=1000)
    reservation = await admit(who, prompt=10, cap=50)
    assert reservation.reserved == (60, 0)
    assert await used(who) == (1, 60)


async def test_settling_charges_what_the_model_reported_instead():
    who = principal(tokens_per_day=1000)
    reservation = await admit(who, prompt=10, cap=50)
    await reservation.settle(llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True), REQUEST, "abc")
    assert await used(who) == (1, 15)
    assert reservation.reserved == (0, 0)


async def test_a_release_gives_everything_back_and_a_later_settle_does_nothing():
    who = principal(tokens_per_day=1000)
    reservation = await admit(who)
    reservation.release()
    await reservations.settled()
    assert await used(who) == (0, 0)
    await reservation.settle(llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True), REQUEST, "abc")
    assert await used(who) == (0, 0)


async def test_a_refused_message_reserves_nothing_and_names_the_limit():
    who = principal(tokens_per_day=100)
    await admit(who, prompt=10, cap=50)
    with pytest.raises(ClientError) as refused:
        await admit(who, prompt=10, cap=50)
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED
    assert refused.value.message.startswith("Tokens per day: 60 of 100 used; this message needs up to 60 tokens")
    assert await used(who) == (1, 60)


async def test_a_prompt_grown_past_its_estimate_is_covered_or_refused():
    who = principal(tokens_per_day=70)
    reservation = await admit(who, prompt=2, cap=50)  # 52 reserved; the request turns out to be 10 tokens
    await reservation.cover(REQUEST)
    assert reservation.reserved == (60, 0) and await used(who) == (1, 60)
    bigger = [{"role": "user", "content": "x" * 200}]  # 50 tokens: 40 more than covered, 10 left
    with pytest.raises(ClientError) as refused:
        await reservation.cover(bigger)
    assert "its prompt grew by 40 tokens" in refused.value.message
    assert await used(who) == (1, 60)


async def test_an_anonymous_principal_reserves_nothing_but_keeps_its_socket_figures():
    tally = Tally()
    reservation = await reservations.admit(
        principals.ANONYMOUS, model="m", prompt_tokens_estimate=10, max_output_tokens=None, tally=tally
    )
    assert reservation.reserved == (0, 0)
    assert tally.figures(time.time())[0] == 1
    reservation.release()
    assert tally.figures(time.time())[0] == 0
