"""The published protocol (asyncapi.yaml) as a test oracle: does a frame the server sent match the document?

`testkit.client.ProtocolClient` checks every frame it receives, so every end-to-end
test also proves the document describes what the server really sends.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "asyncapi.yaml"
_URI = "urn:r2d2:asyncapi"


@functools.cache
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT_PATH.read_text())


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(_URI, Resource.from_contents(document(), default_specification=DRAFT7))


def validator(pointer: str) -> jsonschema.Draft7Validator:
    """A validator for the schema at a JSON pointer in the document (its $refs resolve in the document)."""
    return jsonschema.Draft7Validator({"$ref": f"{_URI}#{pointer}"}, registry=_registry())


def _message_id(ref_or_message: dict[str, Any], fallback: str) -> str:
    ref = ref_or_message.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else fallback


@functools.cache
def server_messages() -> dict[str, tuple[frozenset[str], jsonschema.Draft7Validator]]:
    """Every frame the server may send: message id → (its `type` values, payload validator)."""
    found = {}
    for key, entry in document()["channels"]["chat"]["messages"].items():
        message_id = _message_id(entry, key)
        pointer = f"/components/messages/{message_id}/payload"
        type_schema = document()["components"]["messages"][message_id]["payload"].get("properties", {}).get("type")
        if type_schema is None or "const" not in type_schema:
            continue  # a client frame (it has `action`)
        types = frozenset({type_schema["const"]})
        found[message_id] = (types, validator(pointer))
    return found


def match_frame(text: str) -> str:
    """The id of the documented server message this frame is, or AssertionError saying why it is none."""
    try:
        frame = json.loads(text)
    except ValueError:
        raise AssertionError(f"server frame is not JSON: {text!r}") from None
    # Frames about a resumable session carry `session_id` and `seq` after those two (a watch's end, `session_id`).
    # A turn asked for `with_ids` names its messages (message_id, reply_id) between those and them.
    if not isinstance(frame, dict) or not _in_order(list(frame)):
        raise AssertionError(
            "server frame must be an object with keys type, data (in that order), then maybe message_id, reply_id, "
            f"then maybe session_id (and seq): {text!r}"
        )
    problems = []
    for message_id, (types, check) in server_messages().items():
        if frame["type"] not in types:
            continue
        errors = list(check.iter_errors(frame))
        if not errors:
            return message_id
        problems += [f"{message_id}: {e.message}" for e in errors]
    if not problems:
        raise AssertionError(f"frame type {frame['type']!r} is not in asyncapi.yaml: {text!r}")
    raise AssertionError(f"frame does not match asyncapi.yaml: {text!r}\n  " + "\n  ".join(problems))


def check_frame(text: str) -> None:
    match_frame(text)


def _in_order(keys: list[str]) -> bool:
    if keys[:2] != ["type", "data"]:
        return False
    rest = keys[2:]
    if rest[-2:] == ["session_id", "seq"]:
        rest = rest[:-2]
    elif rest[-1:] == ["session_id"]:  # the `error` that ends a watch names its session, and has no seq
        rest = rest[:-1]
    return rest in ([], ["message_id"], ["reply_id"], ["message_id", "reply_id"])
