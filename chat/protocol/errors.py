"""The error vocabulary: every refusal a client can see is a `ClientError` carrying an `ErrorCode`.

The consumer turns one into one `error` frame and keeps the socket open; the
docs/protocol.md and asyncapi.yaml document every code (tests hold them to this enum).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    BINARY_FRAME = "binary_frame"
    MISSING_ACTION = "missing_action"
    UNKNOWN_ACTION = "unknown_action"
    MISSING_SESSION_ID = "missing_session_id"
    INVALID_SESSION_ID = "invalid_session_id"
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_NOT_OWNED = "session_not_owned"
    SESSION_ENDED = "session_ended"
    MISSING_USER_MESSAGE = "missing_user_message"
    EMPTY_USER_MESSAGE = "empty_user_message"
    INVALID_FIELD_TYPE = "invalid_field_type"
    INVALID_TEXT = "invalid_text"
    INVALID_MODEL_NAME = "invalid_model_name"
    MESSAGE_TOO_LONG = "message_too_long"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    TOO_MANY_SESSIONS = "too_many_sessions"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    QUEUE_FULL = "queue_full"
    DUPLICATE_MESSAGE = "duplicate_message"
    NOTHING_TO_CANCEL = "nothing_to_cancel"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_SERVER_ERROR = "upstream_server_error"
    UPSTREAM_BAD_REQUEST = "upstream_bad_request"
    UPSTREAM_AUTH_FAILED = "upstream_auth_failed"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_STREAM_INTERRUPTED = "upstream_stream_interrupted"
    UPSTREAM_INVALID_RESPONSE = "upstream_invalid_response"
    REPLY_TOO_LARGE = "reply_too_large"
    INTERNAL_ERROR = "internal_error"
    RESUME_TOKEN_INVALID = "resume_token_invalid"
    RESUME_UNAVAILABLE = "resume_unavailable"
    TURN_INTERRUPTED = "turn_interrupted"
    SERVER_DRAINING = "server_draining"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TOO_MANY_WATCHES = "too_many_watches"
    HOLDER_UNREACHABLE = "holder_unreachable"


def storage_unavailable() -> ClientError:
    """PostgreSQL or Redis stayed unreachable past R2D2_STORAGE_RETRY_SECONDS (chat/ops/storage.py)."""
    return ClientError(ErrorCode.STORAGE_UNAVAILABLE, "The service's storage is unavailable; send it again.")


class ClientError(Exception):
    """A refusal or failure the client is told about; `message` is safe to show anyone."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
