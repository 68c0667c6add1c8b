"""A whole conversation over a real socket: live Daphne, the `websockets` client, the local model server."""

import json

import pytest
import websockets

from chat.models import ChatMessage, ChatSession, EndReason
from testkit.client import ProtocolClient, seed_conversation
from testkit.server import TEST_API_KEY
from testkit.wait import async_wait_until

pytestmark = pytest.mark.django_db(transaction=True)


async def test_seed_conversation_byte_for_byte(daphne, fake_llm):
    """A seed client's conversation gets exactly the seed's frames, and the model gets the request it should."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await seed_conversation(client)
    await client.close()

    [request] = fake_llm.requests
    assert request.body["model"] == "gpt-4o-mini"
    assert request.messages == [
        {"role": "system", "content": "You are coll robot!"},
        {"role": "user", "content": "Please write me cool poem."},
    ]
    assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"

    session = await ChatSession.objects.aget(id=session_id)
    assert session.model == "gpt-4o-mini"
    assert session.end_reason == EndReason.CLIENT
    assert session.system_message == "You are coll robot!"
    assert session.client_address == "127.0.0.1"
    rows = [(m.role, m.content) async for m in ChatMessage.objects.filter(session_id=session_id)]
    assert rows == [
        ("system", "You are coll robot!"),
        ("user", "Please write me cool poem."),
        ("assistant", "Echo: Please write me cool poem."),
    ]


async def test_memory_carries_history_and_latest_system_message(daphne, fake_llm):
    """Each request carries the latest system message, the whole earlier conversation, then the new message."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    await client.post(session_id, "one", system_message="Be brief.")
    await client.post(session_id, "two")
    await client.post(session_id, "three", system_message="Be verbose.")
    await client.close()

    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-3.5-turbo"] * 3
    assert fake_llm.requests[2].messages == [
        {"role": "system", "content": "Be verbose."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "Echo: two"},
        {"role": "user", "content": "three"},
    ]
    assert fake_llm.requests[1].messages[0] == {"role": "system", "content": "Be brief."}


async def test_long_sessions_trim_oldest_history_first(daphne_factory, fake_llm):
    """Past the context budget the oldest turns are dropped; the system message and new message stay."""
    server = daphne_factory(R2D2_MAX_CONTEXT_CHARS="200")
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    for n in range(6):
        await client.post(session_id, f"message number {n} " + "x" * 20, system_message="S" * 30 if n == 0 else None)
    await client.close()
    sent = fake_llm.requests[-1].messages
    assert sent[0] == {"role": "system", "content": "S" * 30}
    assert sent[-1]["content"].startswith("message number 5")
    assert sum(len(m["content"]) for m in sent) <= 200
    assert "message number 0" not in json.dumps(sent)
    assert "message number 4" in json.dumps(sent)


async def test_closing_the_socket_ends_its_sessions(daphne, fake_llm):
    """Closing the socket ends every session it started, with reason `disconnect`."""
    client = await ProtocolClient.connect(daphne.url)
    first = await client.start_session()
    second = await client.start_session()
    await client.close()

    async def both_ended() -> bool:
        return await ChatSession.objects.filter(id__in=[first, second], ended_at__isnull=False).acount() == 2

    await async_wait_until(both_ended, timeout=5)
    ended = [s async for s in ChatSession.objects.filter(id__in=[first, second], ended_at__isnull=False)]
    assert {s.end_reason for s in ended} == {EndReason.DISCONNECT}
    assert len(ended) == 2


async def test_another_connection_cannot_use_a_session(daphne, fake_llm):
    """A session belongs to the connection that started it: others get an error and change nothing."""
    owner = await ProtocolClient.connect(daphne.url)
    intruder = await ProtocolClient.connect(daphne.url)
    session_id = await owner.start_session()
    await intruder.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "hijack"})
    assert (await intruder.recv())["data"]["code"] == "session_not_owned"
    await intruder.send({"action": "chatbot_session_end", "session_id": session_id})
    assert (await intruder.recv())["data"]["code"] == "session_not_owned"
    assert [f["type"] for f in await owner.post(session_id, "still mine")] == [
        "processing_start",
        "message",
        "processing_end",
    ]
    await owner.close()
    await intruder.close()
    assert fake_llm.requests[0].messages[-1]["content"] == "still mine"
    assert await ChatMessage.objects.filter(content="hijack").acount() == 0


async def test_browser_origins_checked_but_originless_clients_accepted(daphne):
    """A page from a foreign host is refused at the handshake; a client sending no Origin is let in."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(daphne.url, origin="http://evil.example.com")
    assert refused.value.response.status_code == 403
    allowed = await websockets.connect(daphne.url, origin=f"http://localhost:{daphne.port}")
    await allowed.close()
    originless = await ProtocolClient.connect(daphne.url)
    assert await originless.start_session()
    await originless.close()
