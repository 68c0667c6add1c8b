"""A local OpenAI-compatible Chat Completions server for tests and benchmarks.

Real HTTP on loopback, `POST /v1/chat/completions`, plain JSON or SSE streaming,
with scripted replies, delays and faults, and a record of every request, so
the real `openai` client can be exercised end to end with no internet.

Behaviour for a request comes, in order, from: a `Script` queued with
`enqueue()`; a directive in the last user message such as
``[[status=500]]`` or ``[[cut_after=3 token_delay=0.05]]`` (for concurrent
tests and other processes); the server-wide defaults. The default reply
echoes the last user message: ``Echo: <message>``. A request's ``max_tokens`` cuts
the reply to that many tokens (finish_reason ``length``), as a real server does.

Run it alone for benchmarks: ``python -m testkit.fake_llm --port 8765 --ttft 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any

from aiohttp import web

#: Upstream error bodies carry this marker: tests assert it never reaches a client or a log.
SECRET_DETAIL = "upstream-internal-detail-7f3a"

_DIRECTIVE = re.compile(r"\[\[([^\]]*)\]\]")


@dataclass
class Script:
    """How the server answers one request."""

    text: str | None = None  # the reply; None echoes the last user message
    status: int = 200
    retry_after: float | None = None  # sent as Retry-After with an error status
    stall: float = 0.0  # seconds before any response byte (a hung server)
    ttft: float = 0.0  # seconds before the first token
    token_delay: float = 0.0  # seconds between tokens
    cut_after: int | None = None  # stream: close the connection after N tokens, no [DONE]
    malformed: bool = False  # stream: send an unparseable SSE event after the first token
    chunks: list[str] | None = None  # stream: exactly these text chunks (e.g. a surrogate pair split in two)
    stall_after: int | None = None  # stream: after N tokens, go silent for `stall_for` seconds (a stalled model)
    stall_for: float = 3600.0

    @classmethod
    def from_directive(cls, base: Script, text: str) -> Script:
        match = _DIRECTIVE.search(text)
        if not match:
            return base
        types = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for item in match.group(1).split():
            key, _, value = item.partition("=")
            kind = types.get(key, "")
            if "bool" in kind:
                changes[key] = value.lower() in {"1", "true", "yes", ""}
            elif "int" in kind:
                changes[key] = int(value)
            elif "float" in kind:
                changes[key] = float(value)
            elif key == "text":
                changes[key] = value.replace("_", " ")
        return replace(base, **changes)


@dataclass
class Recorded:
    """One request as the server received it."""

    body: dict[str, Any]
    headers: dict[str, str]
    time: float = field(default_factory=time.monotonic)

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.body.get("messages", [])


def tokenize(text: str) -> list[str]:
    """Split text into word-sized chunks whose concatenation is the text."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


class FakeLLM:
    """The server. `start()` runs it on a background thread; `serve()` runs it on the caller's loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        defaults: Script | None = None,
        fail_rate: float = 0.0,
        stall_rate: float = 0.0,
        record: bool = True,
        seed: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.defaults = defaults or Script()
        self.fail_rate, self.stall_rate = fail_rate, stall_rate
        self.record = record
        self.requests: list[Recorded] = []
        self.disconnects = 0  # streams the client closed before the end
        self.completed = 0  # responses sent in full
        self._queue: deque[Script] = deque()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # Control -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def enqueue(self, *scripts: Script) -> None:
        with self._lock:
            self._queue.extend(scripts)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.disconnects = self.completed = 0

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Poll until predicate(self) is true (for effects that land after the client returns)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return predicate(self)

    def start(self) -> FakeLLM:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-llm", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)

    async def serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    # Serving -----------------------------------------------------------------

    def _script_for(self, body: dict[str, Any]) -> Script:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        script = self.defaults
        if self.fail_rate and self._random.random() < self.fail_rate:
            script = replace(script, status=500)
        elif self.stall_rate and self._random.random() < self.stall_rate:
            script = replace(script, stall=3600.0)
        last_user = _last_user(body)
        return Script.from_directive(script, last_user)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.record:
            with self._lock:
                self.requests.append(Recorded(body=body, headers=dict(request.headers)))
        script = self._script_for(body)
        if script.stall:
            await asyncio.sleep(script.stall)
        if script.status != 200:
            return _error_response(script)
        text = script.text if script.text is not None else "Echo: " + _DIRECTIVE.sub("", _last_user(body)).strip()
        tokens = script.chunks if script.chunks is not None else tokenize(text)
        limit = body.get("max_tokens")
        truncated = isinstance(limit, int) and len(tokens) > limit
        if truncated:
            tokens = tokens[:limit]  # as a real server stops at the request's output limit
        text = "".join(tokens)
        model = body.get("model", "unknown")
        usage = {
            "prompt_tokens": sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4 + 1,
            "completion_tokens": len(tokens),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if script.ttft:
            await asyncio.sleep(script.ttft)
        if not body.get("stream"):
            if script.token_delay:
                await asyncio.sleep(script.token_delay * len(tokens))
            self.completed += 1
            return web.json_response(_completion(model, text, usage, "length" if truncated else "stop"))
        return await self._stream(request, script, model, tokens, usage, body, "length" if truncated else "stop")

    async def _stream(self, request, script, model, tokens, usage, body, finish: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        try:
            for index, token in enumerate(tokens):
                if index and script.token_delay:
                    await asyncio.sleep(script.token_delay)
                if index and index == script.stall_after:
                    await asyncio.sleep(script.stall_for)
                if script.cut_after is not None and index >= script.cut_after:
                    # Drop the connection mid-stream: no finish_reason, no [DONE].
                    request.transport.close()
                    return response
                delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
                await response.write(_sse(_chunk(chunk_id, model, delta, None)))
                if script.malformed:
                    await response.write(b'data: {"id": "broken", "choices": [\n\n')
                    await response.write_eof()
                    return response
            await response.write(_sse(_chunk(chunk_id, model, {}, finish)))
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(_sse({**_chunk(chunk_id, model, {}, None), "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response


def _last_user(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return message.get("content") or ""
    return ""


def _error_response(script: Script) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
    headers = {"Retry-After": f"{script.retry_after:g}"} if script.retry_after is not None else {}
    error = {
        "message": f"fake upstream failure {script.status}: {SECRET_DETAIL}",
        "type": kinds.get(script.status, "server_error"),
        "code": kinds.get(script.status, "server_error"),
    }
    return web.json_response({"error": error}, status=script.status, headers=headers)


def _completion(model: str, text: str, usage: dict[str, int], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage,
    }


def _chunk(chunk_id: str, model: str, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--text", default=None, help="fixed reply text (default: echo)")
    parser.add_argument("--repeat", type=int, default=1, help="the fixed reply is --text this many times over")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of calls answered 500")
    parser.add_argument("--stall-rate", type=float, default=0.0, help="fraction of calls that never answer")
    args = parser.parse_args()
    server = FakeLLM(
        host=args.host,
        port=args.port,
        defaults=Script(
            text=args.text * args.repeat if args.text is not None else None,
            ttft=args.ttft,
            token_delay=args.token_delay,
        ),
        fail_rate=args.fail_rate,
        stall_rate=args.stall_rate,
        record=False,
    )

    async def run() -> None:
        await server.serve()
        print(f"fake LLM listening on {server.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
