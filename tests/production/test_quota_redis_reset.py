"""Redis connections reset under two live servers (`CLIENT KILL TYPE normal`, Redis running on) while a key with
limits posts: every post is admitted and answered, none is refused `storage_unavailable`, and the key's usage
counts each message once and each turn what the model reported, once (issue 26).

The quota's scripts (chat/accounts/counters.py) run once per call, so a reset that cuts one off after Redis ran it
is retried like any other storage call; before, admission was retried only while Redis refused connections, and
such a post was refused `storage_unavailable` within milliseconds. The servers share PostgreSQL and a private
redis-server (testkit/redis.py), whose clients are killed every few milliseconds.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async

from chat.accounts import auth
from testkit.client import ProtocolClient
from testkit.redis import PrivateRedis
from testkit.wait import async_wait_until
from tests.production.test_accounting_multiprocess import charged, connect, usage

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]

ROUNDS, PER_SOCKET = 4, 4  # each socket posts 4 messages at once (3 queued), 4 times


@pytest.fixture
def private_redis():
    server = PrivateRedis().start()
    yield server
    server.stop()


async def kill_clients(port: int, stop: asyncio.Event) -> int:
    """`CLIENT KILL TYPE normal` (every connection but its own) every 5 ms until `stop`; how many it killed."""
    killer = aioredis.Redis(port=port)
    killed = 0
    try:
        while not stop.is_set():
            killed += await killer.client_kill_filter(_type="normal")
            await asyncio.sleep(0.005)
    finally:
        await killer.aclose()
    return killed


async def round_of_posts(client: ProtocolClient, session_id: str, round_number: int) -> list[dict]:
    """PER_SOCKET messages at once; every frame until each has its processing_end, or an error that ends it."""
    for n in range(PER_SOCKET):
        text = f"round {round_number} message {n}"
        await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text})
    frames, ended = [], 0
    while ended < PER_SOCKET:
        frame = await client.recv(timeout=30)
        frames.append(frame)
        ended += frame["type"] in ("processing_end", "error")
    return frames


async def messages_counted(port: int, api_key_id: int) -> int:
    """The key's messages in every minute's counter (the test may cross a minute)."""
    reader = aioredis.Redis(port=port)
    try:
        keys = [key async for key in reader.scan_iter(match=f"*:quota:key:{api_key_id}:m:*")]
        return sum(int(n) for n in await reader.mget(keys)) if keys else 0
    finally:
        await reader.aclose()


async def test_posts_while_redis_connections_are_reset_are_all_answered_and_counted_once(daphne_factory, private_redis):
    env = {"REDIS_URL": private_redis.url, "R2D2_MAX_QUEUED_MESSAGES": str(PER_SOCKET)}
    servers = [daphne_factory(**env), daphne_factory(**env)]
    row, key = await sync_to_async(auth.create_api_key)(
        "reset", messages_per_minute=10_000, tokens_per_day=10_000_000, max_output_tokens=50
    )
    clients = [await connect(server, key) for server in (*servers, *servers)]
    sessions = [await client.start_session() for client in clients]

    stop = asyncio.Event()
    killing = asyncio.create_task(kill_clients(private_redis.port, stop))
    try:
        frames = []
        for round_number in range(ROUNDS):
            rounds = [round_of_posts(c, s, round_number) for c, s in zip(clients, sessions, strict=True)]
            frames += [f for found in await asyncio.gather(*rounds) for f in found]
    finally:
        stop.set()
        killed = await killing
    assert killed > 0

    posts = ROUNDS * PER_SOCKET * len(clients)
    assert [f["data"] for f in frames if f["type"] == "error"] == []  # none storage_unavailable, none anything
    assert sum(f["type"] == "message" for f in frames) == posts
    # Each message counted once; each turn charged what the model reported, once (a reservation reserved
    # twice would leave more, a settlement made twice less). The last settlements may still be waiting out
    # the last resets when the last reply comes.
    assert await messages_counted(private_redis.port, row.id) == posts
    reported = await charged(row.id)
    assert len(reported) == posts

    async def tokens_used() -> int:
        return (await usage(clients[0]))["tokens_today"]["used"]

    async def settled() -> bool:
        return await tokens_used() == sum(reported)

    assert await async_wait_until(settled, timeout=20), (await tokens_used(), sum(reported))
    for client in clients:
        await client.close()
    for server in servers:
        assert "settling a quota reservation failed" not in server.log()
