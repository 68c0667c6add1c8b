"""PostgreSQL unreachable for a moment, or for longer than the retry window, under two live Daphne processes.

The servers reach PostgreSQL through a TCP proxy (testkit/cut_link.py): cutting it resets every connection
and refuses new ones, as a restart or a failover does, without stopping the PostgreSQL other tests share
(xdist-safe). Redis stays up (the servers share it as in production).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.accounts import auth
from chat.models import ChatMessage
from testkit.client import ProtocolClient
from testkit.cut_link import CutLink
from testkit.wait import async_wait_until
from tests.production.conftest import http_get

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
async def cut_link():
    db = settings.DATABASES["default"]
    link = await CutLink(db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)).start()
    yield link
    await link.stop()


def through(link: CutLink, **env: str) -> dict[str, str]:
    """A server's environment: its database through `link`, quick checkpoints and heartbeats."""
    db = settings.DATABASES["default"]
    url = f"postgres://{db.get('USER') or 'postgres'}@127.0.0.1:{link.port}/{db['NAME']}"
    return {"DATABASE_URL": url, "R2D2_CHECKPOINT_SECONDS": "0.1", "R2D2_HEARTBEAT_SECONDS": "0.3", **env}


async def healthz(port: int) -> int:
    return (await asyncio.to_thread(http_get, port, "/healthz")).status


async def post(client: ProtocolClient, session_id: str, text: str, **fields) -> None:
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text, **fields})


def streamed_text(frames: list[dict]) -> str:
    return "".join(f["data"] for f in frames if f["type"] == "message_delta")


async def test_a_sub_second_outage_is_invisible_to_clients(cut_link, daphne_factory):
    """PostgreSQL unreachable for half a second while one process streams a reply (its checkpoints meet the cut)
    and the other is posted a message: the turn completes, the post is accepted and answered, no `error` frame,
    and every row is written once."""
    one, two = daphne_factory(**through(cut_link)), daphne_factory(**through(cut_link))
    streaming, posting = await ProtocolClient.connect(one.url), await ProtocolClient.connect(two.url)
    streamed_session, posted_session = await streaming.start_session(), await posting.start_session()
    words = " ".join(f"w{n}" for n in range(40))
    await post(streaming, streamed_session, f"[[token_delay=0.05]] {words}", stream=True)
    assert (await streaming.recv())["type"] == "processing_start"
    assert (await streaming.recv())["type"] == "message_delta"

    await cut_link.cut()
    await post(posting, posted_session, "during the outage", client_message_id="m-1")
    await asyncio.sleep(0.5)
    await cut_link.restore()

    streamed = await streaming.until("processing_end", timeout=20)
    posted = await posting.until("processing_end", timeout=20)
    assert [f for f in streamed + posted if f["type"] == "error"] == []
    assert [f["type"] for f in posted] == ["processing_start", "message", "processing_end"]
    assert posted[1]["data"] == "Echo: during the outage"
    said = "Echo: " + words  # the fake model's directive is not echoed
    assert streamed_text([json.loads(text) for text in streaming.received]) == said
    rows = [r async for r in ChatMessage.objects.filter(session_id=streamed_session)]
    assert [(r.role, r.status) for r in rows] == [("user", "started"), ("assistant", "complete")]
    assert rows[1].content == said  # each checkpoint's append made once, though retried
    rows = [r async for r in ChatMessage.objects.filter(session_id=posted_session).order_by("id")]
    assert [(r.role, r.client_message_id) for r in rows] == [("user", "m-1"), ("assistant", "")]
    for client in (streaming, posting):
        await client.close()
    for server in (one, two):
        assert "Traceback" not in server.log() and "internal_error" not in server.log()


async def test_a_restart_that_kills_every_pooled_connection_is_invisible(cut_link, daphne_factory):
    """PostgreSQL restarts at once (every connection reset, new ones accepted) while the ORM's pool holds 8 idle
    connections and its thread holds one more: the next post, whose key is re-checked and whose
    `client_message_id` is looked up on the ORM, is answered, within the retry window, with no `error` frame. (The
    pool waited a second before checking each next idle connection, so the ORM's thread stalled past the window;
    and the key's re-check was not retried on the thread's own dead connection: `storage_unavailable` both.)"""
    env = through(
        cut_link,
        R2D2_DB_POOL_MIN="8",
        R2D2_STORAGE_RETRY_SECONDS="4",
        R2D2_AUTH_RECHECK_SECONDS="0",  # every post re-checks the key on the ORM
        R2D2_HEARTBEAT_SECONDS="60",  # nothing hands the thread's connection back to the pool between the posts
    )
    server = daphne_factory(**env)
    _, key = await sync_to_async(auth.create_api_key)("restart")
    client = await ProtocolClient.connect(server.url, additional_headers={"Authorization": f"Bearer {key}"})
    session_id = await client.start_session()
    before = await client.post(session_id, "before", client_message_id="m-1")
    assert [f["type"] for f in before] == ["processing_start", "message", "processing_end"], before
    # The pool's 8 idle connections, the thread's, the turns':
    assert await async_wait_until(lambda: cut_link.connections >= 9, timeout=15), cut_link.connections

    await cut_link.cut()
    await cut_link.restore()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await post(client, session_id, "after the restart", client_message_id="m-2")
    first = await client.recv(timeout=15)
    assert first["type"] == "processing_start", first  # not refused `storage_unavailable`
    after = [first, *await client.until("processing_end")]
    assert [f["type"] for f in after] == ["processing_start", "message", "processing_end"], after
    assert after[1]["data"] == "Echo: after the restart"
    assert loop.time() - started < 4
    await client.close()
    assert "Traceback" not in server.log() and "internal_error" not in server.log()


async def test_reads_a_client_asks_for_wait_out_a_sub_second_outage(cut_link, daphne_factory):
    """`chatbot_history` and a session continuing another (`continue_session_id`), asked while PostgreSQL is
    unreachable for half a second, are answered once it is back: reads are retried like the turn's writes."""
    server = daphne_factory(**through(cut_link))
    _, key = await sync_to_async(auth.create_api_key)("reader")  # an ended session is its principal's to read
    client = await ProtocolClient.connect(server.url, additional_headers={"Authorization": f"Bearer {key}"})
    first = await client.start_session()
    await client.post(first, "remember me")
    await client.send({"action": "chatbot_session_end", "session_id": first})
    await client.until("session_end")

    await cut_link.cut()
    await client.send({"action": "chatbot_history", "session_id": first})
    await client.send({"action": "chatbot_session_start", "continue_session_id": first})
    await asyncio.sleep(0.5)
    await cut_link.restore()

    history = await client.recv(timeout=15)
    assert history["type"] == "history", history  # not refused `storage_unavailable`
    assert [m["content"] for m in history["data"]["messages"]] == ["remember me", "Echo: remember me"]
    started = await client.recv(timeout=15)
    assert started["type"] == "session_start", started
    await client.close()
    assert "Traceback" not in server.log() and "internal_error" not in server.log()


async def test_an_outage_past_the_window_answers_storage_unavailable_then_the_session_goes_on(cut_link, daphne_factory):
    """PostgreSQL unreachable for 8 s, the window 1 s: the turn in progress ends with `storage_unavailable`
    and `processing_end`, a post is refused with it, /healthz says 503; once it is back /healthz says 200, both
    sessions answer their next message, the failed turn is saved (its reply interrupted), and each server logged
    the outage as one WARNING at its start and one at its end, with no traceback."""
    env = through(cut_link, R2D2_STORAGE_RETRY_SECONDS="1")
    one, two = daphne_factory(**env), daphne_factory(**env)
    streaming, posting = await ProtocolClient.connect(one.url), await ProtocolClient.connect(two.url)
    streamed_session, posted_session = await streaming.start_session(), await posting.start_session()
    words = " ".join(f"w{n}" for n in range(100))
    await post(streaming, streamed_session, f"[[token_delay=0.05]] {words}", stream=True)
    assert (await streaming.recv())["type"] == "processing_start"
    assert (await streaming.recv())["type"] == "message_delta"

    loop = asyncio.get_running_loop()
    await cut_link.cut()
    restore_at = loop.time() + 8
    await post(posting, posted_session, "during the outage", client_message_id="m-1")
    refused = await posting.recv(timeout=15)
    assert refused["type"] == "error" and refused["data"]["code"] == "storage_unavailable", refused
    ended = await streaming.until("processing_end", timeout=15)
    said = streamed_text([json.loads(text) for text in streaming.received])
    errors = [f["data"]["code"] for f in ended if f["type"] == "error"]
    assert errors == ["storage_unavailable"] and ended[-1]["type"] == "processing_end"
    assert await healthz(one.port) == 503 and await healthz(two.port) == 503
    await asyncio.sleep(restore_at - loop.time())  # the rest of the outage: 8 s in all
    await cut_link.restore()

    for server in (one, two):
        for _ in range(50):
            if await healthz(server.port) == 200:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("/healthz stayed unhealthy after the database came back")
    after = await streaming.post(streamed_session, "after the outage")
    assert [f["type"] for f in after] == ["processing_start", "message", "processing_end"]
    again = await posting.post(posted_session, "during the outage", client_message_id="m-1")
    assert [f["type"] for f in again] == ["processing_start", "message", "processing_end"], again

    rows = [r async for r in ChatMessage.objects.filter(session_id=streamed_session)]
    for _ in range(50):  # the failed turn's state is written once the database answers (in the background)
        if [r.status for r in rows][:2] == ["started", "interrupted"]:
            break
        await asyncio.sleep(0.1)
        rows = [r async for r in ChatMessage.objects.filter(session_id=streamed_session)]
    assert [(r.role, r.status) for r in rows] == [
        ("user", "started"),
        ("assistant", "interrupted"),
        ("user", "started"),
        ("assistant", "complete"),
    ]
    assert rows[1].content == said  # what the client was shown, saved once the database answered
    posted_rows = ChatMessage.objects.filter(session_id=posted_session, role="user")
    assert [r.client_message_id async for r in posted_rows] == ["m-1"]  # refused, then accepted once
    for client in (streaming, posting):
        await client.close()
    for server in (one, two):
        warnings = [json.loads(line) for line in server.log().splitlines() if '"chat.ops.storage"' in line]
        assert [(w["message"], w["level"]) for w in warnings] == [
            ("storage unavailable", "WARNING"),
            ("storage available again", "WARNING"),
        ], server.log()
        assert warnings[1]["waited"] >= 1 and 7 <= warnings[1]["seconds"] < 11
        assert "Traceback" not in server.log() and "internal_error" not in server.log()
