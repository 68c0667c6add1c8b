"""Throughput: 5-turn conversations, 1,000 concurrent sessions, model answering in 200 ms.

R2D2 (one Daphne process, PostgreSQL, Redis) against the bare relay
(bench/relay.py: `websockets` + the same `openai` client, no Django, no
database), both talking to one model server process. Every socket is open
before the clock starts; turns/s = answered turns / wall time of the turn phase.
With --profile, py-spy samples the Daphne process during its run and the
top functions (by own time and by total time) are written to the result.
With --chain, a second Daphne process whose model has a fallback chain (R2D2_FALLBACKS, to
an `alt` upstream on the same model server, all healthy) runs each level after the first,
and the result says how it compares with the one without (bench/results/throughput-chain-*.json).

    .venv/bin/python bench/throughput.py [--quick] [--profile] [--chain]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import collections
import shutil
import subprocess
import time

from common import (
    LOGS,
    RESULTS,
    Redis,
    cpu_seconds,
    db_query,
    model_url,
    prepare_database,
    raise_nofile,
    run_sessions,
    start_daphne,
    start_model,
    start_relay,
    summary_ms,
    truncate,
    turn_latencies,
    write_result,
)
from profile_summary import summarise

MODEL_TIME = 0.2
TURNS = 5


def run(url: str, pid: int, sessions: int, stream: bool) -> dict:
    cpu0 = cpu_seconds(pid)
    states, t0, t1 = asyncio.run(run_sessions(url, sessions, TURNS, stream=stream, connect_concurrency=100))
    cpu = cpu_seconds(pid) - cpu0
    turns = [t for s in states for t in s.turns]
    answered = sum(1 for t in turns if t.ok)
    return {
        "sessions": sessions,
        "turns_expected": sessions * TURNS,
        "turns_answered": answered,
        "session_failures": [s.failure for s in states if s.failure][:5],
        "seconds": round(t1 - t0, 3),
        "turns_per_s": round(answered / (t1 - t0), 1),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_ms_per_turn": round(cpu * 1000 / max(1, answered), 3),
        "latency_ms": {e: summary_ms(v) for e, v in turn_latencies(states).items()},
    }


def collapse(path, top: int = 15) -> dict:
    """Top frames of a py-spy --format raw (collapsed stacks) file: own and total samples."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    with open(path) as lines:
        rows = lines.read().splitlines()
    for line in rows:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    fmt = lambda c: [{"frame": f, "pct": round(100 * n / samples, 1)} for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": samples, "own": fmt(own), "total": fmt(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 sessions instead of 1,000")
    parser.add_argument("--sessions", type=int, nargs="*", help="concurrency levels (default 10 100 1000)")
    parser.add_argument("--stream", action="store_true", help="streamed turns (default: the seed's one message)")
    parser.add_argument("--profile", action="store_true", help="py-spy the Daphne process at the top level")
    parser.add_argument("--chain", action="store_true", help="also a Daphne whose model has a fallback chain")
    args = parser.parse_args()
    raise_nofile()
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if args.profile and not py_spy:
        # Said before anything starts, not discovered at the end as a missing profile.
        sys.exit("--profile needs py-spy: .venv/bin/pip install -r requirements-dev.txt (it pins py-spy)")
    levels = args.sessions or ([10, 100, 300] if args.quick else [10, 100, 1000])
    redis = Redis().start()
    prepare_database()
    model = start_model(ttft=MODEL_TIME)
    relay = start_relay(model)
    daphne = start_daphne(model, R2D2_DB_POOL_MAX="20")
    chained = None
    if args.chain:
        chain = {"R2D2_UPSTREAMS": f"alt={model_url(model)}", "R2D2_FALLBACKS": "gpt-3.5-turbo=alt/gpt-3.5-turbo"}
        chained = start_daphne(model, name="daphne-chain", R2D2_DB_POOL_MAX="20", **chain)
    results = []
    profile = None
    try:
        asyncio.run(run_sessions(daphne.url, 20, 2))
        asyncio.run(run_sessions(relay.url, 20, 2))
        if chained is not None:
            asyncio.run(run_sessions(chained.url, 20, 2))
        for sessions in levels:
            bare = run(relay.url, relay.pid, sessions, args.stream)
            truncate()
            spy = None
            if args.profile and sessions == max(levels):
                raw = LOGS / "throughput.pyspy.txt"
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(daphne.pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--output",
                        str(raw),
                        "--nonblocking",
                        # Only the thread holding the GIL: CPU spent in Python, not a
                        # database thread blocked on its socket or waiting for the GIL.
                        "--gil",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            before = None
            if chained is not None:  # the chained server runs before and after the plain one: the order counts
                before = run(chained.url, chained.pid, sessions, args.stream)
                truncate()
            r2d2 = run(daphne.url, daphne.pid, sessions, args.stream)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
                profile = collapse(raw)
                profile["buckets"] = summarise(raw)["buckets"]
                shutil.copy(raw, RESULTS / "throughput-profile.txt")
            rows = db_query("SELECT role, count(*) FROM chat_chatmessage GROUP BY role")
            r2d2["db_rows"] = dict(rows)
            ratio = round(r2d2["turns_per_s"] / bare["turns_per_s"], 3) if bare["turns_per_s"] else None
            results.append({"sessions": sessions, "r2d2": r2d2, "bare_relay": bare, "ratio": ratio})
            if chained is not None:
                truncate()
                after = run(chained.url, chained.pid, sessions, args.stream)
                rate = (before["turns_per_s"] + after["turns_per_s"]) / 2
                cpu = (before["server_cpu_ms_per_turn"] + after["server_cpu_ms_per_turn"]) / 2
                results[-1]["r2d2_with_chain"] = [before, after]
                results[-1]["chain_vs_none"] = round(rate / r2d2["turns_per_s"], 3)
                results[-1]["chain_cpu_vs_none"] = round(cpu / r2d2["server_cpu_ms_per_turn"], 3)
                results[-1]["chain_ratio"] = round(rate / bare["turns_per_s"], 3)
                print(
                    f"{sessions:>5} sessions with a chain (before, after): {before['turns_per_s']}, "
                    f"{after['turns_per_s']} turns/s ({before['server_cpu_ms_per_turn']}, "
                    f"{after['server_cpu_ms_per_turn']} ms CPU/turn)  vs none {results[-1]['chain_vs_none']} "
                    f"(CPU {results[-1]['chain_cpu_vs_none']})  ratio to the relay {results[-1]['chain_ratio']}",
                    flush=True,
                )
            print(
                f"{sessions:>5} sessions x {TURNS} turns: R2D2 {r2d2['turns_per_s']} turns/s "
                f"({r2d2['turns_answered']}/{r2d2['turns_expected']} answered, "
                f"{r2d2['server_cpu_ms_per_turn']} ms CPU/turn)"
                f"  bare relay {bare['turns_per_s']} turns/s ({bare['turns_answered']}/{bare['turns_expected']}, "
                f"{bare['server_cpu_ms_per_turn']} ms CPU/turn)  ratio {ratio}",
                flush=True,
            )
            truncate()
    finally:
        daphne.stop()
        if chained is not None:
            chained.stop()
        relay.stop()
        model.stop()
        redis.stop()
    if profile:
        print("profile of the Daphne process (py-spy), by cost:")
        for row in profile["buckets"]:
            print(f"  {row['pct_of_samples']:5.1f}%  {row['cost']}")
    top = results[-1]
    write_result(
        ("throughput-chain-stream" if args.stream else "throughput-chain-plain") if args.chain else "throughput",
        {
            "model_server": {"ttft_s": MODEL_TIME, "stream": args.stream},
            "turns_per_session": TURNS,
            "levels": results,
            "target": {"ratio_ge_0.8": bool(top["ratio"] and top["ratio"] >= 0.8), "sessions": top["sessions"]},
            "profile": profile,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
