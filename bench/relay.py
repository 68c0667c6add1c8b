"""The bare relay: R2D2's protocol over the `websockets` library, no Django, no database.

The Python floor for the throughput benchmark: the same frames (encoded the
same way), the same `openai` client on the same aiohttp transport, talking to
the same model server, with nothing else. Sessions live in a dict; nothing is saved.

    .venv/bin/python bench/relay.py --port 8766 --base-url http://127.0.0.1:8765/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import uuid

import openai
from websockets.asyncio.server import serve


def frame(kind: str, data=None) -> str:
    return json.dumps({"type": kind, "data": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--reuse-port", action="store_true", help="share the port with other relays (bench/scaling.py)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def run() -> None:
        client = openai.AsyncOpenAI(
            api_key="sk-bench",
            base_url=args.base_url,
            timeout=60,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(timeout=60),
        )

        async def handler(ws) -> None:
            histories: dict[str, list[dict[str, str]]] = {}
            async for raw in ws:
                request = json.loads(raw)
                action = request.get("action")
                if action == "chatbot_session_start":
                    session_id = str(uuid.uuid4())
                    histories[session_id] = []
                    await ws.send(frame("session_start", {"session_id": session_id}))
                elif action == "chatbot_session_end":
                    histories.pop(request["session_id"], None)
                    await ws.send(frame("session_end"))
                elif action == "chatbot_post_message":
                    history = histories[request["session_id"]]
                    await ws.send(frame("processing_start"))
                    history.append({"role": "user", "content": request["user_message"]})
                    text = ""
                    if request.get("stream"):
                        response = await client.chat.completions.create(
                            model="gpt-3.5-turbo",
                            messages=history,
                            stream=True,
                            stream_options={"include_usage": True},
                        )
                        async with response:
                            async for chunk in response:
                                for choice in chunk.choices:
                                    if choice.delta and choice.delta.content:
                                        text += choice.delta.content
                                        await ws.send(frame("message_delta", choice.delta.content))
                    else:
                        completion = await client.chat.completions.create(model="gpt-3.5-turbo", messages=history)
                        text = completion.choices[0].message.content or ""
                    history.append({"role": "assistant", "content": text})
                    await ws.send(frame("message", text))
                    await ws.send(frame("processing_end"))

        async with serve(
            handler,
            args.host,
            args.port,
            compression=None,
            ping_interval=None,
            backlog=4096,
            reuse_port=args.reuse_port,
        ):
            await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
