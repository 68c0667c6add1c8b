"""Every token accounted, across two live server processes on PostgreSQL + Redis (issue 20).

A burst of messages at once, over several sockets on both processes, is charged at most the
limit plus one turn, in tokens and in dollars, and every message not answered was refused with
`quota_exceeded`; concurrent session starts stop at exactly the key's limit; a turn cancelled
before its first token is charged its prompt; `chatbot_usage` tells a key and an anonymous
socket what they used.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from chat.accounts import auth
from chat.models import ChatMessage, ChatSession, Role
from testkit.client import ProtocolClient
from tests.production.conftest import http_get

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

make_key = sync_to_async(auth.create_api_key)
#: One dollar per thousand tokens, in and out: a turn's cost in dollars is its tokens / 1,000.
PRICES = "gpt-3.5-turbo=1000:1000"
#: A reply of 30 words, which a key's output cap of 10 cuts to 10 tokens.
LONG = "[[text=" + "_".join(f"w{i}" for i in range(30)) + "]]"


async def connect(server, key: str | None = None) -> ProtocolClient:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return await ProtocolClient.connect(server.url, additional_headers=headers)


async def usage(client: ProtocolClient) -> dict:
    await client.send({"action": "chatbot_usage"})
    frame = await client.recv()
    assert frame["type"] == "usage", frame
    return frame["data"]


@sync_to_async
def charged(api_key_id: int) -> list[int]:
    """What the model reported for each answered turn of the key (prompt + completion), from the database."""
    replies = ChatMessage.objects.filter(session__api_key_id=api_key_id, role=Role.ASSISTANT)
    return [(r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in replies]


async def burst(clients: list[ProtocolClient], per_socket: int) -> tuple[int, list[dict]]:
    """Post `per_socket` messages on each socket's session all at once; returns (answered, refusals)."""
    sessions = [await client.start_session() for client in clients]
    posts = [
        client.send(
            {"action": "chatbot_post_message", "session_id": session, "user_message": f"{LONG} burst {n} of {i}"}
        )
        for i, (client, session) in enumerate(zip(clients, sessions, strict=True))
        for n in range(per_socket)
    ]
    await asyncio.gather(*posts)

    async def outcomes(client: ProtocolClient) -> tuple[int, list[dict]]:
        answered, refusals, settled = 0, [], 0
        while settled < per_socket:
            frame = await client.recv(timeout=20)
            if frame["type"] == "message":
                answered += 1
            elif frame["type"] == "error":
                refusals.append(frame["data"])
                # Refused at admission, nothing more comes for it; or, admitted before the replies ahead of it
                # existed, refused at its turn when its prompt grew (then its processing_end follows).
                settled += "grew" not in frame["data"]["message"]
            elif frame["type"] == "processing_end":
                settled += 1
        return answered, refusals

    results = await asyncio.gather(*(outcomes(client) for client in clients))
    return sum(a for a, _ in results), [r for _, rs in results for r in rs]


async def settled_usage(client: ProtocolClient) -> dict:
    """The usage frame once every turn's settlement has landed (they run just after each turn ends)."""
    previous = None
    for _ in range(50):
        current = await usage(client)
        if current == previous:
            return current
        previous = current
        await asyncio.sleep(0.2)
    return previous


async def test_a_burst_against_tokens_and_against_money_is_charged_at_most_the_limit_plus_one_turn(
    daphne_factory, fake_llm
):
    """20 messages at once, 5 on each of 4 sockets, 2 sockets on each process: the key pays at most its
    limit plus one turn, and every message that was not answered got `quota_exceeded`."""
    env = {"R2D2_REQUIRE_AUTH": "1", "R2D2_MAX_QUEUED_MESSAGES": "10", "R2D2_MODEL_PRICES": PRICES}
    server_a, server_b = daphne_factory(**env), daphne_factory(**env)
    cases = [
        ("tokens", {"tokens_per_day": 300}, "tokens_today", 300),
        ("money", {"usd_per_day": Decimal("0.3")}, "usd_today", 0.3),
    ]
    for name, limit, figure, allowed in cases:
        row, key = await make_key(name, messages_per_minute=1000, max_output_tokens=10, **limit)
        clients = [await connect(server, key) for server in (server_a, server_b, server_a, server_b)]
        requests_before = len(fake_llm.requests)
        answered, refusals = await burst(clients, per_socket=5)

        assert answered + sum(r["code"] == "quota_exceeded" for r in refusals) == 20, (name, answered, refusals)
        assert {r["code"] for r in refusals} == {"quota_exceeded"}, refusals
        assert 0 < answered < 20, (name, answered)
        assert len(fake_llm.requests) - requests_before == answered  # a refused message never reached the model
        assert all(r.body["max_tokens"] == 10 for r in fake_llm.requests[requests_before:])

        turns = await charged(row.id)
        assert len(turns) == answered
        spent = await settled_usage(clients[1])
        if figure == "tokens_today":
            assert spent["tokens_today"] == {
                "used": sum(turns),
                "limit": 300,
                "resets_at": spent["usd_today"]["resets_at"],
            }
            assert sum(turns) <= allowed + max(turns), (turns, allowed)
        else:
            assert spent["usd_today"]["used"] == pytest.approx(sum(turns) / 1000)
            assert spent["usd_today"]["limit"] == 0.3
            assert sum(turns) / 1000 <= allowed + max(turns) / 1000, (turns, allowed)
        for client in clients:
            await client.close()

    # Past 80% of the money limit: one warning for the key, from whichever process crossed it: one WARNING
    # line, and one in the two processes' /metrics.
    warnings = 0.0
    for server in (server_a, server_b):
        page = (await sync_to_async(http_get)(server.port, "/metrics")).body.decode()
        for line in page.splitlines():
            if line.startswith('r2d2_spend_warnings_total{limit="usd_per_day"}'):
                warnings += float(line.split()[-1])
    assert warnings == 1
    server_a.stop()
    server_b.stop()
    warned = [
        json.loads(line)
        for line in (server_a.log() + server_b.log()).splitlines()
        if '"spending past 80% of a limit"' in line
    ]
    assert [(w["principal"], w["limit"], w["limit_usd"]) for w in warned] == [("money", "usd_per_day", 0.3)]


async def test_concurrent_session_starts_stop_at_exactly_the_keys_limit(daphne_factory, fake_llm):
    """8 `chatbot_session_start` at once, 4 on each process, half of them resumable: exactly 2 sessions."""
    server_a, server_b = daphne_factory(R2D2_REQUIRE_AUTH="1"), daphne_factory(R2D2_REQUIRE_AUTH="1")
    row, key = await make_key("two-at-most", max_sessions=2)
    for attempt in range(2):  # and again once those two have ended
        clients = [await connect(server, key) for server in (server_a, server_b) * 4]
        await asyncio.gather(
            *(
                client.send({"action": "chatbot_session_start", "resumable": n % 2 == 0})
                for n, client in enumerate(clients)
            )
        )
        frames = await asyncio.gather(*(client.recv() for client in clients))
        started = [f for f in frames if f["type"] == "session_start"]
        refused = [f["data"] for f in frames if f["type"] == "error"]
        assert len(started) == 2, frames
        assert len(refused) == 6 and all(r["code"] == "quota_exceeded" for r in refused), refused
        assert all(r["message"] == "Concurrent sessions: 2 of 2 are live; end one to start another." for r in refused)
        live = await ChatSession.objects.live().filter(api_key_id=row.id).acount()
        assert live == 2, attempt
        for client, frame in zip(clients, frames, strict=True):
            if frame["type"] == "session_start":
                await client.send({"action": "chatbot_session_end", "session_id": frame["data"]["session_id"]})
                assert (await client.until("session_end"))[-1]["type"] == "session_end"
        for client in clients:
            await client.close()


async def test_a_cancel_before_the_first_token_is_charged_the_prompt(daphne_factory, fake_llm):
    """The request reached the model, which had said nothing yet, when another connection of the key, on
    the other process, stopped the turn: the prompt is charged (estimated: the model reported nothing)."""
    server_a, server_b = daphne_factory(R2D2_REQUIRE_AUTH="1"), daphne_factory(R2D2_REQUIRE_AUTH="1")
    row, key = await make_key("canceller", tokens_per_day=100_000)
    holder, other = await connect(server_a, key), await connect(server_b, key)
    session = await holder.start_session()
    question = "[[ttft=5]] " + "a long question that the model reads before it answers " * 10
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session, "user_message": question, "stream": True}
    )
    assert (await holder.recv())["type"] == "processing_start"
    assert await sync_to_async(fake_llm.wait_for)(lambda f: len(f.requests) == 1)  # at the model, thinking
    before = (await usage(other))["tokens_today"]["used"]  # the turn's reservation, held meanwhile
    assert before > 0

    await other.send({"action": "chatbot_cancel", "session_id": session})
    assert [f["type"] for f in await holder.until("processing_end")] == ["processing_end"]
    assert (await other.recv())["type"] == "cancelled"  # the canceller's answer
    prompt = math.ceil(sum(len(m["content"]) for m in fake_llm.requests[0].messages) / 4)
    spent = await settled_usage(other)
    assert spent["tokens_today"]["used"] == prompt  # its prompt, in place of the reservation
    assert prompt >= 130 and before > prompt  # the reservation held the prompt and the reply it might have had
    assert await charged(row.id) == []  # nothing was said: no reply row


async def test_the_usage_frame_for_a_key_and_for_an_anonymous_socket(daphne_factory, fake_llm):
    """A key's figures are the same from either process; an anonymous socket sees only its own."""
    env = {"R2D2_MODEL_PRICES": PRICES, "R2D2_QUOTA_MESSAGES_PER_MINUTE": "20"}
    server_a, server_b = daphne_factory(**env), daphne_factory(**env)
    row, key = await make_key("figures", tokens_per_day=200_000, usd_per_day=Decimal("5"), max_sessions=8)
    on_a, on_b = await connect(server_a, key), await connect(server_b, key)
    minute = int(time.time() // 60)
    session = await on_a.start_session()
    assert {"type": "message", "data": "Echo: how much?"} in await on_a.post(session, "how much?")
    await on_b.start_session()
    spent = await settled_usage(on_b)
    same_minute = int(time.time() // 60) == minute

    [tokens] = await charged(row.id)
    now = datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    next_month = (now.replace(day=1) + timedelta(days=32)).strftime("%Y-%m-01T00:00:00Z")
    assert spent == {
        "messages_per_minute": {"used": 1 if same_minute else 0, "limit": 20},
        "tokens_today": {"used": tokens, "limit": 200_000, "resets_at": tomorrow},
        "usd_today": {"used": tokens / 1000, "limit": 5.0, "resets_at": tomorrow},
        "usd_this_month": {"used": tokens / 1000, "limit": None, "resets_at": next_month},
        "sessions": {"used": 2, "limit": 8},
    }
    from_a = await usage(on_a)  # the other process says the same
    assert {**from_a, "messages_per_minute": None} == {**spent, "messages_per_minute": None}

    # An anonymous socket: its own figures against its own limits, nobody else's.
    anonymous, stranger = await connect(server_b), await connect(server_b)
    own = await anonymous.start_session()
    await anonymous.post(own, "mine")
    await stranger.start_session()
    mine = await settled_usage(anonymous)
    [reply] = [m async for m in ChatMessage.objects.filter(session_id=own, role=Role.ASSISTANT)]
    assert mine["tokens_today"] == {
        "used": reply.prompt_tokens + reply.completion_tokens,
        "limit": None,
        "resets_at": tomorrow,
    }
    assert mine["usd_today"]["limit"] is None and mine["usd_today"]["used"] == pytest.approx(
        mine["tokens_today"]["used"] / 1000
    )
    assert mine["sessions"] == {"used": 1, "limit": 8}  # R2D2_MAX_SESSIONS_PER_CONNECTION
    assert mine["messages_per_minute"]["limit"] == 30  # R2D2_RATE_LIMIT_PER_MINUTE
    assert (await usage(stranger))["tokens_today"]["used"] == 0
