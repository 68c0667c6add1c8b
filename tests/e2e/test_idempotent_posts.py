"""`client_message_id`: a resend is recognised, on one socket or after a resume on another process,
and makes no new message, no model call and no charge (issue 21, item 3)."""

from __future__ import annotations

import asyncio

import pytest

from chat.models import ChatMessage, Role
from testkit.client import ProtocolClient
from tests.e2e.test_resume import SLOW, post, resume, start

pytestmark = pytest.mark.django_db(transaction=True)


async def user_rows(session_id: str) -> list[str]:
    return [m.content async for m in ChatMessage.objects.filter(session_id=session_id, role=Role.USER)]


async def test_a_resend_on_the_same_socket_is_refused_with_the_originals_state(daphne, fake_llm):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello", client_message_id="m-1")
    assert frames[1]["data"] == "Echo: hello"
    calls = len(fake_llm.requests)

    await client.send(
        {
            "action": "chatbot_post_message",
            "session_id": session_id,
            "user_message": "hello",
            "client_message_id": "m-1",
        }
    )
    refusal = await client.recv()
    assert refusal["type"] == "error" and refusal["data"]["code"] == "duplicate_message", refusal
    assert "answered" in refusal["data"]["message"]
    assert len(fake_llm.requests) == calls and await user_rows(session_id) == ["hello"]

    # While the original is still being answered, and while one waits behind it.
    await client.send(
        {
            "action": "chatbot_post_message",
            "session_id": session_id,
            "user_message": SLOW,
            "stream": True,
            "client_message_id": "m-2",
        }
    )
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "next", "client_message_id": "m-3"}
    )
    assert (await client.recv())["type"] == "processing_start"
    states = {}
    for cid in ("m-2", "m-3"):
        await client.send(
            {
                "action": "chatbot_post_message",
                "session_id": session_id,
                "user_message": "again",
                "client_message_id": cid,
            }
        )
        while True:
            frame = await client.recv()
            if frame["type"] == "error":
                states[cid] = frame["data"]["message"]
                break
    assert "answering" in states["m-2"] and "queued" in states["m-3"], states
    turns = [await client.until("processing_end", timeout=20) for _ in range(2)]
    assert [f["data"] for t in turns for f in t if f["type"] == "message"][-1] == "Echo: next"
    assert await user_rows(session_id) == ["hello", SLOW, "next"]

    # The same id in another session is another message.
    other = await client.start_session()
    assert (await client.post(other, "hello", client_message_id="m-1"))[1]["data"] == "Echo: hello"
    await client.close()


@pytest.mark.parametrize("bad", ["", "x" * 101, "tab\there", 7, ["m"]])
async def test_an_invalid_client_message_id_is_refused(daphne, fake_llm, bad):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "x", "client_message_id": bad}
    )
    frame = await client.recv()
    assert frame["type"] == "error" and frame["data"]["code"] == "invalid_field_type", frame
    assert (await client.post(session_id, "still usable"))[1]["data"] == "Echo: still usable"
    await client.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_resend_after_a_resume_on_the_other_process(daphne_factory, fake_llm):
    """The socket drops right after the post; the client resumes on the other process and sends the
    message again: it is not answered twice, and the original's frames reach it by replay or live."""
    server_a, server_b = daphne_factory(), daphne_factory()
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await post(client, session_id, SLOW, client_message_id="once")
    first = await client.recv()
    await client.connection.close()

    client = await ProtocolClient.connect(server_b.url)
    assert (await resume(client, session_id, token, first["seq"]))["type"] == "session_resumed"
    await post(client, session_id, SLOW, client_message_id="once")
    frames = []
    # The resend is read once the take-over is done (the original's turn finished on A): both arrive.
    while not (any(f["type"] == "processing_end" for f in frames) and any("seq" not in f for f in frames)):
        frames.append(await client.recv(timeout=20))
    refusals = [f for f in frames if f["type"] == "error" and "seq" not in f]
    assert [r["data"]["code"] for r in refusals] == ["duplicate_message"]
    assert [f["type"] for f in frames if "seq" in f][-2:] == ["message", "processing_end"]
    await asyncio.sleep(0.5)  # an absence is asserted: a second model call would have been made by now
    assert len(fake_llm.requests) == 1 and await user_rows(session_id) == [SLOW]  # the original's call only
    await client.close()
