"""A watch outlives its Redis subscription (issue 28), over real sockets on two Daphne processes sharing
PostgreSQL and a private Redis: a watcher on the other process than the holder follows a streaming reply while
Redis restarts, while every pub/sub connection is killed (`CLIENT KILL TYPE pubsub`), and while its own process's
link to Redis is cut and the reply ends meanwhile. In each, plain and resumable, what it puts together (the
snapshot's partial, then the deltas) is the saved reply, its seqs run on with no gap and no double, and the next
turn reaches it too."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as redis

from testkit.cut_link import CutLink
from testkit.redis import PrivateRedis
from testkit.server import LiveServer
from tests.e2e.test_watch import assembled, check_numbered, connect, make_key, saved_reply, watch
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_redis_restart import private_redis  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]

WORDS = [f"word{i}" for i in range(40)]
#: 40 words, one every 0.05 s: the reply is written in 2 s, and ends inside a Redis outage that starts early in it.
REPLY = " ".join(WORDS)
STORY = "[[token_delay=0.05 text=" + "_".join(WORDS) + "]] tell me a story"

Fault = Callable[[], Awaitable[None]]


async def follow_through(holder_server: LiveServer, watcher_server: LiveServer, fault: Fault, *, resumable: bool):
    """The holder on one process streams a reply; the watcher on the other joins before it, and `fault` strikes
    after the watcher has the reply's first frames. Returns what the watcher got."""
    _, key = await make_key(f"through a fault, resumable={resumable}")
    holder = await connect(holder_server.url, key)
    session_id = await holder.start_session(resumable=resumable)
    watcher = await connect(watcher_server.url, key)
    snapshot = await watch(watcher, session_id)
    assert snapshot["data"] == {"session_id": session_id, "messages": [], "partial": None}
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": STORY, "stream": True}
    )
    live = [await watcher.recv() for _ in range(3)]  # processing_start and two deltas: the watch is live
    await fault()
    live += await watcher.until("processing_end", timeout=60)
    await holder.until("processing_end", timeout=60)
    check_numbered(live, session_id)
    assert [f["type"] for f in live].count("processing_start") == 1
    assert [f["type"] for f in live][-2:] == ["message", "processing_end"]
    assert assembled(snapshot, live) == live[-2]["data"] == (await saved_reply(session_id)).content == REPLY

    # The watch goes on: the next turn reaches it, its seqs following on.
    await holder.post(session_id, "again")
    after = await watcher.until("processing_end", timeout=30)
    check_numbered(live + after, session_id)
    assert [f["data"] for f in after if f["type"] == "message"] == ["Echo: again"]
    await holder.close()
    await watcher.close()
    return live + after


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
async def test_a_watcher_follows_a_reply_through_a_redis_restart(
    daphne_factory,
    fake_llm,
    private_redis: PrivateRedis,  # noqa: F811
    resumable: bool,
):
    """Redis goes away for 2.5 s (the reply ends meanwhile) and comes back empty: its pub/sub subscriptions, the
    channel layer's groups and messages, the frame log all gone."""
    server_a = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)

    async def restart() -> None:
        await asyncio.to_thread(private_redis.restart, 2.5)

    await follow_through(server_a, server_b, restart, resumable=resumable)


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
async def test_a_watcher_follows_a_reply_through_killed_subscriptions(
    daphne_factory,
    fake_llm,
    private_redis: PrivateRedis,  # noqa: F811
    resumable: bool,
):
    """Every pub/sub connection is killed, Redis running on, ten times while the reply streams."""
    server_a = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    admin = redis.Redis.from_url(private_redis.url)
    killed: list[int] = []

    async def kill_subscriptions() -> None:
        for _ in range(10):
            killed.append(await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            await asyncio.sleep(0.15)

    try:
        await follow_through(server_a, server_b, kill_subscriptions, resumable=resumable)
    finally:
        await admin.aclose()
    assert sum(killed) >= 10  # each kill found the watching process's subscription (it came back each time)


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
async def test_a_watcher_whose_link_to_redis_is_cut_gets_what_it_missed(
    daphne_factory,
    fake_llm,
    private_redis: PrivateRedis,  # noqa: F811
    resumable: bool,
):
    """Only the watcher's process loses Redis, for 2.5 s, while the holder's goes on publishing and the reply ends:
    every frame of that time is lost to the watching process's subscription, the turn's last ones too, and nothing
    after them would show it a gap. Once back, it asks for them."""
    link = await CutLink("127.0.0.1", private_redis.port).start()
    server_a = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=f"redis://127.0.0.1:{link.port}/0", **FAST_LIVENESS)

    async def cut() -> None:
        await link.cut()
        await asyncio.sleep(2.5)
        await link.restore()

    try:
        await follow_through(server_a, server_b, cut, resumable=resumable)
    finally:
        await link.stop()

