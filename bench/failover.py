"""Failover: the primary upstream killed in the middle of a run and brought back.

200 sessions (streamed turns, about THINK seconds apart, each posted with `report_model`) on
two Daphne processes sharing PostgreSQL and Redis, with the chain
gpt-3.5-turbo -> alt/gpt-3.5-turbo: the primary and the alternate are two model server
processes (testkit/fake_llm.py, first token after 200 ms). The primary is SIGKILLed after
BEFORE seconds and started again on its port DURING seconds later; the run goes on AFTER
seconds more. Reported: turns failed (and of those, the ones an alternate could have answered:
any but a reply cut after its text began, which no chain may answer again), p50/p99 time to
first token before, during and after, which model answered in each phase, and how long after
the primary came back the breaker let turns reach it again (the first turn it answered).

    .venv/bin/python bench/failover.py [--sessions 200] [--before 15] [--during 20] [--after 45]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass

from common import (
    PYTHON,
    Redis,
    free_port,
    pct,
    prepare_database,
    raise_nofile,
    spawn,
    start_daphne,
    start_model,
    write_result,
)

MODEL_TIME = 0.2
THINK = 2.0
PRIMARY = "gpt-3.5-turbo"
ALTERNATE = "alt/gpt-3.5-turbo"


@dataclass
class Turn:
    sent: float
    first_token: float | None = None
    model: str | None = None
    error: str | None = None


def model_server(port: int, name: str):
    command = [PYTHON, "-m", "testkit.fake_llm", "--port", "{port}", "--ttft", str(MODEL_TIME)]
    return spawn(name, command, port=port)


async def session(url: str, stop_at: float, turns: list[Turn]) -> str | None:
    from websockets.asyncio.client import connect

    try:
        async with connect(url, compression=None, ping_interval=None, open_timeout=60, max_queue=None) as ws:
            await ws.send('{"action": "chatbot_session_start"}')
            session_id = json.loads(await ws.recv())["data"]["session_id"]
            await asyncio.sleep(random.random() * THINK)
            index = 0
            while time.perf_counter() < stop_at:
                turn = Turn(sent=time.perf_counter())
                turns.append(turn)
                message = {
                    "action": "chatbot_post_message",
                    "session_id": session_id,
                    "user_message": f"Hello R2D2, turn {index}",
                    "stream": True,
                    "report_model": True,
                }
                await ws.send(json.dumps(message))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    if frame["type"] == "message_delta" and turn.first_token is None:
                        turn.first_token = time.perf_counter() - turn.sent
                    elif frame["type"] == "error":
                        turn.error = frame["data"]["code"]
                    elif frame["type"] == "processing_end":
                        turn.model = frame["data"]["model"]
                        break
                index += 1
                await asyncio.sleep(THINK * (0.5 + random.random()))
    except Exception as exc:
        return repr(exc)
    return None


def phase(turns: list[Turn]) -> dict:
    ttft = [t.first_token for t in turns if t.first_token is not None and t.error is None]
    served: dict[str, int] = {}
    for t in turns:
        served[t.model or "none"] = served.get(t.model or "none", 0) + 1
    failed = [t.error for t in turns if t.error]
    return {
        "turns": len(turns),
        "failed": len(failed),
        "failed_an_alternate_could_have_answered": sum(1 for e in failed if e != "upstream_stream_interrupted"),
        "errors": {e: failed.count(e) for e in set(failed)},
        "served_by": served,
        "ttft_ms": {
            "p50": round(pct(ttft, 50) * 1000, 1) if ttft else None,
            "p99": round(pct(ttft, 99) * 1000, 1) if ttft else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--before", type=float, default=15.0)
    parser.add_argument("--during", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=45.0)
    args = parser.parse_args()
    raise_nofile()
    redis = Redis().start()
    prepare_database()
    port = free_port()
    primary = model_server(port, "model-primary")
    alternate = start_model(ttft=MODEL_TIME)
    chain = {
        "R2D2_UPSTREAMS": f"alt=http://127.0.0.1:{alternate.port}/v1",
        "R2D2_FALLBACKS": f"{PRIMARY}={ALTERNATE}",
        "R2D2_LOG_LEVEL": "ERROR",
    }
    servers = [start_daphne(primary, name=f"daphne-{n}", **chain) for n in range(2)]
    turns: list[Turn] = []
    events: dict[str, float] = {}

    async def run() -> list[str | None]:
        nonlocal primary
        start = time.perf_counter()
        stop_at = start + args.before + args.during + args.after
        tasks = [
            asyncio.create_task(session(servers[n % 2].url, stop_at, turns)) for n in range(args.sessions)
        ]
        await asyncio.sleep(args.before)
        primary.kill()
        events["killed"] = time.perf_counter()
        await asyncio.sleep(args.during)
        primary = await asyncio.to_thread(model_server, port, "model-primary")
        events["back"] = time.perf_counter()
        return await asyncio.gather(*tasks)

    try:
        failures = asyncio.run(run())
    finally:
        for server in servers:
            server.stop()
        primary.stop()
        alternate.stop()
        redis.stop()

    before = [t for t in turns if t.sent < events["killed"]]
    during = [t for t in turns if events["killed"] <= t.sent < events["back"]]
    after = [t for t in turns if t.sent >= events["back"]]
    back_on_primary = [t.sent for t in after if t.model == PRIMARY]
    closed_after = round(min(back_on_primary) - events["back"], 1) if back_on_primary else None
    result = {
        "sessions": args.sessions,
        "processes": len(servers),
        "model_first_token_s": MODEL_TIME,
        "think_s": THINK,
        "phases_s": {"before": args.before, "during": args.during, "after": args.after},
        "circuit": {"failures": 5, "window_s": 60, "cooldown_s": 30},
        "session_failures": [f for f in failures if f][:5],
        "before": phase(before),
        "during": phase(during),
        "after": phase(after),
        "breaker_closed_s_after_primary_back": closed_after,
    }
    for name in ("before", "during", "after"):
        p = result[name]
        print(
            f"{name:>6}: {p['turns']} turns, {p['failed']} failed ({p['failed_an_alternate_could_have_answered']} "
            f"an alternate could have answered), ttft p50 {p['ttft_ms']['p50']} ms p99 {p['ttft_ms']['p99']} ms, "
            f"served by {p['served_by']}",
            flush=True,
        )
    print(f"breaker closed {closed_after} s after the primary came back")
    write_result("failover", result)


if __name__ == "__main__":
    main()
