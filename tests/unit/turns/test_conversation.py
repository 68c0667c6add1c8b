"""chat/turns/conversation.py without a socket: a `Conversation` with a list for its socket and the local model server.

Each test drives one session's turns as its holder does (`accept`, `cancel`, `close`) and reads what the
client would have received, in order, and what the database keeps.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from chat import llm
from chat.models import ChatMessage, ChatSession, MessageStatus, Role
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode
from chat.turns.conversation import Conversation
from chat.turns.messages import Lease
from testkit.fake_llm import Script
from testkit.wait import async_wait_until

pytestmark = pytest.mark.django_db(transaction=True)


class Socket:
    """What a conversation sends, as the client would read it."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.ended = asyncio.Event()

    async def send(self, text: str) -> None:
        frame = json.loads(text)
        self.frames.append(frame)
        if frame["type"] == "processing_end":
            self.ended.set()

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]

    async def turns_ended(self, count: int) -> None:
        assert await async_wait_until(lambda: self.types().count("processing_end") >= count, timeout=10)


@pytest.fixture(autouse=True)
async def _close_model_client():
    """Each test has its own event loop, so its model client (an aiohttp session) closes with it."""
    yield
    await llm.close_clients()


@pytest.fixture
async def session() -> ChatSession:
    return await ChatSession.objects.acreate(model="gpt-4o-mini")


@pytest.fixture
def socket() -> Socket:
    return Socket()


@pytest.fixture
def conversation(session, socket, fake_llm, settings) -> Conversation:
    settings.R2D2_UPSTREAM_RETRIES = 0
    return Conversation(lease=Lease(session.id, session.fence), model=session.model, send=socket.send)


def post(session: ChatSession, text: str, *, stream: bool = False, system: str | None = None) -> PostMessage:
    return PostMessage(session_id=session.id, user_message=text, system_message=system, stream=stream)


async def rows(session: ChatSession) -> list[tuple[str, str, str]]:
    query = ChatMessage.objects.filter(session=session).order_by("id").values_list("role", "content", "status")
    return [row async for row in query]


async def test_a_turn_sends_start_message_end_and_saves_both_sides(conversation, session, socket):
    await conversation.accept(post(session, "hello"))
    await socket.turns_ended(1)
    assert socket.frames == [
        {"type": "processing_start", "data": None},
        {"type": "message", "data": "Echo: hello"},
        {"type": "processing_end", "data": None},
    ]
    assert await rows(session) == [
        (Role.USER, "hello", MessageStatus.STARTED),
        (Role.ASSISTANT, "Echo: hello", MessageStatus.COMPLETE),
    ]


async def test_the_model_is_sent_the_history_and_the_system_message(conversation, session, socket, fake_llm):
    await conversation.accept(post(session, "first", system="Be brief."))
    await socket.turns_ended(1)
    await conversation.accept(post(session, "second"))
    await socket.turns_ended(2)
    assert fake_llm.requests[-1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Echo: first"},
        {"role": "user", "content": "second"},
    ]


async def test_streamed_deltas_add_up_to_the_saved_reply(conversation, session, socket, fake_llm):
    fake_llm.enqueue(Script(text="one two three four"))
    await conversation.accept(post(session, "count", stream=True))
    await socket.turns_ended(1)
    deltas = [frame["data"] for frame in socket.frames if frame["type"] == "message_delta"]
    assert len(deltas) > 1 and "".join(deltas) == "one two three four"
    assert socket.types()[0] == "processing_start" and socket.types()[-2:] == ["message", "processing_end"]
    assert (await rows(session))[-1] == (Role.ASSISTANT, "one two three four", MessageStatus.COMPLETE)


async def test_messages_wait_their_turn_and_are_answered_in_order(conversation, session, socket, fake_llm):
    fake_llm.enqueue(Script(ttft=0.2))
    await conversation.accept(post(session, "one"))
    await conversation.accept(post(session, "two"))
    await conversation.accept(post(session, "three"))
    assert conversation.busy
    await socket.turns_ended(3)
    messages = [frame["data"] for frame in socket.frames if frame["type"] == "message"]
    assert messages == ["Echo: one", "Echo: two", "Echo: three"]
    assert socket.types() == ["processing_start", "message", "processing_end"] * 3
    assert not conversation.busy


async def test_a_full_queue_refuses_and_saves_nothing(conversation, session, socket, fake_llm, settings):
    settings.R2D2_MAX_QUEUED_MESSAGES = 1
    fake_llm.enqueue(Script(ttft=0.5))
    await conversation.accept(post(session, "answering"))
    assert await async_wait_until(lambda: socket.types() == ["processing_start"], timeout=5)
    await conversation.accept(post(session, "waiting"))
    with pytest.raises(ClientError) as refused:
        await conversation.accept(post(session, "one too many"))
    assert refused.value.code == ErrorCode.QUEUE_FULL
    await socket.turns_ended(2)
    assert [content for role, content, _ in await rows(session) if role == Role.USER] == ["answering", "waiting"]


async def test_cancel_stops_the_generation_and_keeps_the_partial_reply(conversation, session, socket, fake_llm):
    fake_llm.enqueue(Script(text=" ".join(["word"] * 200), token_delay=0.02))
    await conversation.accept(post(session, "long", stream=True))
    assert await async_wait_until(lambda: "message_delta" in socket.types(), timeout=5)
    assert conversation.cancel()
    await socket.turns_ended(1)
    assert "message" not in socket.types() and socket.types()[-1] == "processing_end"
    role, content, status = (await rows(session))[-1]
    assert role == Role.ASSISTANT and status == MessageStatus.CANCELLED
    sent = "".join(frame["data"] for frame in socket.frames if frame["type"] == "message_delta")
    assert content == sent and 0 < len(content) < len(" ".join(["word"] * 200))
    assert not conversation.cancel()  # nothing generating any more


async def test_a_model_error_is_one_error_frame_then_the_next_is_answered(conversation, session, socket, fake_llm):
    fake_llm.enqueue(Script(status=500))
    await conversation.accept(post(session, "fails"))
    await socket.turns_ended(1)
    assert socket.types() == ["processing_start", "error", "processing_end"]
    assert socket.frames[1]["data"]["code"] == ErrorCode.UPSTREAM_SERVER_ERROR
    await conversation.accept(post(session, "works"))
    await socket.turns_ended(2)
    assert socket.frames[-2] == {"type": "message", "data": "Echo: works"}


async def test_a_failing_socket_does_not_stop_the_turn_from_ending(session, fake_llm, settings):
    """processing_start cannot be sent (the socket is going): the turn still runs and still sends processing_end."""
    sent: list[str] = []

    async def send(text: str) -> None:
        if json.loads(text)["type"] == "processing_start":
            raise ConnectionError("socket closed")
        sent.append(json.loads(text)["type"])

    conversation = Conversation(lease=Lease(session.id, session.fence), model=session.model, send=send)
    await conversation.accept(post(session, "hello"))
    assert await async_wait_until(lambda: "processing_end" in sent, timeout=5)
    assert sent == ["message", "processing_end"]


async def test_a_session_taken_over_elsewhere_refuses_and_tells_its_holder(conversation, session, socket):
    fenced: list[bool] = []
    conversation.on_fenced = lambda: fenced.append(True)
    await ChatSession.objects.filter(id=session.id).aupdate(fence=session.fence + 1)  # another holder's lease
    with pytest.raises(ClientError) as refused:
        await conversation.accept(post(session, "mine?"))
    assert refused.value.code == ErrorCode.SESSION_NOT_OWNED
    assert fenced == [True]
    assert socket.frames == [] and await rows(session) == []


async def test_close_with_interrupt_saves_the_partial_reply_as_interrupted(conversation, session, socket, fake_llm):
    """A drain past its deadline: the client gets `turn_interrupted` then `processing_end`; queued messages drop."""
    fake_llm.enqueue(Script(text=" ".join(["word"] * 200), token_delay=0.02))
    await conversation.accept(post(session, "long", stream=True))
    await conversation.accept(post(session, "queued"))
    assert await async_wait_until(lambda: "message_delta" in socket.types(), timeout=5)
    dropped = await conversation.close(interrupt=True)
    assert len(dropped) == 1
    assert socket.types()[-2:] == ["error", "processing_end"]
    assert socket.frames[-2]["data"]["code"] == ErrorCode.TURN_INTERRUPTED
    saved = await rows(session)
    assert (saved[1][0], saved[1][2]) == (Role.USER, MessageStatus.ACCEPTED)  # the queued one, kept for a resume
    assert (saved[-1][0], saved[-1][2]) == (Role.ASSISTANT, MessageStatus.INTERRUPTED)
