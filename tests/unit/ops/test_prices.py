"""chat/ops/prices.py: one cost function, so a quota, /metrics and the admin say the same of one turn."""

from __future__ import annotations

import random
import time

import pytest

from chat import llm
from chat.accounts import counters, principals, reservations
from chat.accounts.principals import Principal
from chat.accounts.usage import ModelUsage
from chat.ops import metrics, prices

MODEL = "priced-model"


@pytest.mark.django_db  # with REDIS_URL, the first admission reads the database (chat/accounts/seeding.py)
async def test_quotas_metrics_and_the_admin_agree_on_a_turns_cost(settings):
    """7 prompt and 3 completion tokens at 0.0015/0.0006 $ per million: 13 nano-dollars, to the nano-dollar,
    wherever it is counted (as floats, /metrics and the admin could disagree with the quota)."""
    settings.R2D2_MODEL_PRICES = f"{MODEL}=0.0015:0.0006"
    nano = prices.nano_dollars((0.0015, 0.0006), 7, 3)
    assert nano == 13  # 12.3 nano-dollars, rounded up: what a float sum would not say
    reply = llm.Reply(prompt_tokens=7, completion_tokens=3, sent=True, model=MODEL)

    before = metrics.COST.labels(MODEL)._value.get()
    metrics.answered(reply)
    assert round((metrics.COST.labels(MODEL)._value.get() - before) * prices.NANO) == nano

    assert ModelUsage(model=MODEL, prompt_tokens=7, completion_tokens=3).nano == nano

    limits = principals.Limits(messages_per_minute=0, tokens_per_day=0, max_sessions=0, usd_per_day=1.0)
    who = Principal(api_key_id=random.randrange(10**12), label="unit", limits=limits)
    reservation = await reservations.admit(who, model=MODEL, prompt_tokens_estimate=7, max_output_tokens=3)
    await reservation.settle(reply, [], "abc")
    used = await counters.counters().read(counters.counter_keys(who, time.time()))
    assert used[counters.USD_DAY] == nano
