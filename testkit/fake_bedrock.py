"""A local Amazon Bedrock Runtime server for tests: Converse and ConverseStream on the real wire format.

Real HTTP on loopback, so the real boto3 client (pointed here by endpoint_url, with
dummy credentials) signs, sends, parses and streams exactly as against AWS:
`POST /model/{modelId}/converse` answers JSON; `POST /model/{modelId}/converse-stream`
answers `application/vnd.amazon.eventstream` frames (prelude with lengths and CRC32,
string headers, JSON payload, message CRC32). Errors use AWS's REST-JSON shape: an
HTTP status, an `x-amzn-ErrorType` header and `{"message": ...}`; mid-stream they are
exception events.

Scripted like testkit/fake_llm.py (a queued `BedrockScript`, else a directive in the
last user message, else the defaults), recording every request and counting the
streams a client closed early. The default reply echoes the last user message.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from testkit.fake_llm import _DIRECTIVE, SECRET_DETAIL, FakeLLM, Script, tokenize

#: The error type AWS names for an HTTP status (used when a script gives none).
ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


@dataclass
class BedrockScript(Script):
    """How the server answers one request: fake_llm's knobs, plus Bedrock's faults."""

    error_type: str | None = None  # with `status`: the x-amzn-ErrorType (default from ERROR_TYPES)
    exception: str | None = None  # stream: send this exception event (e.g. "throttlingException") ...
    exception_after: int = 0  # ... after this many text deltas
    no_stop: bool = False  # stream: end cleanly but without messageStop


@dataclass
class Recorded:
    """One request as the server received it."""

    model_id: str
    stream: bool
    body: dict[str, Any]
    headers: dict[str, str]
    time: float = field(default_factory=time.monotonic)


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32), headers, payload, CRC32."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        # Header: name length (1 byte), name, value type (7 = string), value length (2 bytes), value.
        encoded += struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">BH", 7, len(raw_value)) + raw_value
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(event_type: str, body: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_event(headers, json.dumps(body).encode())


def exception_event(exception_type: str, message: str) -> bytes:
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_event(headers, json.dumps({"message": message}).encode())


class FakeBedrock(FakeLLM):
    """The server, on a background thread (`start()`): fake_llm's controls (enqueue, reset,
    wait_for, start, stop, `requests`, `disconnects`, `completed`) on Bedrock's routes."""

    requests: list[Recorded]  # type: ignore[assignment]
    defaults: BedrockScript

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, defaults: BedrockScript | None = None) -> None:
        super().__init__(host=host, port=port, defaults=defaults or BedrockScript())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def enqueue(self, *scripts: BedrockScript) -> None:
        super().enqueue(*scripts)

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_post("/model/{model_id}/converse", self._converse)
        app.router.add_post("/model/{model_id}/converse-stream", self._converse_stream)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    # Serving -----------------------------------------------------------------

    async def _accept(self, request: web.Request, stream: bool) -> tuple[BedrockScript, dict[str, Any]]:
        body = await request.json()
        with self._lock:
            model_id = request.match_info["model_id"]
            self.requests.append(Recorded(model_id=model_id, stream=stream, body=body, headers=dict(request.headers)))
            script = self._queue.popleft() if self._queue else None
        if script is None:
            script = BedrockScript.from_directive(self.defaults, _last_user(body))
        if script.stall:
            await asyncio.sleep(script.stall)
        return script, body

    async def _converse(self, request: web.Request) -> web.Response:
        script, body = await self._accept(request, stream=False)
        if script.status != 200:
            return _error_response(script)
        text = _reply_text(script, body)
        await asyncio.sleep(script.ttft + script.token_delay * len(tokenize(text)))
        self.completed += 1
        return web.json_response(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn",
                "usage": _usage(body, text),
                "metrics": {"latencyMs": 1},
            },
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )

    async def _converse_stream(self, request: web.Request) -> web.StreamResponse:
        script, body = await self._accept(request, stream=True)
        if script.status != 200:
            return _error_response(script)
        text = _reply_text(script, body)
        response = web.StreamResponse(
            headers={"Content-Type": "application/vnd.amazon.eventstream", "x-amzn-RequestId": str(uuid.uuid4())}
        )
        await response.prepare(request)
        try:
            if script.ttft:
                await asyncio.sleep(script.ttft)
            await response.write(event("messageStart", {"role": "assistant"}))
            for index, token in enumerate(tokenize(text)):
                if index and script.token_delay:
                    await asyncio.sleep(script.token_delay)
                if index and index == script.stall_after:
                    await asyncio.sleep(script.stall_for)
                if script.exception and index >= script.exception_after:
                    break
                if script.cut_after is not None and index >= script.cut_after:
                    request.transport.close()  # drop the connection: no messageStop
                    return response
                await response.write(event("contentBlockDelta", {"delta": {"text": token}, "contentBlockIndex": 0}))
            if script.exception:
                await response.write(exception_event(script.exception, f"fake stream failure: {SECRET_DETAIL}"))
            else:
                await response.write(event("contentBlockStop", {"contentBlockIndex": 0}))
                if not script.no_stop:
                    await response.write(event("messageStop", {"stopReason": "end_turn"}))
                    await response.write(event("metadata", {"usage": _usage(body, text), "metrics": {"latencyMs": 1}}))
            await response.write_eof()
            self.completed += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response


def _texts(message: dict[str, Any]) -> str:
    return "".join(block.get("text", "") for block in message.get("content", []))


def _last_user(body: dict[str, Any]) -> str:
    """The newest user text: the last block of the last user message (earlier blocks may be
    messages merged into it)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user" and message.get("content"):
            return message["content"][-1].get("text", "")
    return ""


def _reply_text(script: BedrockScript, body: dict[str, Any]) -> str:
    text = script.text if script.text is not None else "Echo: " + _DIRECTIVE.sub("", _last_user(body)).strip()
    limit = (body.get("inferenceConfig") or {}).get("maxTokens")
    if isinstance(limit, int):
        text = "".join(tokenize(text)[:limit])  # as Bedrock stops at the request's output limit
    return text


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    sent = sum(len(_texts(m)) for m in body.get("messages", [])) + sum(len(b["text"]) for b in body.get("system", []))
    usage = {"inputTokens": sent // 4 + 1, "outputTokens": len(tokenize(text))}
    return {**usage, "totalTokens": usage["inputTokens"] + usage["outputTokens"]}


def _error_response(script: BedrockScript) -> web.Response:
    error_type = script.error_type or ERROR_TYPES.get(script.status, "InternalServerException")
    return web.json_response(
        {"message": f"fake Bedrock failure {script.status}: {SECRET_DETAIL}"},
        status=script.status,
        headers={
            "x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": str(uuid.uuid4()),
        },
    )
