"""Watching a session from other sockets (issue 28) on one live server: a snapshot, then the live frames,
adding up to exactly what is saved; posting and cancelling from a watcher; who may watch; what is running."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from chat.accounts import auth
from chat.models import ChatMessage, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.server import ROOT, server_env
from tests.e2e.test_resume import SLOW, SLOW_REPLY

pytestmark = pytest.mark.django_db(transaction=True)

make_key = sync_to_async(auth.create_api_key)


def bearer(key: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {key}"}}


async def connect(url: str, key: str, **kwargs) -> ProtocolClient:
    return await ProtocolClient.connect(url, **bearer(key), **kwargs)


async def watch(client: ProtocolClient, session_id: str) -> dict:
    """Send chatbot_session_watch; the `session_watching` answer (frames before it are the watcher's own)."""
    await client.send({"action": "chatbot_session_watch", "session_id": session_id})
    while True:
        frame = await client.recv()
        if frame["type"] in {"session_watching", "error"}:
            return frame


async def saved_reply(session_id: str) -> ChatMessage:
    return await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).alast()


def assembled(snapshot: dict, live: list[dict]) -> str:
    """The reply as a watcher puts it together: the snapshot's partial, then the deltas after it."""
    return (snapshot["data"]["partial"] or "") + "".join(f["data"] for f in live if f["type"] == "message_delta")


def check_numbered(frames: list[dict], session_id: str) -> None:
    """Each frame says its session, and the seqs run on with no gap and no double."""
    assert {f["session_id"] for f in frames} == {session_id}
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def join_mid_reply(holder_url: str, watcher_url: str, key: str, *, resumable: bool) -> None:
    """A watcher joins while a reply streams: messages + partial + live frames == the saved reply."""
    holder = await connect(holder_url, key)
    session_id = await holder.start_session(resumable=resumable)
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    seen = [await holder.recv() for _ in range(6)]  # processing_start and five deltas
    watcher = await connect(watcher_url, key)
    snapshot = await watch(watcher, session_id)
    assert snapshot["type"] == "session_watching", snapshot
    assert snapshot["data"]["messages"] == [{"role": "user", "content": SLOW, "status": "started"}]
    assert snapshot["data"]["partial"] and SLOW_REPLY.startswith(snapshot["data"]["partial"])
    live = await watcher.until("processing_end")
    seen += await holder.until("processing_end")
    check_numbered(live, session_id)
    assert [f["type"] for f in live][-2:] == ["message", "processing_end"]
    row = await saved_reply(session_id)
    assert row.status == MessageStatus.COMPLETE
    assert assembled(snapshot, live) == live[-2]["data"] == row.content == SLOW_REPLY
    # The holder's socket sees its frames as before: a plain session's carry no session_id, no seq.
    assert all(("seq" in f) == resumable for f in seen)
    await holder.close()
    await watcher.close()


async def test_a_watcher_joins_mid_reply_plain_and_resumable(daphne, fake_llm):
    _, key = await make_key("laptop")
    await join_mid_reply(daphne.url, daphne.url, key, resumable=False)
    await join_mid_reply(daphne.url, daphne.url, key, resumable=True)


async def test_a_watcher_posts_and_every_socket_sees_the_turn(daphne, fake_llm):
    """The holder is a seed-style client: it sees seed bytes for the turn a watcher posted."""
    _, key = await make_key("phone")
    holder = await connect(daphne.url, key)
    session_id = await holder.start_session()
    watchers = [await connect(daphne.url, key) for _ in range(3)]
    for watcher in watchers:
        assert (await watch(watcher, session_id))["data"] == {"session_id": session_id, "messages": [], "partial": None}
    await watchers[0].send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "hello", "client_message_id": "m1"}
    )
    held = await holder.until("processing_end")
    assert holder.received[-3:] == [
        '{"type": "processing_start", "data": null}',
        '{"type": "message", "data": "Echo: hello"}',
        '{"type": "processing_end", "data": null}',
    ]
    assert [f["type"] for f in held] == ["processing_start", "message", "processing_end"]
    for watcher in watchers:
        frames = await watcher.until("processing_end")
        assert [(f["type"], f["data"]) for f in frames] == [(f["type"], f["data"]) for f in held]
        check_numbered(frames, session_id)
    # client_message_id holds from a watcher as from the holder: a resend is refused.
    await watchers[1].send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "hello", "client_message_id": "m1"}
    )
    assert (await watchers[1].recv())["data"]["code"] == "duplicate_message"
    assert await ChatMessage.objects.filter(session_id=session_id, role=Role.USER).acount() == 1
    for client in [holder, *watchers]:
        await client.close()


async def test_a_watcher_cancels_the_turn(daphne, fake_llm):
    _, key = await make_key("tab")
    holder = await connect(daphne.url, key)
    session_id = await holder.start_session()
    watcher = await connect(daphne.url, key)
    await watch(watcher, session_id)
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    await holder.until("message_delta")
    await watcher.send({"action": "chatbot_cancel", "session_id": session_id})
    frames = await watcher.until("processing_end")
    assert {"type": "cancelled", "data": {"session_id": session_id}} in frames
    assert [f["type"] for f in await holder.until("processing_end")][-1] == "processing_end"
    row = await saved_reply(session_id)
    assert row.status == MessageStatus.CANCELLED
    await holder.close()
    await watcher.close()


async def test_another_principal_an_ended_session_unwatch_and_close(daphne, fake_llm):
    _, key = await make_key("mine")
    _, other_key = await make_key("theirs")
    holder = await connect(daphne.url, key)
    session_id = await holder.start_session()
    stranger = await connect(daphne.url, other_key)
    refused = await watch(stranger, session_id)
    assert refused["data"]["code"] == "session_not_owned"

    watcher, closing = await connect(daphne.url, key), await connect(daphne.url, key)
    await watch(watcher, session_id)
    await watch(closing, session_id)
    await watcher.send({"action": "chatbot_session_unwatch", "session_id": session_id})
    assert await watcher.recv() == {"type": "session_unwatched", "data": {"session_id": session_id}}
    await closing.close()
    await holder.post(session_id, "after")
    for client in (watcher, stranger):
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=0.5)

    await holder.send({"action": "chatbot_session_end", "session_id": session_id})
    await holder.recv()
    assert (await watch(watcher, session_id))["data"]["code"] == "session_ended"
    for client in (holder, watcher, stranger):
        await client.close()


async def test_an_ended_session_ends_the_watch(daphne, fake_llm):
    """The holder's socket closes: a plain session ends, and its watchers are told."""
    _, key = await make_key("short")
    holder = await connect(daphne.url, key)
    session_id = await holder.start_session()
    watcher = await connect(daphne.url, key)
    await watch(watcher, session_id)
    await holder.close()
    frame = await watcher.recv()
    assert frame["type"] == "session_end" and frame["data"] == {"session_id": session_id, "reason": "disconnect"}
    await watcher.close()


async def test_chatbot_sessions_lists_the_principals_live_sessions(daphne, fake_llm):
    """A person and their keys count as one; another key's and ended sessions are not listed."""
    user = await sync_to_async(get_user_model().objects.create_user)("ada", password="pw-unused-here")
    _, key = await make_key("ada's laptop", user=user)
    _, other = await make_key("someone else")
    laptop = await connect(daphne.url, key)
    first = await laptop.start_session()
    second = await laptop.start_session(resumable=True)
    ended = await laptop.start_session()
    await laptop.send({"action": "chatbot_session_end", "session_id": ended})
    await laptop.recv()
    stranger = await connect(daphne.url, other)
    await stranger.start_session()
    watcher = await connect(daphne.url, key)
    await watch(watcher, first)
    await laptop.send({"action": "chatbot_post_message", "session_id": second, "user_message": SLOW, "stream": True})
    await laptop.until("message_delta")

    await watcher.send({"action": "chatbot_sessions"})
    listed = (await watcher.recv())["data"]
    assert [s["session_id"] for s in listed] == [second, first]
    by_id = {s["session_id"]: s for s in listed}
    assert by_id[second]["resumable"] and by_id[second]["answering"] and by_id[second]["watchers"] == 0
    assert not by_id[first]["resumable"] and not by_id[first]["answering"] and by_id[first]["watchers"] == 1
    assert all(s["started_at"].endswith("Z") and s["last_activity"] >= s["started_at"] for s in listed)
    await stranger.send({"action": "chatbot_sessions"})
    assert len((await stranger.recv())["data"]) == 1
    assert json.loads(stranger.received[-1])["type"] == "sessions"
    for client in (laptop, stranger, watcher):
        await client.close()


#: The same reply, a word every 0.3 s: time for a terminal client's process to start and join it.
SLOWER = SLOW.replace("token_delay=0.1", "token_delay=0.3")


async def test_the_terminal_client_follows_a_running_session(daphne, fake_llm):
    """`manage.py chat --follow <session_id>` prints the reply being written, from where it is, then the next one."""
    _, key = await make_key("terminal")
    holder = await connect(daphne.url, key)
    session_id = await holder.start_session()
    await holder.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOWER, "stream": True}
    )
    await holder.until("message_delta")
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        "chat",
        "--url",
        daphne.url,
        "--follow",
        session_id,
        cwd=ROOT,
        env=server_env(None, R2D2_API_KEY=key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await holder.until("processing_end")
    await holder.post(session_id, "and then?")
    await holder.send({"action": "chatbot_session_end", "session_id": session_id})
    out, err = await asyncio.wait_for(follower.communicate(), 30)
    assert follower.returncode == 0, err
    assert out.decode() == f"{SLOW_REPLY}\nEcho: and then?\n"
    assert "[session ended]" in err.decode()
    await holder.close()
