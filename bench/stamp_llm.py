"""The local model server with a clock in its first token, for the first-token benchmark.

Same wire format as testkit/fake_llm.py (OpenAI Chat Completions, JSON or SSE).
The first streamed token is ``<monotonic_ns> `` read immediately before the
token is written to the socket, so a client on the same machine (CLOCK_MONOTONIC
is system-wide on Linux) can tell how long that token took to reach it.

    .venv/bin/python bench/stamp_llm.py --port 8765 --ttft 0.05 --token-delay 0.005
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

DEFAULT_TEXT = "These are the droids you are looking for, streamed one word at a time to measure R2D2."


def _chunk(model: str, delta: dict, finish: str | None, **extra) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def make_app(ttft: float, token_delay: float, text: str) -> web.Application:
    words = [w + " " for w in text.split(" ")]
    words[-1] = words[-1].rstrip()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "unknown")
        usage = {"prompt_tokens": 10, "completion_tokens": len(words) + 1, "total_tokens": len(words) + 11}
        if ttft:
            await asyncio.sleep(ttft)
        if not body.get("stream"):
            if token_delay:
                await asyncio.sleep(token_delay * len(words))
            reply = f"<{time.monotonic_ns()}> " + "".join(words)
            return web.json_response(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(_chunk(model, {"role": "assistant", "content": f"<{time.monotonic_ns()}> "}, None))
        for word in words:
            if token_delay:
                await asyncio.sleep(token_delay)
            await response.write(_chunk(model, {"content": word}, None))
        await response.write(_chunk(model, {}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": model, "choices": []}
            await response.write(b"data: " + json.dumps({**usage_chunk, "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    args = parser.parse_args()
    web.run_app(
        make_app(args.ttft, args.token_delay, args.text),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
