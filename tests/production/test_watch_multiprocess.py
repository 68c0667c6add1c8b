"""Watching across two live Daphne processes on PostgreSQL and Redis (issue 28): a watcher on the other process
joins mid-reply and adds up to the saved reply; ten watchers on both processes see the turn one of them posted;
a watch survives its holder being killed and the session resumed elsewhere."""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.models import ChatMessage, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.fake_llm import Script
from testkit.raw_websocket import RawWebSocket
from testkit.wait import async_wait_until
from tests.e2e.test_resume import SLOW, SLOW_REPLY, resume, start
from tests.e2e.test_watch import assembled, check_numbered, connect, join_mid_reply, make_key, saved_reply, watch
from tests.production.conftest import FAST_LIVENESS
from tests.production.test_slow_readers import CHUNK

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


async def test_a_watcher_on_the_other_process_joins_mid_reply(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    _, key = await make_key("two devices")
    await join_mid_reply(server_a.url, server_b.url, key, resumable=False)
    await join_mid_reply(server_a.url, server_b.url, key, resumable=True)


async def test_ten_watchers_on_both_processes_one_posts_all_see_the_turn(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    _, key = await make_key("many tabs")
    holder = await connect(server_a.url, key)
    session_id = await holder.start_session()
    watchers = [await connect((server_a, server_b)[i % 2].url, key) for i in range(10)]
    for watcher in watchers:
        assert (await watch(watcher, session_id))["type"] == "session_watching"
    await watchers[3].send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    held = await holder.until("processing_end")
    assert "".join(f["data"] for f in held if f["type"] == "message_delta") == SLOW_REPLY
    assert all(set(f) == {"type", "data"} for f in held)  # the holder's plain frames, as a seed client's
    for watcher in watchers:
        frames = await watcher.until("processing_end")
        assert [(f["type"], f["data"]) for f in frames] == [(f["type"], f["data"]) for f in held]
        check_numbered(frames, session_id)
    assert (await saved_reply(session_id)).content == SLOW_REPLY
    for client in [holder, *watchers]:
        await client.close()


async def test_a_watch_survives_its_holder_killed_and_resumed_elsewhere(daphne_factory, fake_llm):
    """The holder's process dies mid-reply; the session is resumed on the other process: the watcher (there)
    gets the interrupted turn's end and the next turn, seqs with no gap and no double."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    _, key = await make_key("kill")
    holder = await ProtocolClient.connect(server_a.url, additional_headers={"Authorization": f"Bearer {key}"})
    session_id, token = await start(holder)
    watcher = await connect(server_b.url, key)
    snapshot = await watch(watcher, session_id)
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    live = [await watcher.recv() for _ in range(15)]  # past the first checkpoint (1 s)
    server_a.kill()

    resumed = await ProtocolClient.connect(server_b.url, additional_headers={"Authorization": f"Bearer {key}"})
    assert (await resume(resumed, session_id, token, live[-1]["seq"]))["type"] == "session_resumed"
    await resumed.until("processing_end", timeout=30)
    live += await watcher.until("processing_end", timeout=30)
    check_numbered(live, session_id)
    assert live[-2]["data"]["code"] == "turn_interrupted"
    row = await saved_reply(session_id)
    assert row.status == MessageStatus.INTERRUPTED
    # What the killed process saved is its last checkpoint: the watcher saw that much, and perhaps more, as its
    # holder's socket did.
    assert row.content and assembled(snapshot, live).startswith(row.content)

    # The next turn, answered on B, reaches the watcher too.
    await resumed.post(session_id, "again")
    after = await watcher.until("processing_end")
    check_numbered(live + after, session_id)
    assert [f["data"] for f in after if f["type"] == "message"] == ["Echo: again"]
    assert await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 2
    await resumed.close()
    await watcher.close()


async def test_a_stalled_watcher_is_closed_without_slowing_the_holder_or_the_others(daphne_factory, fake_llm):
    """A watcher on B that reads nothing while ~13 MB stream: closed there with 4408; the holder's socket and a
    reading watcher get every frame, in order."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS, R2D2_STALLED_READER_SECONDS="2")
    _, key = await make_key("stalled")
    holder = await connect(server_a.url, key, max_size=None)
    session_id = await holder.start_session()
    reader = await connect(server_b.url, key, max_size=None)
    await watch(reader, session_id)

    async def turn() -> tuple[list[dict], list[dict], float]:
        """One long streamed turn, the holder and the reading watcher reading all along."""
        fake_llm.enqueue(Script(chunks=[CHUNK] * 400, token_delay=0.002))
        started = time.monotonic()
        post = {"action": "chatbot_post_message", "session_id": session_id, "user_message": "x", "stream": True}
        await holder.send(post)

        async def timed(client: ProtocolClient) -> tuple[list[dict], float]:
            frames = await client.until("processing_end", timeout=90)
            return frames, time.monotonic() - started

        (held, took), (frames, _) = await asyncio.gather(timed(holder), timed(reader))
        return held, frames, took

    stalled = await asyncio.to_thread(RawWebSocket, server_b.port, headers={"Authorization": f"Bearer {key}"})
    stalled.send({"action": "chatbot_session_watch", "session_id": session_id})
    assert (await asyncio.to_thread(stalled.receive))["type"] == "session_watching"
    held, frames, took = await turn()
    assert "".join(f["data"] for f in held if f["type"] == "message_delta") == CHUNK * 400
    assert [(f["type"], f["data"]) for f in frames] == [(f["type"], f["data"]) for f in held]
    check_numbered(frames, session_id)
    # Nothing waits for the stalled socket but its own queue (tests/unit/sessions/test_watch.py): the bound is
    # loose, for a machine shared with other work (~7 s unloaded).
    assert took < 60, took
    assert await asyncio.to_thread(stalled.read_until_closed, 60) < 64 * 1024 * 1024
    assert await async_wait_until(lambda: "closing a connection that does not read" in server_b.log(), timeout=10)
    stalled.close()
    await holder.close()
    await reader.close()


async def test_a_watcher_on_the_other_process_cancels_and_unwatches(daphne_factory, fake_llm):
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    _, key = await make_key("stop it")
    _, stranger_key = await make_key("stranger")
    holder = await connect(server_a.url, key)
    session_id = await holder.start_session()
    stranger = await connect(server_b.url, stranger_key)
    assert (await watch(stranger, session_id))["data"]["code"] == "session_not_owned"
    watcher = await connect(server_b.url, key)
    await watch(watcher, session_id)
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    await watcher.until("message_delta")
    await watcher.send({"action": "chatbot_cancel", "session_id": session_id})
    # The answer comes from the holder's process, the turn's end through the watch: in either order.
    frames = await watcher.until("processing_end")
    if {"type": "cancelled", "data": {"session_id": session_id}} not in frames:
        assert await watcher.recv() == {"type": "cancelled", "data": {"session_id": session_id}}
    await holder.until("processing_end")
    assert (await saved_reply(session_id)).status == MessageStatus.CANCELLED

    async def watchers() -> int:
        await holder.send({"action": "chatbot_sessions"})
        [listed] = (await holder.recv())["data"]
        return listed["watchers"]

    assert await watchers() == 1  # counted by the holder on A, for a socket on B
    await watcher.send({"action": "chatbot_session_unwatch", "session_id": session_id})
    assert (await watcher.recv())["type"] == "session_unwatched"

    async def none_left() -> bool:
        return await watchers() == 0

    assert await async_wait_until(none_left, timeout=5, interval=0.2)  # the holder was told
    await holder.post(session_id, "unseen")
    for client in (watcher, stranger):
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=1.0)
    for client in (holder, watcher, stranger):
        await client.close()


async def test_a_watcher_of_a_plain_session_whose_holder_is_killed_is_told_it_ended(daphne_factory, fake_llm):
    """The holder's process dies mid-reply: nobody publishes the plain session's end (the other process's sweep
    ends it), yet the watcher is not left waiting for the rest of the reply: one `error` `session_ended` naming
    the session, then `session_unwatched`."""
    server_a = daphne_factory(**FAST_LIVENESS)
    server_b = daphne_factory(**FAST_LIVENESS)
    _, key = await make_key("killed plain")
    holder = await connect(server_a.url, key)
    session_id = await holder.start_session()
    watcher = await connect(server_b.url, key)
    await watch(watcher, session_id)
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    live = [await watcher.recv() for _ in range(4)]
    server_a.kill()
    while (frame := await watcher.recv(timeout=30))["type"] == "message_delta":
        live.append(frame)  # those already on their way
    check_numbered(live, session_id)
    assert frame == {
        "type": "error",
        "data": {"code": "session_ended", "message": "That session has ended; start a new one."},
        "session_id": session_id,
    }
    assert await watcher.recv() == {"type": "session_unwatched", "data": {"session_id": session_id}}
    await watcher.close()
