"""Frame parsing and building, without a socket."""

import json
import uuid

import pytest

from chat import protocol
from chat.protocol import PostMessage, SessionStart
from chat.protocol.errors import ClientError, ErrorCode

SID = "41eb27a0-d382-40c4-ad38-fbd1cb629b7f"


def parse(frame):
    return protocol.parse_text(json.dumps(frame) if not isinstance(frame, str) else frame, max_message_chars=100)


def code_of(frame) -> str:
    with pytest.raises(ClientError) as info:
        parse(frame)
    return info.value.code


def test_seed_frames_encode_byte_for_byte():
    """Outgoing frames have exactly the seed's bytes: `type` first, then `data`."""
    assert protocol.session_start(uuid.UUID(SID)) == (
        '{"type": "session_start", "data": {"session_id": "41eb27a0-d382-40c4-ad38-fbd1cb629b7f"}}'
    )
    assert protocol.processing_start() == '{"type": "processing_start", "data": null}'
    assert protocol.message("In the quiet") == '{"type": "message", "data": "In the quiet"}'
    assert protocol.processing_end() == '{"type": "processing_end", "data": null}'
    assert protocol.session_end() == '{"type": "session_end", "data": null}'
    assert protocol.error("x", "y") == '{"type": "error", "data": {"code": "x", "message": "y"}}'


def test_seed_requests_parse():
    """The seed README's example requests parse into typed requests."""
    assert parse({"action": "chatbot_session_start", "gpt_model": "gpt-3.5-turbo"}) == SessionStart("gpt-3.5-turbo")
    assert parse({"action": "chatbot_session_start"}) == SessionStart(None)
    post = parse(
        {
            "action": "chatbot_post_message",
            "session_id": SID,
            "system_message": "You are coll robot!",
            "user_message": "Please write me cool poem.",
        }
    )
    assert post == PostMessage(uuid.UUID(SID), "Please write me cool poem.", "You are coll robot!", False)


def test_message_is_an_alias_of_user_message():
    """The seed documents `message` but sends `user_message`: both are accepted."""
    post = parse({"action": "chatbot_post_message", "session_id": SID, "message": "hello"})
    assert post.user_message == "hello"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.NOT_AN_OBJECT),
        ('"text"', ErrorCode.NOT_AN_OBJECT),
        ({}, ErrorCode.MISSING_ACTION),
        ({"action": "dance"}, ErrorCode.UNKNOWN_ACTION),
        ({"action": 7}, ErrorCode.UNKNOWN_ACTION),
        ({"action": "chatbot_session_start", "gpt_model": 4}, ErrorCode.INVALID_FIELD_TYPE),
        ({"action": "chatbot_post_message", "user_message": "hi"}, ErrorCode.MISSING_SESSION_ID),
        ({"action": "chatbot_post_message", "session_id": "nope", "user_message": "hi"}, ErrorCode.INVALID_SESSION_ID),
        ({"action": "chatbot_post_message", "session_id": 12, "user_message": "hi"}, ErrorCode.INVALID_SESSION_ID),
        ({"action": "chatbot_post_message", "session_id": SID}, ErrorCode.MISSING_USER_MESSAGE),
        ({"action": "chatbot_post_message", "session_id": SID, "user_message": "  "}, ErrorCode.EMPTY_USER_MESSAGE),
        ({"action": "chatbot_post_message", "session_id": SID, "user_message": 5}, ErrorCode.INVALID_FIELD_TYPE),
        (
            {"action": "chatbot_post_message", "session_id": SID, "user_message": "hi", "system_message": []},
            ErrorCode.INVALID_FIELD_TYPE,
        ),
        ({"action": "chatbot_post_message", "session_id": SID, "user_message": "x" * 101}, ErrorCode.MESSAGE_TOO_LONG),
        (
            {"action": "chatbot_post_message", "session_id": SID, "user_message": "hi", "stream": "yes"},
            ErrorCode.INVALID_FIELD_TYPE,
        ),
        ({"action": "chatbot_session_end"}, ErrorCode.MISSING_SESSION_ID),
        ({"action": "chatbot_cancel", "session_id": "x"}, ErrorCode.INVALID_SESSION_ID),
    ],
)
def test_bad_frames_name_their_fault(frame, code):
    """Each kind of bad input maps to its own documented error code."""
    assert code_of(frame) == code


#: Text a model may send: quotes, backslashes, control characters, non-ASCII, astral and
#: unpaired surrogates (repaired before sending, but the encoder must not depend on it).
AWKWARD = [
    "",
    "plain",
    'quote " back \\ slash',
    "tab\tnew\nline\r\x00\x1f\x7f",
    "é ü ß 中文 🤖",
    "\ud800 alone",
    "</script>",
]


@pytest.mark.parametrize("text", AWKWARD)
def test_turn_frames_are_byte_identical_to_json_dumps(text):
    """The turn's frames are built from templates; they must be the seed's `json.dumps` output exactly."""
    assert protocol.message(text) == json.dumps({"type": "message", "data": text})
    assert protocol.message_delta(text) == json.dumps({"type": "message_delta", "data": text})
    assert protocol.processing_start() == json.dumps({"type": "processing_start", "data": None})
    assert protocol.processing_end() == json.dumps({"type": "processing_end", "data": None})


def test_watch_actions_parse_and_their_answers_match_the_document():
    """chatbot_session_watch / _unwatch name a session; chatbot_sessions nothing. Their answers are documented."""
    from datetime import UTC, datetime

    from testkit.contract import match_frame

    assert parse({"action": "chatbot_session_watch", "session_id": SID}) == protocol.Watch(uuid.UUID(SID))
    assert parse({"action": "chatbot_session_unwatch", "session_id": SID}) == protocol.Unwatch(uuid.UUID(SID))
    assert parse({"action": "chatbot_sessions"}) == protocol.ListSessions()
    assert code_of({"action": "chatbot_session_watch"}) == ErrorCode.MISSING_SESSION_ID
    assert code_of({"action": "chatbot_session_watch", "session_id": "x"}) == ErrorCode.INVALID_SESSION_ID
    messages = [{"role": "user", "content": "hi", "status": "started"}]
    watching = protocol.session_watching(uuid.UUID(SID), messages, "Hel")
    assert json.loads(watching) == {
        "type": "session_watching",
        "data": {"session_id": SID, "messages": messages, "partial": "Hel"},
    }
    assert match_frame(watching) == "sessionWatching"
    assert match_frame(protocol.session_unwatched(uuid.UUID(SID))) == "sessionUnwatched"
    moment = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)
    live = protocol.LiveSession(uuid.UUID(SID), "gpt-4o-mini", True, False, 2, moment, moment)
    listed = protocol.sessions([live])
    assert json.loads(listed)["data"][0]["started_at"] == "2026-12-06T07:00:00Z"
    assert match_frame(listed) == "sessions"
    # A plain session's frame, as a watcher gets it: session_id and seq after type and data.
    assert match_frame(protocol.sequenced(protocol.processing_end(), uuid.UUID(SID), 3)) == "processingEnd"
