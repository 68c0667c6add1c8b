"""chat/accounts/reservations.py: a queued message's reservation kept in the shared counters (Redis) is settled
exactly once, by its holder or by the holder that adopted it (issue 26)."""

from __future__ import annotations

import uuid

import pytest

from chat import llm
from chat.accounts import reservations
from tests.unit.accounts.test_reservations import REQUEST, admit, principal, used

pytestmark = [pytest.mark.redis, pytest.mark.django_db]  # a first admission reads the database

REPLY = llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True)


async def test_an_adopted_reservation_is_settled_by_its_adopter_only():
    who, session = principal(tokens_per_day=1000), uuid.uuid4()
    old = await admit(who, prompt=10, cap=50)
    await old.keep(session, 1, 7)
    adopted = await reservations.adopt(who, "m", session, 2, [7, 8])
    assert list(adopted) == [7] and adopted[7].reserved == (60, 0)
    # The old holder (judged dead by mistake, or draining) lets go after the take-over: nothing changes.
    old.release()
    await reservations.settled()
    assert await used(who) == (1, 60)
    await adopted[7].settle(REPLY, REQUEST, "abc")
    assert await used(who) == (1, 15)
    assert await reservations.adopt(who, "m", session, 3, [7]) == {}  # settled: nothing left to adopt


async def test_a_reservation_its_holder_settled_is_not_adopted():
    who, session = principal(tokens_per_day=1000), uuid.uuid4()
    reservation = await admit(who, prompt=10, cap=50)
    await reservation.keep(session, 1, 7)
    await reservation.settle(REPLY, REQUEST, "abc")
    assert await used(who) == (1, 15)
    assert await reservations.adopt(who, "m", session, 2, [7]) == {}


async def test_an_older_holder_cannot_take_a_reservation_back():
    who, session = principal(tokens_per_day=1000), uuid.uuid4()
    reservation = await admit(who, prompt=10, cap=50)
    await reservation.keep(session, 3, 7)
    assert await reservations.adopt(who, "m", session, 2, [7]) == {}
    assert list(await reservations.adopt(who, "m", session, 4, [7])) == [7]
