"""Watchers' cost (issue 28): one streaming session held on process A, watched by 0, 1, 10, 100 and 1,000 sockets
on process B (PostgreSQL, Redis, two Daphne processes).

For each count: the CPU per frame of A (the holder's process: one publish per frame whatever the count) and of B
(which delivers to every watcher), each watcher's delay behind the holder's socket for the same frame (p50, p99:
the client stamps both on arrival, so the figure includes this client's own load), and memory per watcher
(B's RSS with the watchers open, less before, over the count). Target: 100 watchers cost A under 2x the CPU per
frame of 0 watchers.

    .venv/bin/python bench/watchers.py [--counts 0 1 10 100 1000] [--deltas 300]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import json
import subprocess
import time

from common import (
    PG_URL,
    PYTHON,
    ROOT,
    Redis,
    cpu_seconds,
    daphne_env,
    pct,
    prepare_database,
    raise_nofile,
    rss_kib,
    start_daphne,
    start_model,
    write_result,
)


def make_key(model) -> str:
    env = daphne_env(model)
    out = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", f"bench-watchers-{time.time_ns()}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


async def one_count(holder_url: str, watcher_url: str, key: str, count: int, pids: tuple[int, int]) -> dict:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {key}"}
    holder = await connect(holder_url, additional_headers=headers, compression=None, max_queue=None)
    await holder.send(json.dumps({"action": "chatbot_session_start"}))
    session_id = json.loads(await holder.recv())["data"]["session_id"]
    await asyncio.sleep(0.5)
    rss_before = rss_kib(pids[1])

    async def open_watcher():
        ws = await connect(
            watcher_url, additional_headers=headers, compression=None, max_queue=None, ping_interval=None
        )
        await ws.send(json.dumps({"action": "chatbot_session_watch", "session_id": session_id}))
        assert json.loads(await ws.recv())["type"] == "session_watching"
        return ws

    gate = asyncio.Semaphore(100)

    async def gated():
        async with gate:
            return await open_watcher()

    watchers = await asyncio.gather(*(gated() for _ in range(count)))
    await asyncio.sleep(1.0)
    rss_after = rss_kib(pids[1])

    arrivals: dict[int, float] = {}  # the holder's socket: the n-th delta's arrival
    delays: list[float] = []

    async def read_holder() -> int:
        n = 0
        while True:
            frame = json.loads(await holder.recv())
            if frame["type"] == "message_delta":
                n += 1
                arrivals[n] = time.perf_counter()
            if frame["type"] == "processing_end":
                return n

    async def read_watcher(ws) -> None:
        n = 0
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "message_delta":
                n += 1
                now = time.perf_counter()
                seen = arrivals.get(n)
                if seen is not None:
                    delays.append(now - seen)
            if frame["type"] == "processing_end":
                return

    cpu_a, cpu_b = cpu_seconds(pids[0]), cpu_seconds(pids[1])
    await holder.send(
        json.dumps({"action": "chatbot_post_message", "session_id": session_id, "user_message": "go", "stream": True})
    )
    frames, *_ = await asyncio.gather(read_holder(), *(read_watcher(ws) for ws in watchers))
    cpu_a, cpu_b = cpu_seconds(pids[0]) - cpu_a, cpu_seconds(pids[1]) - cpu_b
    frames += 3  # processing_start, message, processing_end
    for ws in [*watchers, holder]:
        await ws.close()
    await asyncio.sleep(1.0)
    return {
        "watchers": count,
        "frames": frames,
        "holder_process_cpu_us_per_frame": round(cpu_a / frames * 1e6, 1),
        "watcher_process_cpu_us_per_frame": round(cpu_b / frames * 1e6, 1),
        "delay_ms_p50": round(pct(delays, 50) * 1000, 2) if delays else None,
        "delay_ms_p99": round(pct(delays, 99) * 1000, 2) if delays else None,
        "memory_kib_per_watcher": round((rss_after - rss_before) / count, 1) if count else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="*", default=[0, 1, 10, 100, 1000])
    parser.add_argument("--deltas", type=int, default=300, help="deltas in the streamed reply")
    args = parser.parse_args()
    raise_nofile()
    redis = Redis()
    redis.start()
    prepare_database()
    model = start_model(token_delay=0.01, text=" ".join(f"w{i}" for i in range(args.deltas)))
    a = start_daphne(model, name="daphne-a", R2D2_MAX_CONNECTIONS_PER_PRINCIPAL="0")
    b = start_daphne(model, name="daphne-b", R2D2_MAX_CONNECTIONS_PER_PRINCIPAL="0", R2D2_MAX_WATCHES_PER_SOCKET="16")
    try:
        key = make_key(model)
        rows = []
        for count in args.counts:
            row = asyncio.run(one_count(a.url, b.url, key, count, (a.pid, b.pid)))
            print(json.dumps(row))
            rows.append(row)
        base = next((r for r in rows if r["watchers"] == 0), None)
        hundred = next((r for r in rows if r["watchers"] == 100), None)
        ratio = None
        if base and hundred and base["holder_process_cpu_us_per_frame"]:
            ratio = round(hundred["holder_process_cpu_us_per_frame"] / base["holder_process_cpu_us_per_frame"], 2)
            print(f"holder's CPU per frame, 100 watchers / 0 watchers = {ratio} (target < 2)")
        write_result("watchers", {"database": PG_URL, "rows": rows, "holder_cpu_ratio_100_to_0": ratio})
    finally:
        for process in (a, b, model):
            process.stop()
        redis.stop()


if __name__ == "__main__":
    main()
