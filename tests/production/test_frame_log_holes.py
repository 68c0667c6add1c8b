"""The frame log has no holes (issue 26), over real sockets on two Daphne processes sharing PostgreSQL and
Redis: a failed append is retried in order, a lost log is written back by its live holder, and a reader
refuses a log with a hole instead of forwarding it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
import redis.asyncio as redis
from django.conf import settings

from testkit.client import ProtocolClient
from testkit.redis import PrivateRedis
from tests.e2e.test_resume import check_sequence, post, reply_row, resume, start
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_redis_restart import private_redis  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

WORDS = [f"word{i}" for i in range(100)]
#: 100 words, one every 0.1 s: a Redis outage of several seconds fits inside the reply.
LONG = "[[token_delay=0.1 text=" + "_".join(WORDS) + "]] tell me a very long story"
LONG_REPLY = " ".join(WORDS)


class KeptRedis(PrivateRedis):
    """A private redis-server that keeps its data across a restart (an append-only file, synced per write)."""

    def __init__(self, directory) -> None:
        super().__init__()
        self.directory = directory

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes"]
            + ["--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
                return
            subprocess.run(["sleep", "0.05"])
        raise RuntimeError("redis-server did not start")


@pytest.fixture
def kept_redis(tmp_path):
    server = KeptRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def message_of(frames: list[dict]) -> tuple[str, str]:
    [message] = [f["data"] for f in frames if f["type"] == "message"]
    return "".join(f["data"] for f in frames if f["type"] == "message_delta"), message


@needs_redis_server
async def test_a_failed_append_followed_by_later_frames_leaves_no_hole(daphne_factory, fake_llm, kept_redis):
    """Redis is down for longer than redis-py's retries while the holder streams a reply, and comes back
    with its data: the holder's client saw the reply flow on, and a resume on the other process replays
    every frame, in order, as the holder's client saw them."""
    server_a = daphne_factory(REDIS_URL=kept_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=kept_redis.url, **FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, LONG)
    seen = [await client.recv() for _ in range(5)]

    kept_redis.stop()
    during = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 6
    while loop.time() < until:
        during.append(await client.recv(timeout=5))  # the conversation does not stop for the log
    kept_redis.start()
    assert len(during) > 30, len(during)
    seen += during + await client.until("processing_end", timeout=30)
    check_sequence(seen, session_id)
    deltas, message = message_of(seen)
    assert deltas == message == LONG_REPLY
    assert "frame log append failed" in server_a.log()
    await client.connection.close()

    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, 2)
    assert resumed["type"] == "session_resumed", resumed
    replayed = await client.until("processing_end")
    assert [f["seq"] for f in replayed] == [f["seq"] for f in seen[2:]]  # no hole
    assert replayed == seen[2:]
    assert (await reply_row(session_id)).content == LONG_REPLY
    await client.close()


@needs_redis_server
async def test_a_redis_restart_that_loses_the_log_costs_no_resume(daphne_factory, fake_llm, private_redis):  # noqa: F811
    """Redis restarts empty while the session is detached on its holder: a resume on the other process
    is answered from the frames the holder writes back, not refused."""
    server_a = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=private_redis.url, **FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    seen = await client.post(session_id, "[[token_delay=0.01 text=one_two_three_four]] count", stream=True)
    check_sequence(seen, session_id)
    await client.connection.close()

    private_redis.stop()
    await asyncio.sleep(0.5)
    private_redis.start()
    await asyncio.sleep(1.0)  # the channel layer's and the log's clients find it again

    client = await ProtocolClient.connect(server_b.url)
    resumed = await resume(client, session_id, token, 1)
    assert resumed == {"type": "session_resumed", "data": {"session_id": session_id, "last_seq": seen[-1]["seq"]}}
    assert [await client.recv() for _ in range(len(seen) - 1)] == seen[1:]
    more = await client.post(session_id, "and now?")  # B holds it now, and the seqs go on
    check_sequence(more, session_id, first=seen[-1]["seq"] + 1)
    await client.close()


@pytest.mark.redis
async def test_a_reader_refuses_a_log_with_a_hole(daphne_factory, fake_llm):
    """A log with a hole (as an append that failed used to leave): a resume on the other process is refused
    `resume_unavailable` instead of replaying frames around the hole; on the holder's own process it is
    replayed whole from memory."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    seen = await client.post(session_id, "[[token_delay=0.01 text=one_two_three_four_five]] count", stream=True)
    await client.connection.close()
    log = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert await log.xdel(f"r2d2:frames:{session_id.replace('-', '')}", "4-0") == 1
    finally:
        await log.aclose()

    client = await ProtocolClient.connect(server_b.url)
    refused = await resume(client, session_id, token, 2)
    assert refused["type"] == "error" and refused["data"]["code"] == "resume_unavailable", refused
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(timeout=0.5)
    await client.close()

    client = await ProtocolClient.connect(server_a.url)
    assert (await resume(client, session_id, token, 2))["type"] == "session_resumed"
    assert [await client.recv() for _ in range(len(seen) - 2)] == seen[2:]
    await client.close()


@needs_redis_server
async def test_a_resume_asked_while_redis_restarts_is_answered(daphne_factory, fake_llm, kept_redis):
    """The client of a detached session resumes it on the other process while Redis is down for a second (a
    restart that keeps its data): the resume waits Redis out and replays the frames after its last seq, rather
    than being refused `storage_unavailable` (the log's reads were not retried)."""
    server_a = daphne_factory(REDIS_URL=kept_redis.url, **FAST_LIVENESS)
    server_b = daphne_factory(REDIS_URL=kept_redis.url, **FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    seen = await client.post(session_id, "[[token_delay=0.01 text=one_two_three_four]] count", stream=True)
    check_sequence(seen, session_id)
    await client.connection.close()
    other = await ProtocolClient.connect(server_b.url)

    kept_redis.stop()
    await other.send(
        {"action": "chatbot_session_resume", "session_id": session_id, "resume_token": token, "last_seq": 1}
    )
    await asyncio.sleep(1.0)
    kept_redis.start()

    resumed = await other.recv(timeout=15)
    assert resumed == {"type": "session_resumed", "data": {"session_id": session_id, "last_seq": seen[-1]["seq"]}}
    assert [await other.recv() for _ in range(len(seen) - 1)] == seen[1:]
    await other.close()
