"""The consumer in-process, through Channels' WebsocketCommunicator and the local model server."""

from __future__ import annotations

import json
import uuid

import pytest
from channels.testing import WebsocketCommunicator

from chat import llm
from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus
from r2d2site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_model_client():
    """Each test has its own event loop, so its model client (an aiohttp session) closes with it."""
    yield
    await llm.close_clients()


class Client:
    """A WebsocketCommunicator speaking the protocol."""

    def __init__(self) -> None:
        self.ws = WebsocketCommunicator(application, "/", headers=[(b"host", b"localhost")])

    async def __aenter__(self) -> Client:
        connected, _ = await self.ws.connect()
        assert connected
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.disconnect()

    async def send(self, frame) -> None:
        await self.ws.send_to(text_data=json.dumps(frame) if isinstance(frame, dict) else frame)

    async def recv(self, timeout: float = 5) -> dict:
        return json.loads(await self.ws.receive_from(timeout))

    async def start(self, **fields) -> str:
        await self.send({"action": "chatbot_session_start", **fields})
        frame = await self.recv()
        assert frame["type"] == "session_start", frame
        return frame["data"]["session_id"]

    async def post(self, session_id: str, text: str, **fields) -> list[dict]:
        await self.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text, **fields})
        return await self.until("processing_end")

    async def until(self, frame_type: str) -> list[dict]:
        frames = []
        while not frames or frames[-1]["type"] != frame_type:
            frames.append(await self.recv())
        return frames

    async def error_code(self, frame) -> str:
        await self.send(frame)
        reply = await self.recv()
        assert reply["type"] == "error", reply
        assert set(reply) == {"type", "data"} and set(reply["data"]) == {"code", "message"}
        return reply["data"]["code"]


async def test_every_bad_input_gets_an_error_and_the_connection_stays_usable(fake_llm):
    """Bad frames each get their own error code; afterwards the same socket still chats."""
    async with Client() as client:
        session_id = await client.start()
        ended = await client.start()
        await client.send({"action": "chatbot_session_end", "session_id": ended})
        assert (await client.recv())["type"] == "session_end"

        assert await client.error_code("{not json") == "invalid_json"
        assert await client.error_code("[]") == "not_an_object"
        await client.ws.send_to(bytes_data=b"\x00\x01")
        assert (await client.recv())["data"]["code"] == "binary_frame"
        assert await client.error_code({"user_message": "hi"}) == "missing_action"
        assert await client.error_code({"action": "chatbot_fly"}) == "unknown_action"
        post = {"action": "chatbot_post_message", "user_message": "hi"}
        assert await client.error_code(post) == "missing_session_id"
        assert await client.error_code({**post, "session_id": "123"}) == "invalid_session_id"
        assert await client.error_code({**post, "session_id": str(uuid.uuid4())}) == "session_not_found"
        assert await client.error_code({**post, "session_id": ended}) == "session_ended"
        post["session_id"] = session_id
        assert await client.error_code({**post, "user_message": None}) == "missing_user_message"
        assert await client.error_code({**post, "user_message": ""}) == "empty_user_message"
        assert await client.error_code({**post, "user_message": ["hi"]}) == "invalid_field_type"
        assert await client.error_code({**post, "system_message": 3}) == "invalid_field_type"
        assert await client.error_code({"action": "chatbot_session_start", "gpt_model": {}}) == "invalid_field_type"
        assert await client.error_code({**post, "user_message": "x" * 20_000}) == "message_too_long"
        assert await client.error_code({"action": "chatbot_cancel", "session_id": session_id}) == "nothing_to_cancel"

        frames = await client.post(session_id, "still here?")
        assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
        assert frames[1]["data"] == "Echo: still here?"
    assert len(fake_llm.requests) == 1
    assert await ChatMessage.objects.filter(session_id=session_id).acount() == 2


async def test_upstream_error_keeps_the_user_message_and_the_session(fake_llm):
    """A model failure answers error then processing_end; the user's message stays saved; the next turn works."""
    from testkit.fake_llm import SECRET_DETAIL, Script

    fake_llm.enqueue(Script(status=400))
    async with Client() as client:
        session_id = await client.start(gpt_model="no-such-model")
        frames = await client.post(session_id, "first")
        assert [f["type"] for f in frames] == ["processing_start", "error", "processing_end"]
        assert frames[1]["data"]["code"] == "upstream_bad_request"
        assert SECRET_DETAIL not in json.dumps(frames)
        frames = await client.post(session_id, "second")
        assert frames[1] == {"type": "message", "data": "Echo: second"}
    rows = [(m.role, m.content) async for m in ChatMessage.objects.filter(session_id=session_id)]
    assert rows == [("user", "first"), ("user", "second"), ("assistant", "Echo: second")]


async def test_streaming_sends_deltas_that_add_up_to_the_message(fake_llm):
    """With stream: true, message_delta frames arrive before the final message and concatenate to it."""
    async with Client() as client:
        session_id = await client.start()
        frames = await client.post(session_id, "tell me three words", stream=True)
    types = [f["type"] for f in frames]
    assert types[0] == "processing_start" and types[-2:] == ["message", "processing_end"]
    deltas = [f["data"] for f in frames if f["type"] == "message_delta"]
    assert len(deltas) == 5
    assert "".join(deltas) == frames[-2]["data"] == "Echo: tell me three words"
    assert fake_llm.requests[0].body["stream"] is True
    assert fake_llm.requests[0].body["stream_options"] == {"include_usage": True}
    reply = await ChatMessage.objects.aget(session_id=session_id, role="assistant")
    assert reply.completion_tokens == 5 and reply.prompt_tokens and reply.latency_ms is not None


async def test_cancel_stops_the_generation_and_saves_the_partial_reply(fake_llm):
    """chatbot_cancel closes the upstream request, saves what was said as cancelled, and ends processing."""
    from testkit.fake_llm import Script

    fake_llm.enqueue(Script(text="one two three four five six seven eight", token_delay=0.2))
    async with Client() as client:
        session_id = await client.start()
        await client.send(
            {"action": "chatbot_post_message", "session_id": session_id, "user_message": "count", "stream": True}
        )
        assert (await client.recv())["type"] == "processing_start"
        first = await client.recv()
        assert first == {"type": "message_delta", "data": "one "}
        await client.send({"action": "chatbot_cancel", "session_id": session_id})
        rest = await client.until("processing_end")
        assert "message" not in [f["type"] for f in rest]
        partial = "one " + "".join(f["data"] for f in rest if f["type"] == "message_delta")
    assert fake_llm.wait_for(lambda s: s.disconnects == 1)
    reply = await ChatMessage.objects.aget(session_id=session_id, role="assistant")
    assert reply.status == MessageStatus.CANCELLED
    assert reply.content == partial
    assert len(partial) < len("one two three four five six seven eight")


async def test_messages_queue_behind_a_running_turn_and_overflow_is_refused(fake_llm, settings):
    """A second message waits its turn; past R2D2_MAX_QUEUED_MESSAGES the client hears queue_full."""
    from testkit.fake_llm import Script

    settings.R2D2_MAX_QUEUED_MESSAGES = 1
    fake_llm.enqueue(Script(text="slow answer", ttft=0.5))
    async with Client() as client:
        session_id = await client.start()
        for text in ("first", "second", "third"):
            await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text})
        frames = [await client.recv() for _ in range(7)]
    types = [f["type"] for f in frames]
    assert types.count("processing_start") == 2 and types.count("processing_end") == 2
    errors = [f["data"]["code"] for f in frames if f["type"] == "error"]
    assert errors == ["queue_full"]
    assert [f["data"] for f in frames if f["type"] == "message"] == ["slow answer", "Echo: second"]
    users = [m.content async for m in ChatMessage.objects.filter(session_id=session_id, role="user")]
    assert users == ["first", "second"]
    # The second request saw the first turn in its history.
    assert [m["content"] for m in fake_llm.requests[1].messages] == ["first", "slow answer", "second"]


async def test_limits_refuse_with_codes(fake_llm, settings):
    """Model allow-list, sessions per connection and the message rate limit each answer an error code."""
    settings.R2D2_ALLOWED_MODELS = ["gpt-4o-mini"]
    settings.R2D2_MAX_SESSIONS_PER_CONNECTION = 1
    settings.R2D2_RATE_LIMIT_PER_MINUTE = 2
    async with Client() as client:
        assert await client.error_code({"action": "chatbot_session_start", "gpt_model": "gpt-4"}) == "model_not_allowed"
        assert await client.error_code({"action": "chatbot_session_start"}) == "model_not_allowed"
        session_id = await client.start(gpt_model="gpt-4o-mini")
        assert await client.error_code({"action": "chatbot_session_start", "gpt_model": "gpt-4o-mini"}) == (
            "too_many_sessions"
        )
        await client.post(session_id, "one")
        await client.post(session_id, "two")
        post = {"action": "chatbot_post_message", "session_id": session_id, "user_message": "three"}
        assert await client.error_code(post) == "rate_limited"
    assert await ChatSession.objects.acount() == 1
    assert await ChatMessage.objects.filter(content="three").acount() == 0


async def test_disconnect_mid_generation_cancels_and_ends_the_session(fake_llm):
    """A socket closing mid-reply stops the upstream call, keeps the partial reply and ends the session."""
    from testkit.fake_llm import Script

    fake_llm.enqueue(Script(text="a b c d e f g h i j", token_delay=0.2))
    client = Client()
    await client.__aenter__()
    session_id = await client.start()
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go", "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"
    assert (await client.recv())["type"] == "message_delta"
    await client.ws.disconnect()
    assert fake_llm.wait_for(lambda s: s.disconnects == 1)
    session = await ChatSession.objects.aget(id=session_id)
    assert session.end_reason == EndReason.DISCONNECT
    reply = await ChatMessage.objects.aget(session_id=session_id, role="assistant")
    assert reply.status == MessageStatus.CANCELLED and reply.content.startswith("a ")
