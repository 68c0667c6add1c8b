"""chat/accounts/reservations.py with fallback chains: a turn reserves at the dearest member the principal may use,
and is charged at the price of the model that answered."""

from __future__ import annotations

import pytest

from chat import llm
from chat.llm import upstreams
from chat.ops import prices
from tests.unit.accounts.test_quotas import NOON, admit, principal

#: With REDIS_URL, a principal's first admission rebuilds its counters from the database (chat/accounts/seeding.py).
pytestmark = pytest.mark.django_db

PRICES = "cheap=1:2,alt/dear=10:20,alt/dearest=100:200"


@pytest.fixture
def chain(settings):
    settings.R2D2_MODEL_PRICES = PRICES
    settings.OPENAI_API_KEY = "sk-test"
    settings.R2D2_UPSTREAMS = upstreams.parse("alt=http://127.0.0.1:9/v1", {})
    settings.R2D2_FALLBACKS = upstreams.parse_fallbacks("cheap=alt/dear|alt/dearest")


async def test_the_reservation_covers_the_dearest_member_the_principal_may_use(chain):
    output = 500  # R2D2_QUOTA_RESERVE_OUTPUT_TOKENS
    anyone = await admit(principal(usd_per_day=100.0), model="cheap", prompt=10)
    assert anyone.reserved == (10 + output, prices.nano_dollars((100, 200), 10, output))
    narrow = await admit(principal(usd_per_day=100.0, models=("cheap", "alt/dear")), model="cheap", prompt=10)
    assert narrow.reserved == (10 + output, prices.nano_dollars((10, 20), 10, output))
    assert narrow.unusable("alt/dearest") == "not in the key's models"
    assert narrow.unusable("alt/dear") is None


async def test_a_money_limit_skips_unpriced_alternates(chain, settings):
    settings.R2D2_FALLBACKS = upstreams.parse_fallbacks("cheap=alt/free-and-unpriced|alt/dear")
    reservation = await admit(principal(usd_per_day=100.0), model="cheap", prompt=10)
    assert reservation.unusable("alt/free-and-unpriced") == "unpriced, under a money limit"
    assert llm.chain("cheap", reservation.unusable) == ["cheap", "alt/dear"]
    assert (await admit(principal(), model="cheap")).unusable("alt/free-and-unpriced") is None


async def test_a_turn_is_charged_at_the_price_of_the_model_that_answered(chain):
    from chat.accounts import quotas

    who = principal(usd_per_day=100.0)
    reservation = await admit(who, model="cheap", prompt=10)
    reply = llm.Reply(prompt_tokens=10, completion_tokens=5, model="alt/dear", requested="cheap", sent=True)
    await reservation.settle(reply, [{"role": "user", "content": "x" * 40}], "answer")
    used = await quotas.usage(who, now=NOON)
    assert used["usd_today"] == prices.dollars(prices.nano_dollars((10, 20), 10, 5))
