"""The Bedrock provider's pieces without a server process: the fake's wire format, the request
it builds, which provider answers which model, and the model list."""

from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from chat import llm, protocol
from chat.llm.bedrock import converse_request
from chat.protocol import ListModels
from testkit.fake_bedrock import event, exception_event


class _Raw:
    """A response body delivering bytes in awkward pieces, as a socket may."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.pieces = [data[i : i + piece] for i in range(0, len(data), piece)]

    def stream(self):
        yield from self.pieces

    def close(self) -> None:
        pass


def botocore_reads(data: bytes) -> list[dict]:
    """The events botocore's own ConverseStream parser finds in `data`."""
    operation = botocore.session.get_session().get_service_model("bedrock-runtime").operation_model("ConverseStream")
    shape = operation.output_shape.members["stream"]
    return list(EventStream(_Raw(data), shape, EventStreamJSONParser(), "ConverseStream"))


def test_fake_events_are_what_botocore_parses():
    """The fake's encoder (lengths, headers, CRCs) is checked by the real decoder, not by itself."""
    data = (
        event("messageStart", {"role": "assistant"})
        + event("contentBlockDelta", {"delta": {"text": "Héllo"}, "contentBlockIndex": 0})
        + event("contentBlockStop", {"contentBlockIndex": 0})
        + event("messageStop", {"stopReason": "end_turn"})
        + event("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4}, "metrics": {}})
    )
    events = botocore_reads(data)
    assert events[0] == {"messageStart": {"role": "assistant"}}
    assert events[1] == {"contentBlockDelta": {"delta": {"text": "Héllo"}, "contentBlockIndex": 0}}
    assert events[3] == {"messageStop": {"stopReason": "end_turn"}}
    assert events[4]["metadata"]["usage"] == {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4}


def test_fake_exception_events_raise_in_botocore():
    data = event("messageStart", {"role": "assistant"}) + exception_event("throttlingException", "slow down")
    with pytest.raises(EventStreamError) as info:
        botocore_reads(data)
    assert info.value.response["Error"] == {"Code": "throttlingException", "Message": "slow down"}


def test_fake_checksums_are_real():
    """A flipped payload byte fails botocore's CRC check: the fake computes them, it does not pad them."""
    data = bytearray(event("contentBlockDelta", {"delta": {"text": "x"}, "contentBlockIndex": 0}))
    data[-10] ^= 1
    with pytest.raises(ChecksumMismatch):
        botocore_reads(bytes(data))


def test_converse_request_separates_the_system_message_and_merges_turns():
    """Converse wants the system text apart and strictly alternating roles; R2D2's history has two
    user messages in a row after a failed turn, and a blank reply after one cancelled early."""
    request = converse_request(
        "bedrock/amazon.nova-lite-v1:0",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second (the first got no reply)"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "stop that"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "now"},
        ],
    )
    assert request == {
        "modelId": "amazon.nova-lite-v1:0",
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": "first"}, {"text": "second (the first got no reply)"}]},
            {"role": "assistant", "content": [{"text": "answer"}]},
            {"role": "user", "content": [{"text": "stop that"}, {"text": "now"}]},
        ],
    }
    assert "system" not in converse_request("m", [{"role": "user", "content": "hi"}])


def test_models_are_routed_by_name(settings):
    settings.R2D2_BEDROCK_MODELS = ["anthropic.claude-3-5-haiku-20241022-v1:0"]
    settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = "http://127.0.0.1:1/v1", "k"
    assert llm.provider_for("anthropic.claude-3-5-haiku-20241022-v1:0").name == "bedrock"
    assert llm.provider_for("bedrock/amazon.nova-lite-v1:0").name == "bedrock"
    assert llm.provider_for("bedrock/anthropic.claude-3-5-haiku-20241022-v1:0").name == "bedrock"
    assert llm.provider_for("gpt-4o-mini").name == "openai"
    settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = None, ""
    assert llm.provider_for("gpt-4o-mini").name == "offline"
    assert llm.provider_for("bedrock/amazon.nova-lite-v1:0").name == "bedrock"


def test_model_list_is_the_allow_list_else_the_defaults(settings):
    settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = "http://127.0.0.1:1/v1", "k"
    settings.R2D2_DEFAULT_MODEL = "gpt-4o-mini"
    settings.R2D2_BEDROCK_MODELS = ["amazon.nova-lite-v1:0", "bedrock/us.anthropic.claude-3-5-haiku-20241022-v1:0"]
    settings.R2D2_ALLOWED_MODELS = []
    assert llm.models() == [
        ("gpt-4o-mini", "openai"),
        ("amazon.nova-lite-v1:0", "bedrock"),
        ("bedrock/us.anthropic.claude-3-5-haiku-20241022-v1:0", "bedrock"),
    ]
    settings.R2D2_ALLOWED_MODELS = ["amazon.nova-lite-v1:0", "gpt-4o"]
    assert llm.models() == [("amazon.nova-lite-v1:0", "bedrock"), ("gpt-4o", "openai")]
    settings.R2D2_ALLOWED_MODELS, settings.R2D2_BEDROCK_MODELS = [], []
    settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = None, ""
    assert llm.models() == [("gpt-4o-mini", "offline")]


def test_models_frame():
    assert protocol.parse_text('{"action": "chatbot_models"}', max_message_chars=10) == ListModels()
    assert protocol.models([("gpt-4o-mini", "openai"), ("amazon.nova-lite-v1:0", "bedrock")]) == (
        '{"type": "models", "data": [{"id": "gpt-4o-mini", "provider": "openai"}, '
        '{"id": "amazon.nova-lite-v1:0", "provider": "bedrock"}]}'
    )
    assert json.loads(protocol.models([])) == {"type": "models", "data": []}
