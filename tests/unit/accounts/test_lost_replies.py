"""chat/accounts/counters.py against a real Redis whose reply is lost: the script ran, the connection was reset
before its answer came back (a `CLIENT KILL`, a restart a moment after the command), and the counters are tried
again. The message is reserved once, its reservation settled or given back once, and nothing logs an ERROR.

Redis is reached through testkit/cut_link.py's proxy, which lets a request through and resets its connection
when the reply comes: the client cannot tell that from a reset before the script ran.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from urllib.parse import urlsplit

import pytest

from chat import llm
from chat.accounts import counters, reservations, scripts
from testkit.cut_link import CutLink
from tests.unit.accounts.test_reservations import REQUEST, admit, principal, used

pytestmark = [pytest.mark.redis, pytest.mark.django_db]  # a first admission reads the database

REPLY = llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True)


def script(source: str) -> bytes:
    """How the client names a script on the wire (EVALSHA <sha1>)."""
    return hashlib.sha1(source.encode()).hexdigest().encode()


@pytest.fixture
async def lossy(settings):
    """The counters' Redis through a proxy that can lose a reply; the scripts loaded (a first EVALSHA of an
    unknown script is answered NOSCRIPT, and losing that answer would test nothing)."""
    url = urlsplit(settings.REDIS_URL)
    link = await CutLink(url.hostname or "127.0.0.1", url.port or 6379).start()
    settings.REDIS_URL = url._replace(netloc=f"127.0.0.1:{link.port}").geturl()
    counters.reset_counters()
    who = principal(tokens_per_day=1000)
    warm = await admit(who)
    await warm.keep(uuid.uuid4(), 1, 1)
    await warm.settle(REPLY, REQUEST, "abc")
    await reservations.adopt(who, "m", uuid.uuid4(), 1, [1])
    yield link
    await link.stop()
    counters.reset_counters()


async def test_an_admission_whose_reply_is_lost_is_reserved_once(lossy, caplog):
    who = principal(tokens_per_day=1000)
    lossy.lose_reply(script(scripts.ADMIT))
    reservation = await admit(who, prompt=10, cap=50)  # no storage_unavailable: tried again, answered
    assert lossy.lost == 1
    assert reservation.reserved == (60, 0)
    assert await used(who) == (1, 60)  # one message, one reservation
    # A refusal, too, is answered the same the second time.
    lossy.lose_reply(script(scripts.ADMIT))
    with pytest.raises(Exception, match="Tokens per day: 60 of 1000 used"):
        await admit(who, prompt=900, cap=50)
    assert lossy.lost == 2 and await used(who) == (1, 60)


async def test_a_settlement_whose_reply_is_lost_is_settled_once(lossy, caplog):
    who = principal(tokens_per_day=1000)
    reservation = await admit(who, prompt=10, cap=50)
    lossy.lose_reply(script(scripts.ADJUST))
    await reservation.settle(REPLY, REQUEST, "abc")
    assert lossy.lost == 1
    assert await used(who) == (1, 15)  # 60 reserved, 15 used: given back once (twice would leave 0)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_release_whose_reply_is_lost_gives_back_once(lossy, caplog):
    who = principal(tokens_per_day=1000)
    kept, released = await admit(who, prompt=10, cap=50), await admit(who, prompt=10, cap=50)
    lossy.lose_reply(script(scripts.ADJUST))
    released.release()
    await reservations.settled()
    assert lossy.lost == 1
    assert await used(who) == (1, 60)  # the other message's reservation is still held
    assert kept.reserved == (60, 0)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_adoption_whose_reply_is_lost_still_finds_what_it_took(lossy):
    """A new holder's adoption moves the records to its fence; retried after its reply was lost, it finds them
    under that fence and takes them (each settled once all the same)."""
    who, session = principal(tokens_per_day=1000), uuid.uuid4()
    old = await admit(who, prompt=10, cap=50)
    await old.keep(session, 1, 7)
    lossy.lose_reply(script(scripts.ADOPT))
    adopted = await reservations.adopt(who, "m", session, 2, [7])
    assert lossy.lost == 1
    assert list(adopted) == [7]  # not charged again in full by `charge_only`
    await adopted[7].settle(REPLY, REQUEST, "abc")
    assert await used(who) == (1, 15)
    old.release()  # the old holder lets go after the take-over: nothing changes
    await reservations.settled()
    assert await used(who) == (1, 15)


async def test_a_settlement_redis_does_not_answer_in_the_window_is_no_error(lossy, settings, caplog):
    """Redis unreachable past R2D2_STORAGE_RETRY_SECONDS: the settlement is given up (the reservation stays
    charged as reserved) with no ERROR traceback; the outage's WARNING is chat/ops/storage.py's."""
    settings.R2D2_STORAGE_RETRY_SECONDS = 0.3
    who = principal(tokens_per_day=1000)
    reservation = await admit(who, prompt=10, cap=50)
    await lossy.cut()
    reservation.release()
    await reservations.settled()
    await lossy.restore()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await used(who) == (1, 60)
