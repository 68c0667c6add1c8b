"""The published protocol: asyncapi.yaml is valid AsyncAPI 3, complete, served, and true to what the server sends."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jsonschema
import pytest
from channels.testing import WebsocketCommunicator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from chat.models import EndReason
from chat.protocol.errors import ErrorCode
from chat.sessions.lifecycle import request_end
from r2d2site.asgi import application
from testkit.client import ProtocolClient
from testkit.contract import DOCUMENT_PATH, document, match_frame, server_messages, validator
from testkit.fake_llm import Script

OFFICIAL_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json.gz"


def error_codes() -> set[str]:
    return {value for name, value in vars(ErrorCode).items() if name.isupper()}


def test_document_is_valid_asyncapi_3():
    """The document validates against the official AsyncAPI 3.0.0 JSON Schema (@asyncapi/specs 6.8.0)."""
    schema = json.loads(gzip.decompress(OFFICIAL_SCHEMA.read_bytes()))
    registry = Registry().with_resources(
        (uri, Resource.from_contents(definition, default_specification=DRAFT7))
        for uri, definition in schema["definitions"].items()
    )
    errors = list(jsonschema.Draft7Validator(schema, registry=registry).iter_errors(document()))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors]
    assert document()["asyncapi"] == "3.0.0"


def test_every_error_code_is_documented_and_no_other():
    """The error frame's `code` lists exactly chat.protocol.ErrorCode, each with a description."""
    documented = document()["components"]["schemas"]["ErrorCode"]["oneOf"]
    assert {c["const"] for c in documented} == error_codes()
    assert all(c.get("description") for c in documented)
    text = DOCUMENT_PATH.read_text()
    for code in error_codes():
        assert code in text


def test_every_end_reason_is_documented():
    documented = document()["components"]["schemas"]["EndReason"]["oneOf"]
    assert {c["const"] for c in documented} == set(EndReason.values)


def test_every_action_is_documented_and_examples_validate():
    """The ten actions are there, and each message's examples match its own payload schema."""
    messages = document()["components"]["messages"]
    actions = {m["name"] for m in messages.values() if "action" in m["payload"].get("properties", {})}
    assert actions == {
        "chatbot_session_start",
        "chatbot_post_message",
        "chatbot_session_end",
        "chatbot_cancel",
        "chatbot_models",
        "chatbot_session_resume",
        "chatbot_usage",
        "chatbot_session_watch",
        "chatbot_session_unwatch",
        "chatbot_sessions",
    }
    for message_id, message in messages.items():
        check = validator(f"/components/messages/{message_id}/payload")
        assert message.get("examples"), message_id
        for example in message["examples"]:
            check.validate(example["payload"])
    assert set(server_messages()) == {
        "sessionStart",
        "processingStart",
        "messageDelta",
        "message",
        "processingEnd",
        "sessionEnd",
        "sessionEndedByServer",
        "sessionResumed",
        "cancelled",
        "models",
        "usage",
        "sessionWatching",
        "sessionUnwatched",
        "sessions",
        "error",
    }


def test_the_contract_refuses_frames_it_does_not_describe():
    """The checker is not vacuous: wrong shapes, unknown codes and unknown types are caught."""
    assert match_frame('{"type": "processing_end", "data": null}') == "processingEnd"
    assert match_frame('{"type": "session_end", "data": null}') == "sessionEnd"
    for bad in [
        '{"data": null, "type": "processing_end"}',
        '{"type": "processing_end", "data": "x"}',
        '{"type": "error", "data": {"code": "made_up", "message": "?"}}',
        '{"type": "message", "data": 3}',
        '{"type": "session_end", "data": {"session_id": "nope", "reason": "operator"}}',
        '{"type": "telemetry", "data": null}',
    ]:
        with pytest.raises(AssertionError):
            match_frame(bad)


@pytest.mark.django_db
def test_served_at_asyncapi_yaml(client):
    """GET /asyncapi.yaml returns the file in the repository, as YAML."""
    response = client.get("/asyncapi.yaml")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/yaml")
    assert b"".join(response.streaming_content) == DOCUMENT_PATH.read_bytes()


@pytest.mark.django_db(transaction=True)
async def test_a_live_conversation_sends_every_documented_frame(daphne, fake_llm):
    """One conversation over a real socket produces every server frame the document lists, each matching it."""
    seen: dict[str, set[str]] = {}
    client = await ProtocolClient.connect(daphne.url)

    async def exchange(frame, until: str | None = None) -> list[dict]:
        await client.send(frame)
        return await client.until(until) if until else [await client.recv()]

    session_id = (await exchange({"action": "chatbot_session_start", "gpt_model": "gpt-4o-mini"}))[0]["data"][
        "session_id"
    ]
    [models] = await exchange({"action": "chatbot_models"})
    assert models["data"][0]["id"] == "gpt-3.5-turbo"
    [usage] = await exchange({"action": "chatbot_usage"})
    assert usage["data"]["sessions"] == {"used": 1, "limit": 8}
    [sessions] = await exchange({"action": "chatbot_sessions"})
    assert sessions["data"] == []  # an anonymous connection has no principal to list for
    post = {"action": "chatbot_post_message", "session_id": session_id}
    await exchange({**post, "user_message": "whole"}, "processing_end")
    await exchange({**post, "user_message": "streamed", "stream": True, "system_message": "Hi"}, "processing_end")

    fake_llm.enqueue(Script(text="a b c d e f g h i j k l m n o p", token_delay=0.2))
    await client.send({**post, "user_message": "to be stopped", "stream": True})
    assert [f["type"] for f in await client.until("message_delta")] == ["processing_start", "message_delta"]
    await client.send({"action": "chatbot_cancel", "session_id": session_id})
    assert (await client.until("processing_end"))[-1]["type"] == "processing_end"

    fake_llm.enqueue(Script(status=401))
    await exchange({**post, "user_message": "fails upstream"}, "processing_end")
    for refused in [
        "not json",
        "[1, 2]",
        b"\x00binary",
        {"gpt_model": "x"},
        {"action": "fly"},
        {"action": "chatbot_session_end"},
        {"action": "chatbot_session_end", "session_id": "123"},
        {"action": "chatbot_session_end", "session_id": "00000000-0000-0000-0000-000000000000"},
        {**post},
        {**post, "user_message": "  "},
        {**post, "user_message": "x", "stream": "yes"},
        {"action": "chatbot_cancel", "session_id": session_id},
    ]:
        [frame] = await exchange(refused)
        assert frame["type"] == "error", refused
    await exchange({"action": "chatbot_session_end", "session_id": session_id})
    await client.close()

    for text in client.received:
        frame = json.loads(text)
        seen.setdefault(match_frame(text), set()).add(frame["data"]["code"] if frame["type"] == "error" else "")
    # Frames of other connections' sessions are checked where they are sent (tests/production/, tests/e2e/).
    others = {"sessionEndedByServer", "sessionResumed", "cancelled", "sessionWatching", "sessionUnwatched"}
    assert set(seen) == set(server_messages()) - others
    assert {
        "invalid_json",
        "not_an_object",
        "binary_frame",
        "missing_action",
        "unknown_action",
        "missing_session_id",
        "invalid_session_id",
        "session_not_found",
        "missing_user_message",
        "empty_user_message",
        "invalid_field_type",
        "nothing_to_cancel",
        "upstream_auth_failed",
    } <= seen["error"]


@pytest.mark.django_db(transaction=True)
async def test_server_initiated_session_end_matches_the_document():
    """The session_end an operator causes ({session_id, reason}) is the documented server-initiated form."""
    communicator = WebsocketCommunicator(application, "/")
    assert (await communicator.connect())[0]
    await communicator.send_json_to({"action": "chatbot_session_start"})
    session_id = (await communicator.receive_json_from())["data"]["session_id"]
    await request_end(session_id)
    text = await communicator.receive_from(timeout=5)
    assert match_frame(text) == "sessionEndedByServer"
    assert json.loads(text)["data"] == {"session_id": session_id, "reason": "operator"}
    await communicator.disconnect()
