"""CPU per model call, in this process, for each way of calling the same model server.

Sequential streamed (or plain) calls with a 10-message history against the local model
server answering 20 chunks at once; CPU is this process's `time.process_time()`, so the
model server (its own process) is not counted. The ways alternate call by call, so a
neighbour's load on the machine falls on all of them alike.

    create   chat.completions.create() (pydantic chunks, request transform): the seed's way
    r2d2     chat/llm/openai_compat.py: its own aiohttp session, the URL and headers it builds, an orjson
             body, SSE read with orjson
    aiohttp  a bare aiohttp POST with the same decoding: the floor

    .venv/bin/python bench/client_overhead.py [--calls 300] [--plain]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import statistics
import time

from common import API_KEY, direct_client, model_url, start_model, write_result

HISTORY = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 8} for i in range(10)]
TEXT = "_".join(f"w{i}" for i in range(20))  # the model server splits on "_": 20 chunks


async def main(calls: int, stream: bool) -> dict:
    import aiohttp
    import django
    import orjson

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r2d2site.settings")
    # The provider reads settings only; production settings need a secret key to load at all.
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-secret-key-not-for-production-0123456789abcdefghijklmnop")
    model = start_model(text=TEXT)
    os.environ["OPENAI_BASE_URL"] = model_url(model)
    os.environ["OPENAI_API_KEY"] = API_KEY
    django.setup()
    from chat.llm.base import Deadlines, Reply
    from chat.llm.openai_compat import OpenAIProvider

    client = direct_client(model_url(model))
    provider = OpenAIProvider()
    session = aiohttp.ClientSession()
    url = model_url(model) + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    async def create() -> str:
        if not stream:
            done = await client.chat.completions.create(model="m", messages=HISTORY)
            return done.choices[0].message.content
        text = ""
        response = await client.chat.completions.create(
            model="m", messages=HISTORY, stream=True, stream_options={"include_usage": True}
        )
        async with response:
            async for chunk in response:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        text += choice.delta.content
        return text

    async def r2d2() -> str:
        deadlines = Deadlines(first=30, idle=30, whole=30)
        parts = [
            c
            async for c in provider.generate(
                model="m", messages=HISTORY, stream=stream, reply=Reply(), deadlines=deadlines
            )
        ]
        return "".join(parts)

    async def bare() -> str:
        body = {"model": "m", "messages": HISTORY}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with session.post(url, data=orjson.dumps(body), headers=headers) as response:
            if not stream:
                return orjson.loads(await response.read())["choices"][0]["message"]["content"]
            text = ""
            async for line in response.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    for choice in orjson.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
            return text

    ways = {"create": create, "r2d2": r2d2, "aiohttp": bare}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for name, way in ways.items():  # warm up: connections, imports, caches
            for _ in range(20):
                assert (await way()).replace("_", "") == TEXT.replace("_", ""), name
        for _ in range(calls):
            for name, way in ways.items():
                started = time.process_time()
                await way()
                cpu[name].append(time.process_time() - started)
    finally:
        await session.close()
        await client.close()
        await provider.close()
        model.stop()
    return {
        name: {"median_ms": round(statistics.median(v) * 1000, 3), "mean_ms": round(statistics.fmean(v) * 1000, 3)}
        for name, v in cpu.items()
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls of each way (alternating)")
    parser.add_argument("--plain", action="store_true", help="one JSON answer instead of a stream")
    args = parser.parse_args()
    figures = asyncio.run(main(args.calls, not args.plain))
    for name, row in figures.items():
        print(f"{name:>8}: {row['median_ms']:.3f} ms CPU per call (median; mean {row['mean_ms']:.3f})")
    kind = "plain" if args.plain else "streamed"
    write_result(f"client_overhead-{kind}", {"calls": args.calls, "history": len(HISTORY), "cpu_per_call": figures})
