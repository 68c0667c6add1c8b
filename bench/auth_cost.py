"""The cost of authentication and quotas per turn: the same load with and without an API key.

One Daphne (PostgreSQL, Redis), the model answering at once, N sockets x T turns.
Run 1: R2D2_REQUIRE_AUTH=0, anonymous. Run 2: R2D2_REQUIRE_AUTH=1, every socket
with one API key whose quotas are on (so each message runs the Redis quota script
and each turn charges tokens) but too high to refuse anything. Prints turns/s and
server CPU per turn for both, and their ratio.

    .venv/bin/python bench/auth_cost.py [--sessions 100] [--turns 10]
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
    PYTHON,
    ROOT,
    Redis,
    cpu_seconds,
    daphne_env,
    prepare_database,
    start_daphne,
    start_model,
    truncate,
    write_result,
)

HIGH = "1000000000"  # quotas on, never reached


async def load(url: str, sessions: int, turns: int, key: str | None) -> tuple[int, float]:
    """Answered turns and wall seconds of the turn phase (sockets are opened before the clock starts)."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {key}"} if key else None
    sockets = [await connect(url, additional_headers=headers) for _ in range(sessions)]
    ids = []
    for ws in sockets:
        await ws.send(json.dumps({"action": "chatbot_session_start"}))
        ids.append(json.loads(await ws.recv())["data"]["session_id"])

    async def converse(ws, session_id: str) -> int:
        answered = 0
        for n in range(turns):
            await ws.send(
                json.dumps({"action": "chatbot_post_message", "session_id": session_id, "user_message": f"hi {n}"})
            )
            while (frame := json.loads(await ws.recv()))["type"] != "processing_end":
                answered += frame["type"] == "message"
        return answered

    t0 = time.perf_counter()
    answered = sum(await asyncio.gather(*(converse(ws, s) for ws, s in zip(sockets, ids, strict=True))))
    seconds = time.perf_counter() - t0
    for ws in sockets:
        await ws.close()
    return answered, seconds


def run(model, sessions: int, turns: int, *, auth: bool) -> dict:
    env = {"R2D2_REQUIRE_AUTH": "1" if auth else "0"}
    key = None
    if auth:
        made = subprocess.run(
            [PYTHON, "manage.py", "create_api_key", f"bench-{time.time_ns()}"]
            + ["--messages-per-minute", HIGH, "--tokens-per-day", HIGH, "--max-sessions", HIGH],
            cwd=ROOT,
            env=daphne_env(model),
            capture_output=True,
            text=True,
            check=True,
        )
        key = made.stdout.strip().splitlines()[-1]
    server = start_daphne(model, name="daphne-auth" if auth else "daphne-anon", **env)
    try:
        asyncio.run(load(server.url, 5, 2, key))  # warm up: imports, pools, first queries
        cpu0 = cpu_seconds(server.pid)
        answered, seconds = asyncio.run(load(server.url, sessions, turns, key))
        cpu = cpu_seconds(server.pid) - cpu0
    finally:
        server.stop()
    return {
        "auth": auth,
        "turns": answered,
        "expected": sessions * turns,
        "turns_per_s": round(answered / seconds, 1),
        "cpu_ms_per_turn": round(cpu * 1000 / max(1, answered), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    redis = Redis().start()
    prepare_database()
    model = start_model()
    try:
        truncate()
        anonymous = run(model, args.sessions, args.turns, auth=False)
        truncate()
        keyed = run(model, args.sessions, args.turns, auth=True)
    finally:
        model.stop()
        redis.stop()
    result = {
        "anonymous": anonymous,
        "api_key_and_quotas": keyed,
        "throughput_ratio": round(keyed["turns_per_s"] / anonymous["turns_per_s"], 3),
        "cpu_per_turn_ratio": round(keyed["cpu_ms_per_turn"] / anonymous["cpu_ms_per_turn"], 3),
    }
    for name in ("anonymous", "api_key_and_quotas"):
        r = result[name]
        print(
            f"{name:20} {r['turns']}/{r['expected']} turns  {r['turns_per_s']:7.1f} turns/s  "
            f"{r['cpu_ms_per_turn']:.2f} ms CPU/turn"
        )
    print(
        f"with auth / without: throughput x{result['throughput_ratio']}, CPU per turn x{result['cpu_per_turn_ratio']}"
    )
    write_result("auth_cost", result)


if __name__ == "__main__":
    main()
