"""Nothing a client or a model sends wedges a session, closes the socket or goes unanswered.

Live Daphne, real sockets; run on SQLite and again on PostgreSQL (where NUL and
long model names used to fail deep in the database).
"""

import json

import pytest

from chat.models import ChatMessage, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.fake_llm import Script

pytestmark = pytest.mark.django_db(transaction=True)


def hostile_frames(session_id: str) -> list[tuple[str, str]]:
    """(raw frame text, the error code it must get)."""
    post = '{"action": "chatbot_post_message", "session_id": "' + session_id + '", '
    return [
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),
        ('{"a": ' * 5_000 + "1" + "}" * 5_000, "invalid_json"),
        (post + '"user_message": "\\ud800"}', "invalid_text"),
        (post + '"user_message": "a\\udfffb"}', "invalid_text"),
        (post + '"user_message": "nul\\u0000here"}', "invalid_text"),
        (post + '"user_message": "hi", "system_message": "\\ud83d"}', "invalid_text"),
        (post + '"user_message": "hi", "system_message": "\\u0000"}', "invalid_text"),
        ('{"action": "chatbot_session_start", "gpt_model": "\\udc00"}', "invalid_text"),
        ('{"action": "chatbot_session_start", "gpt_model": "gpt\\u0000"}', "invalid_text"),
        ('{"action": "chatbot_session_start", "gpt_model": "' + "m" * 201 + '"}', "invalid_model_name"),
        ('{"action": "chatbot_session_start", "gpt_model": "gpt\\n4"}', "invalid_model_name"),
        ('{"action": ["chatbot_session_start"]}', "unknown_action"),
        ('{"action": "chatbot_cancel", "session_id": {"x": 1}}', "invalid_session_id"),
    ]


async def test_hostile_frames_get_one_error_each_and_the_socket_stays_usable(daphne, fake_llm):
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    for text, code in hostile_frames(session_id):
        await client.send(text)
        frame = await client.recv()
        assert frame["type"] == "error" and frame["data"]["code"] == code, (text[:60], frame)
    frames = await client.post(session_id, "still here?")
    assert {"type": "message", "data": "Echo: still here?"} in frames
    # The server never closed the socket (no 1011, nor any other code): it is open until the client closes it.
    # (A close code, not the text "1011" in the log: a random session id can hold those four digits.)
    assert client.connection.close_code is None
    await client.close()
    assert client.connection.close_code == 1000
    assert "Traceback" not in daphne.log()
    said = [m.content async for m in ChatMessage.objects.filter(session_id=session_id, role=Role.USER)]
    assert said == ["still here?"]


async def test_model_text_is_repaired_before_it_is_saved_or_sent(daphne, fake_llm):
    """NUL removed, a surrogate pair split across two chunks rejoined, a lone surrogate replaced."""
    fake_llm.enqueue(
        Script(chunks=["Smile \ud83d", "\ude00 then a NUL\x00 ", "and a lone \udc00 end"]),
        Script(text="plain\x00text"),
    )
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "go", stream=True)
    expected = "Smile \U0001f600 then a NUL and a lone \ufffd end"
    deltas = "".join(f["data"] for f in frames if f["type"] == "message_delta")
    assert deltas == expected
    assert {"type": "message", "data": expected} in frames
    frames = await client.post(session_id, "again")
    assert {"type": "message", "data": "plaintext"} in frames
    await client.close()
    replies = [m.content async for m in ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT)]
    assert replies == [expected, "plaintext"]


async def test_a_reply_of_four_mebibytes_arrives_as_one_message_frame(daphne, fake_llm):
    text = ("0123456789abcdef" * 64 + "\n") * 4096  # 4 MiB and a bit
    fake_llm.enqueue(Script(text=text))
    client = await ProtocolClient.connect(daphne.url, max_size=None)
    session_id = await client.start_session()
    frames = await client.post(session_id, "long please")
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
    assert frames[1]["data"] == text and len(text) > 4 * 1024 * 1024
    await client.close()


async def test_a_reply_beyond_the_frame_bound_ends_the_turn_with_an_error(daphne_factory, fake_llm):
    """Past R2D2_MAX_OUTGOING_FRAME_BYTES: `reply_too_large`, then processing_end; the reply is kept and
    the session answers the next message."""
    server = daphne_factory(R2D2_MAX_OUTGOING_FRAME_BYTES="100000")
    fake_llm.enqueue(Script(text="y" * 200_000))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "too much")
    assert [f["type"] for f in frames] == ["processing_start", "error", "processing_end"]
    assert frames[1]["data"]["code"] == "reply_too_large"
    frames = await client.post(session_id, "short now")
    assert {"type": "message", "data": "Echo: short now"} in frames
    await client.close()
    reply = await ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).afirst()
    assert reply.content == "y" * 200_000 and reply.status == MessageStatus.COMPLETE


async def test_session_start_is_rate_limited(daphne_factory, fake_llm):
    server = daphne_factory(R2D2_RATE_LIMIT_PER_MINUTE="5", R2D2_MAX_SESSIONS_PER_CONNECTION="100")
    client = await ProtocolClient.connect(server.url)
    codes = []
    for _ in range(8):
        await client.send({"action": "chatbot_session_start"})
        frame = await client.recv()
        codes.append(frame["data"]["code"] if frame["type"] == "error" else frame["type"])
    assert codes == ["session_start"] * 5 + ["rate_limited"] * 3
    await client.close()


def test_frames_stay_json(fake_llm):
    """The hostile list itself is what a client could send: every entry is text a socket carries."""
    for text, _ in hostile_frames("00000000-0000-0000-0000-000000000000"):
        text.encode("utf-8")
        if text.startswith("{"):
            try:
                json.loads(text)
            except (ValueError, RecursionError):
                pass
