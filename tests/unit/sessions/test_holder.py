"""chat/sessions/holder.py without a socket: a stub `SessionSocket`, the fake model, the test database."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from asgiref.sync import sync_to_async

from chat import llm, protocol
from chat.accounts import auth, quotas
from chat.accounts.principals import Principal, limits_for_key
from chat.models import ChatMessage, ChatSession, EndReason, Role
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import holder
from chat.sessions.history import Memory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_model_client():
    yield
    await llm.close_clients()  # each test has its own event loop, and so its own model client


class StubSocket:
    """A client's socket as a holder sees it: the frames it was sent, the sessions it was told to forget."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.forgotten: list[uuid.UUID] = []
        self.sent = asyncio.Condition()

    async def send_frame(self, text: str) -> None:
        async with self.sent:
            self.frames.append(json.loads(text))
            self.sent.notify_all()

    async def close(self, code: int | None = None) -> None:
        pass

    def dropped(self, session_id: uuid.UUID) -> None:
        self.forgotten.append(session_id)


async def key_principal(**limits) -> Principal:
    row, _ = await sync_to_async(auth.create_api_key)("unit", **limits)
    return Principal(api_key_id=row.id, label=row.name, limits=limits_for_key(row))


def post(session_id: uuid.UUID, text: str, **fields) -> PostMessage:
    return PostMessage(session_id=session_id, user_message=text, system_message=None, stream=False, **fields)


async def answered(socket: StubSocket, turns: int = 1) -> list[dict]:
    """The socket's frames once `turns` turns have ended (every turn ends with `processing_end`)."""

    async with socket.sent:
        ended = lambda: sum(f["type"] == "processing_end" for f in socket.frames) >= turns  # noqa: E731
        await asyncio.wait_for(socket.sent.wait_for(ended), timeout=5)
    return socket.frames


async def start(socket: StubSocket, principal: Principal, **kwargs) -> holder.Holder:
    started, _ = await holder.start(
        socket, model="gpt-4o-mini", principal=principal, resumable=False, client_address=None, **kwargs
    )
    return started


async def test_post_admits_then_accepts(fake_llm):
    """A posted message is counted against its principal's quota and answered by the model."""
    socket = StubSocket()
    principal = await key_principal(messages_per_minute=5)
    held = await start(socket, principal)
    await held.post(post(held.session_id, "hello"))
    frames = await answered(socket)
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
    assert frames[1]["data"] == "Echo: hello"
    assert (await quotas.usage(principal))["messages_this_minute"] == 1
    await held.end(EndReason.CLIENT)


async def test_a_refusal_is_one_error_and_nothing_is_kept(fake_llm):
    """Over its quota, a post raises one ClientError (the consumer's one `error` frame): nothing is saved,
    nothing reaches the model, the socket is sent nothing, and no reservation is left behind."""
    socket = StubSocket()
    principal = await key_principal(messages_per_minute=1)
    held = await start(socket, principal)
    await held.post(post(held.session_id, "first"))
    await answered(socket)
    socket.frames.clear()
    calls = len(fake_llm.requests)
    with pytest.raises(ClientError) as refused:
        await held.post(post(held.session_id, "second"))
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED
    assert socket.frames == [] and len(fake_llm.requests) == calls
    users = ChatMessage.objects.filter(session_id=held.session_id, role=Role.USER)
    assert [m async for m in users.values_list("content", flat=True)] == ["first"]
    assert (await quotas.usage(principal))["messages_this_minute"] == 1
    await held.end(EndReason.CLIENT)


async def test_a_duplicate_is_refused_before_the_gate_and_the_quota(fake_llm):
    """A resend (same client_message_id) is refused as a duplicate without taking the socket's rate or quota."""
    socket = StubSocket()
    principal = await key_principal(messages_per_minute=5)
    held = await start(socket, principal)
    await held.post(post(held.session_id, "once", client_message_id="m1"))
    await answered(socket)
    gates: list[int] = []
    with pytest.raises(ClientError) as refused:
        await held.post(post(held.session_id, "once", client_message_id="m1"), gate=lambda: gates.append(1))
    assert refused.value.code == ErrorCode.DUPLICATE_MESSAGE
    assert gates == [] and (await quotas.usage(principal))["messages_this_minute"] == 1
    await held.end(EndReason.CLIENT)


async def test_start_takes_what_the_conversation_starts_with(fake_llm):
    """A continued session's first request carries the earlier system message and turns."""
    socket = StubSocket()
    principal = await key_principal()
    earlier = await ChatSession.objects.acreate(model="gpt-4o-mini")
    memory = Memory(session=earlier, system_message="Be brief.", history=[("user", "hi"), ("assistant", "Echo: hi")])
    held = await start(socket, principal, memory=memory)
    assert (await ChatSession.objects.aget(id=held.session_id)).continued_from_id == earlier.id
    await held.post(post(held.session_id, "again"))
    await answered(socket)
    sent = fake_llm.requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Echo: hi"},
        {"role": "user", "content": "again"},
    ]
    await held.end(EndReason.CLIENT)


async def test_end_tells_the_socket_records_the_reason_and_lets_go(fake_llm):
    socket = StubSocket()
    held = await start(socket, await key_principal())
    await held.end(EndReason.CLIENT, protocol.session_end())
    assert socket.frames == [json.loads(protocol.session_end())]
    assert socket.forgotten == [held.session_id]
    assert holder.local(held.session_id) is None
    row = await ChatSession.objects.aget(id=held.session_id)
    assert row.end_reason == EndReason.CLIENT and row.ended_at is not None
