"""The R2D2 WebSocket protocol: incoming frames parsed into typed requests, outgoing frames built.

This is the one place that knows frame shapes. Outgoing frames are JSON objects
with exactly the keys ``type`` and ``data``, encoded as the original service
encoded them (``json.dumps`` defaults), so seed clients see the same bytes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from chat.protocol.errors import ClientError, ErrorCode
from chat.protocol.text import storable

#: The close code a draining server closes every socket with (chat/sessions/drain.py; chat/edge/daphne.py
#: sends it without waiting for the client): "service restart", reconnect elsewhere.
CLOSE_SERVICE_RESTART = 1012

# Requests -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionStart:
    gpt_model: str | None
    resumable: bool = False
    continue_session_id: uuid.UUID | None = None  # start with that earlier session's conversation as memory


@dataclass(frozen=True, slots=True)
class PostMessage:
    session_id: uuid.UUID
    user_message: str
    system_message: str | None
    stream: bool
    client_message_id: str = ""
    report_model: bool = False  # processing_end says which model answered (a fallback chain's member)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Cancel:
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ListModels:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    session_id: uuid.UUID
    resume_token: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class Usage:
    pass


@dataclass(frozen=True, slots=True)
class Watch:
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Unwatch:
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ListSessions:
    pass


Request = (
    SessionStart | PostMessage | SessionEnd | Cancel | ListModels | Resume | Usage | Watch | Unwatch | ListSessions
)


def parse_text(text: str, *, max_message_chars: int) -> Request:
    """Parse one text frame; raise ClientError for anything the protocol does not allow."""
    try:
        content = json.loads(text)
    except ValueError:
        raise ClientError(ErrorCode.INVALID_JSON, "The frame is not valid JSON.") from None
    except RecursionError:
        raise ClientError(ErrorCode.INVALID_JSON, "The frame's JSON is nested too deeply.") from None
    return parse(content, max_message_chars=max_message_chars)


def parse(content: Any, *, max_message_chars: int) -> Request:
    """Turn one decoded frame into a typed request."""
    if not isinstance(content, dict):
        raise ClientError(ErrorCode.NOT_AN_OBJECT, "A frame must be a JSON object with an 'action'.")
    action = content.get("action")
    if action is None or action == "":
        raise ClientError(ErrorCode.MISSING_ACTION, "The frame has no 'action'.")
    parser = PARSERS.get(action) if isinstance(action, str) else None
    if parser is None:
        raise ClientError(
            ErrorCode.UNKNOWN_ACTION,
            f"Unknown action; expected one of: {', '.join(PARSERS)}.",
        )
    return parser(content, max_message_chars)


def _optional_str(content: dict, key: str) -> str | None:
    value = content.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ClientError(ErrorCode.INVALID_FIELD_TYPE, f"'{key}' must be a string.")
    return _storable(key, value)


def _storable(key: str, value: str) -> str:
    # NUL cannot be stored in PostgreSQL text, and a lone surrogate (a "\ud800" escape)
    # cannot be encoded at all: refuse both here rather than fail deeper.
    if not storable(value):
        raise ClientError(ErrorCode.INVALID_TEXT, f"'{key}' contains a NUL character or an unpaired surrogate escape.")
    return value


def _session_id(content: dict, key: str = "session_id") -> uuid.UUID:
    value = content.get(key)
    if value is None or value == "":
        raise ClientError(ErrorCode.MISSING_SESSION_ID, f"The frame has no '{key}'.")
    if not isinstance(value, str):
        raise ClientError(ErrorCode.INVALID_SESSION_ID, f"'{key}' must be a UUID string.")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ClientError(ErrorCode.INVALID_SESSION_ID, f"'{key}' is not a valid UUID.") from None


def _flag(content: dict, key: str) -> bool:
    value = content.get(key, False)
    if not isinstance(value, bool):
        raise ClientError(ErrorCode.INVALID_FIELD_TYPE, f"'{key}' must be true or false.")
    return value


#: The longest model name a session can record (ChatSession.model).
MAX_MODEL_CHARS = 200


def _parse_session_start(content: dict, max_message_chars: int) -> SessionStart:
    model = _optional_str(content, "gpt_model")
    model = model.strip() if model and model.strip() else None
    if model is not None and (len(model) > MAX_MODEL_CHARS or not model.isprintable()):
        raise ClientError(
            ErrorCode.INVALID_MODEL_NAME,
            f"'gpt_model' must be a printable name of at most {MAX_MODEL_CHARS} characters.",
        )
    resumable = _flag(content, "resumable")
    earlier = _session_id(content, "continue_session_id") if content.get("continue_session_id") else None
    return SessionStart(gpt_model=model, resumable=resumable, continue_session_id=earlier)


def _parse_post_message(content: dict, max_message_chars: int) -> PostMessage:
    session_id = _session_id(content)
    # The seed documents `message` but its clients send `user_message`: take both.
    key = "user_message" if content.get("user_message") is not None else "message"
    user_message = content.get(key)
    if user_message is None:
        raise ClientError(ErrorCode.MISSING_USER_MESSAGE, "The frame has no 'user_message'.")
    if not isinstance(user_message, str):
        raise ClientError(ErrorCode.INVALID_FIELD_TYPE, f"'{key}' must be a string.")
    _storable(key, user_message)
    if not user_message.strip():
        raise ClientError(ErrorCode.EMPTY_USER_MESSAGE, f"'{key}' is empty.")
    system_message = _optional_str(content, "system_message")
    for name, text in ((key, user_message), ("system_message", system_message or "")):
        if len(text) > max_message_chars:
            raise ClientError(
                ErrorCode.MESSAGE_TOO_LONG,
                f"'{name}' is {len(text)} characters; the limit is {max_message_chars}.",
            )
    stream = _flag(content, "stream")
    return PostMessage(
        session_id=session_id,
        user_message=user_message,
        system_message=system_message,
        stream=stream,
        client_message_id=_client_message_id(content),
        report_model=_flag(content, "report_model"),
    )


#: `client_message_id`: the client's own id for a message, so that a resend is recognised.
MAX_CLIENT_MESSAGE_ID_CHARS = 100


def _client_message_id(content: dict) -> str:
    value = content.get("client_message_id")
    if value is None:
        return ""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CLIENT_MESSAGE_ID_CHARS or not value.isprintable():
        raise ClientError(
            ErrorCode.INVALID_FIELD_TYPE,
            f"'client_message_id' must be a string of 1 to {MAX_CLIENT_MESSAGE_ID_CHARS} printable characters.",
        )
    return value


def _parse_session_end(content: dict, max_message_chars: int) -> SessionEnd:
    return SessionEnd(session_id=_session_id(content))


def _parse_cancel(content: dict, max_message_chars: int) -> Cancel:
    return Cancel(session_id=_session_id(content))


def _parse_list_models(content: dict, max_message_chars: int) -> ListModels:
    return ListModels()


#: A resume token is 43 URL-safe characters (32 random bytes); anything far longer is not one.
MAX_RESUME_TOKEN_CHARS = 200
#: The largest `last_seq` accepted: 2**53 - 1, the largest integer a JavaScript client holds exactly.
MAX_SEQ = 2**53 - 1


def _parse_resume(content: dict, max_message_chars: int) -> Resume:
    session_id = _session_id(content)
    token = content.get("resume_token")
    if not isinstance(token, str) or not token or len(token) > MAX_RESUME_TOKEN_CHARS:
        raise ClientError(ErrorCode.RESUME_TOKEN_INVALID, "That resume_token does not resume this session.")
    last_seq = content.get("last_seq", 0)
    # Bounded like a JSON number every client can hold exactly; anything larger is no seq R2D2 made.
    if isinstance(last_seq, bool) or not isinstance(last_seq, int) or not 0 <= last_seq <= MAX_SEQ:
        raise ClientError(ErrorCode.INVALID_FIELD_TYPE, f"'last_seq' must be a whole number from 0 to {MAX_SEQ}.")
    return Resume(session_id=session_id, resume_token=token, last_seq=last_seq)


def _parse_usage(content: dict, max_message_chars: int) -> Usage:
    return Usage()


def _parse_watch(content: dict, max_message_chars: int) -> Watch:
    return Watch(session_id=_session_id(content))


def _parse_unwatch(content: dict, max_message_chars: int) -> Unwatch:
    return Unwatch(session_id=_session_id(content))


def _parse_list_sessions(content: dict, max_message_chars: int) -> ListSessions:
    return ListSessions()


PARSERS = {
    "chatbot_session_start": _parse_session_start,
    "chatbot_post_message": _parse_post_message,
    "chatbot_session_end": _parse_session_end,
    "chatbot_cancel": _parse_cancel,
    "chatbot_models": _parse_list_models,
    "chatbot_session_resume": _parse_resume,
    "chatbot_usage": _parse_usage,
    "chatbot_session_watch": _parse_watch,
    "chatbot_session_unwatch": _parse_unwatch,
    "chatbot_sessions": _parse_list_sessions,
}


# Outgoing frames -------------------------------------------------------------


def encode(frame_type: str, data: Any = None) -> str:
    """The text of one outgoing frame: exactly `type` then `data`."""
    return json.dumps({"type": frame_type, "data": data})


def session_start(session_id: uuid.UUID) -> str:
    return encode("session_start", {"session_id": str(session_id)})


def session_end() -> str:
    return encode("session_end")


def session_ended_by_server(session_id: uuid.UUID, reason: str) -> str:
    """`session_end` the client did not ask for (an operator ended it): says which session and why."""
    return encode("session_end", {"session_id": str(session_id), "reason": reason})


# The frames of every turn, built without a dict and a general encoder each time.
# `encode_basestring_ascii` is the C function json.dumps itself uses for a str with
# its defaults, so the bytes are the same (tests/unit/protocol/test_protocol.py checks they are).
_PROCESSING_START = encode("processing_start")
_PROCESSING_END = encode("processing_end")
_MESSAGE = '{"type": "message", "data": '
_MESSAGE_DELTA = '{"type": "message_delta", "data": '


def processing_start() -> str:
    return _PROCESSING_START


def processing_end() -> str:
    return _PROCESSING_END


def processing_end_with_model(model: str | None) -> str:
    """`processing_end` of a turn posted with `report_model`: the model that answered, as routed (e.g.
    `azure/gpt-4o-mini` when a fallback chain moved on), or None when none did."""
    return encode("processing_end", {"model": model})


def message(text: str) -> str:
    return _MESSAGE + encode_basestring_ascii(text) + "}"


def message_delta(text: str) -> str:
    return _MESSAGE_DELTA + encode_basestring_ascii(text) + "}"


def error(code: str, message: str) -> str:
    return encode("error", {"code": code, "message": message})


def models(available: list[tuple[str, str]]) -> str:
    """The models a client may choose: `(model id, provider name)` pairs, in the server's order."""
    return encode("models", [{"id": model, "provider": provider} for model, provider in available])


@dataclass(frozen=True, slots=True)
class UsageFigures:
    """A principal's use against its limits (None: no limit), as chat/accounts/quotas.py reads them."""

    messages_this_minute: int
    messages_per_minute: int | None
    tokens_today: int
    tokens_per_day: int | None
    usd_today: float
    usd_per_day: float | None
    usd_this_month: float
    usd_per_month: float | None
    sessions: int
    max_sessions: int | None
    day_resets_at: datetime
    month_resets_at: datetime


def usage(figures: UsageFigures) -> str:
    """The answer to `chatbot_usage`: each figure used against its limit, and when the day's and month's reset."""
    day, month = _instant(figures.day_resets_at), _instant(figures.month_resets_at)
    return encode(
        "usage",
        {
            "messages_per_minute": {"used": figures.messages_this_minute, "limit": figures.messages_per_minute},
            "tokens_today": {"used": figures.tokens_today, "limit": figures.tokens_per_day, "resets_at": day},
            "usd_today": {"used": figures.usd_today, "limit": figures.usd_per_day, "resets_at": day},
            "usd_this_month": {"used": figures.usd_this_month, "limit": figures.usd_per_month, "resets_at": month},
            "sessions": {"used": figures.sessions, "limit": figures.max_sessions},
        },
    )


def _instant(moment: datetime) -> str:
    """UTC, to the second, with a Z: "2026-12-03T00:00:00Z"."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Resumable sessions (chat/sessions/resume.py) ------------------------------------------
# Frames of a session started with `"resumable": true` carry two more keys after
# `type` and `data`; every other frame stays exactly as above.


def resumable_session_start(session_id: uuid.UUID, resume_token: str) -> str:
    return encode("session_start", {"session_id": str(session_id), "resume_token": resume_token})


def session_resumed(session_id: uuid.UUID, last_seq: int) -> str:
    return encode("session_resumed", {"session_id": str(session_id), "last_seq": last_seq})


def sequenced(frame: str, session_id: uuid.UUID, seq: int) -> str:
    """`frame` (an encoded object) with `session_id` and `seq` appended as its last keys.

    Spliced into the text rather than decoded and encoded again: this runs for every
    streamed delta, and the frame's own bytes stay whatever `encode` made them.
    """
    return f'{frame[:-1]}, "session_id": "{session_id}", "seq": {seq}}}'


def cancelled(session_id: uuid.UUID) -> str:
    """To the socket that cancelled a turn another of its principal's sockets holds: it was stopped."""
    return encode("cancelled", {"session_id": str(session_id)})


def frame_type(frame: str) -> str:
    """The `type` of an encoded frame (for reading the frame log back)."""
    return json.loads(frame)["type"]


# Watching a session from another socket (chat/sessions/watch.py) ------------------------
# The watched session's frames reach a watcher as its holder's socket gets them, with
# `session_id` and `seq` appended (`sequenced`), for plain sessions too.


def session_watching(session_id: uuid.UUID, messages: list[dict[str, Any]], partial: str | None) -> str:
    """The answer to `chatbot_session_watch`: the conversation as saved so far, and the reply being written."""
    return encode("session_watching", {"session_id": str(session_id), "messages": messages, "partial": partial})


def session_unwatched(session_id: uuid.UUID) -> str:
    return encode("session_unwatched", {"session_id": str(session_id)})


@dataclass(frozen=True, slots=True)
class LiveSession:
    """One of a principal's live sessions, as `chatbot_sessions` lists it."""

    session_id: uuid.UUID
    model: str
    resumable: bool
    answering: bool
    watchers: int
    started_at: datetime
    last_activity: datetime


def sessions(live: list[LiveSession]) -> str:
    """The answer to `chatbot_sessions`: the principal's live sessions, newest first."""
    return encode(
        "sessions",
        [
            {
                "session_id": str(s.session_id),
                "model": s.model,
                "resumable": s.resumable,
                "answering": s.answering,
                "watchers": s.watchers,
                "started_at": _instant(s.started_at),
                "last_activity": _instant(s.last_activity),
            }
            for s in live
        ],
    )
