"""A budget holds across a Redis restart: two live servers on PostgreSQL and a private redis-server that keeps
nothing (testkit/redis.py); a key spends its daily budget, in tokens or in dollars, until a post is refused;
Redis restarts empty; the next posts, on either server, are refused at the same figure, and `chatbot_usage`
says the same as before the restart.

Redis is a cache of what the database records: the counters it forgot are rebuilt from the replies saved
(chat/accounts/seeding.py) before anyone is admitted or told their usage. Before, the key started the day
again from 0 and could spend its whole budget a second time.
"""

from __future__ import annotations

import shutil
import time
from decimal import Decimal

import pytest

from testkit.client import ProtocolClient
from testkit.redis import PrivateRedis
from tests.production.test_accounting_multiprocess import PRICES, charged, connect, make_key, settled_usage, usage

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]


@pytest.fixture
def private_redis():
    server = PrivateRedis().start()
    yield server
    server.stop()


async def ask(client: ProtocolClient, text: str) -> list[dict]:
    """Post one message in a session of its own (so that every post reserves the same), then end the session;
    the message's frames up to its processing_end, or the error that refused it."""
    session_id = await client.start_session()
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text})
    frames = []
    while not frames or frames[-1]["type"] not in ("processing_end", "error"):
        frames.append(await client.recv(timeout=20))
    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    await client.until("session_end")
    return frames


@pytest.mark.parametrize(
    ("limit", "figure"), [({"tokens_per_day": 200}, "tokens_today"), ({"usd_per_day": Decimal("0.2")}, "usd_today")]
)
async def test_a_daily_budget_holds_across_a_redis_restart(daphne_factory, fake_llm, private_redis, limit, figure):
    env = {"REDIS_URL": private_redis.url, "R2D2_REQUIRE_AUTH": "1", "R2D2_MODEL_PRICES": PRICES}
    server_a, server_b = daphne_factory(**env), daphne_factory(**env)
    row, key = await make_key("restarted", messages_per_minute=1000, max_output_tokens=10, **limit)
    on_a, on_b = await connect(server_a, key), await connect(server_b, key)

    # Spend the day's budget: posts answered until one is refused.
    text, answered = "how much is left?", 0
    while (frames := await ask(on_a, text))[-1]["type"] != "error":
        answered += 1
        assert answered < 100, "the budget was never reached"
    refused = frames[-1]["data"]
    assert refused["code"] == "quota_exceeded" and answered >= 3, (refused, answered)
    before = await settled_usage(on_b)
    minute = int(time.time() // 60)
    turns = await charged(row.id)
    assert len(turns) == answered
    assert before["tokens_today"]["used"] == sum(turns)  # what the database records: what is rebuilt
    fake_requests = len(fake_llm.requests)

    private_redis.restart()  # empty: the counters are gone

    # The same figures from both servers, and the same refusal: the budget was not forgotten.
    for client in (on_b, on_a):
        after = await usage(client)
        if int(time.time() // 60) != minute:  # this minute's messages are this minute's only
            after["messages_per_minute"] = before["messages_per_minute"]
        assert after == before
    for client in (on_a, on_b):
        again = await ask(client, text)
        assert [f["type"] for f in again] == ["error"], again
        assert again[0]["data"]["code"] == "quota_exceeded"
        assert again[0]["data"]["message"].split("; resets")[0] == refused["message"].split("; resets")[0]
    assert len(fake_llm.requests) == fake_requests  # nothing more reached the model
    assert before[figure]["used"] > 0.8 * before[figure]["limit"]
    await on_a.close()
    await on_b.close()
