"""Added latency: what R2D2 adds to a turn, against a direct AsyncOpenAI call to the same model server.

For each concurrency (1, 100, 1,000 sessions) the same streamed turns are made
twice against one model server process: straight through the `openai` client
(the baseline) and through R2D2 (Daphne + PostgreSQL + Redis). Per turn the
client records `processing_start`, the first `message_delta` and the final
`message`; the baseline's events are the call (0), its first content chunk and
the end of its stream. Added = R2D2 percentile - baseline percentile.

    .venv/bin/python bench/latency.py [--quick]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import time

from common import (
    Redis,
    cpu_seconds,
    model_url,
    prepare_database,
    raise_nofile,
    run_direct,
    run_sessions,
    start_daphne,
    start_model,
    summary_ms,
    turn_latencies,
    write_result,
)

EVENTS = ("processing_start", "first_delta", "message")
TTFT, TOKEN_DELAY = 0.05, 0.002


def added(r2d2: dict, direct: dict) -> dict:
    out = {}
    for event in EVENTS:
        a, b = r2d2[event], direct[event]
        out[event] = {
            q: (round(a[q] - b[q], 3) if a[q] is not None and b[q] is not None else None) for q in ("p50", "p99")
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns, skip 1,000 sessions")
    parser.add_argument("--ttft", type=float, default=TTFT, help="model's first-token delay (s)")
    parser.add_argument("--token-delay", type=float, default=TOKEN_DELAY, help="model's delay between tokens (s)")
    parser.add_argument("--turns", type=int, nargs=3, metavar=("AT1", "AT100", "AT1000"), help="turns per session")
    parser.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="seconds each session waits between turns (default 0: back to back, which saturates one process "
        "at 100 sessions, so the added latency is mostly queueing)",
    )
    parser.add_argument("--name", default="latency", help="result file name (bench/results/NAME.json)")
    args = parser.parse_args()
    raise_nofile()
    plan = [(1, 50), (100, 3)] if args.quick else [(1, 200), (100, 6), (1000, 2)]
    if args.turns:
        plan = [(sessions, turns) for sessions, turns in zip((1, 100, 1000), args.turns, strict=True) if turns]
    redis = Redis().start()
    prepare_database()
    model = start_model(ttft=args.ttft, token_delay=args.token_delay, stamp=True)
    daphne = start_daphne(model)
    levels = []
    try:
        asyncio.run(run_sessions(daphne.url, 20, 2))  # warm up: pool connections, imports
        asyncio.run(run_direct(model_url(model), 20, 2))
        for sessions, turns in plan:
            # Sessions start at random moments within one turn's time, as real users do,
            # instead of all sending their first message in the same millisecond.
            jitter = max(args.ttft + 20 * args.token_delay, args.think) if sessions > 1 else 0.0
            paced = {"jitter": jitter, "think": args.think}
            direct, d0, d1 = asyncio.run(run_direct(model_url(model), sessions, turns, **paced))
            cpu0 = cpu_seconds(daphne.pid)
            states, r0, r1 = asyncio.run(run_sessions(daphne.url, sessions, turns, **paced))
            cpu = cpu_seconds(daphne.pid) - cpu0
            all_turns = [t for s in states for t in s.turns]
            failed = [s.failure for s in states if s.failure] + [t.errors for t in all_turns if not t.ok]
            r2d2_ms = {e: summary_ms(v) for e, v in turn_latencies(states).items()}
            direct_ms = {e: summary_ms(v) for e, v in direct["latencies"].items()}
            lags = [t.stamp_lag for t in all_turns if t.stamp_lag is not None]
            level = {
                "sessions": sessions,
                "turns_per_session": turns,
                "think_s": args.think,
                "turns": len(all_turns),
                "failed": len(failed),
                "r2d2_ms": r2d2_ms,
                "direct_ms": direct_ms,
                "added_ms": added(r2d2_ms, direct_ms),
                "r2d2_turns_per_s": round(len(all_turns) / (r1 - r0), 1),
                "direct_turns_per_s": round(sessions * turns / (d1 - d0), 1),
                "daphne_cpu_ms_per_turn": round(cpu * 1000 / max(1, len(all_turns)), 3),
                "first_token_to_first_delta_ms": summary_ms(lags),
                "first_token_to_first_chunk_direct_ms": summary_ms(direct["stamp_lags"]),
            }
            levels.append(level)
            a = level["added_ms"]
            print(
                f"{sessions:>5} sessions x {turns}: added p50/p99 ms  processing_start {a['processing_start']['p50']}/"
                f"{a['processing_start']['p99']}  first_delta {a['first_delta']['p50']}/{a['first_delta']['p99']}  "
                f"message {a['message']['p50']}/{a['message']['p99']}  (failed {len(failed)}; "
                f"R2D2 {level['r2d2_turns_per_s']} turns/s vs direct {level['direct_turns_per_s']}; "
                f"daphne CPU {level['daphne_cpu_ms_per_turn']} ms/turn)",
                flush=True,
            )
            time.sleep(1)
    finally:
        daphne.stop()
        model.stop()
        redis.stop()
    at100 = next((lv for lv in levels if lv["sessions"] == 100), None)
    target = None
    if at100:
        worst = at100["added_ms"]
        target = {
            "p50_added_le_2ms": all(worst[e]["p50"] is not None and worst[e]["p50"] <= 2 for e in EVENTS),
            "p99_added_le_10ms": all(worst[e]["p99"] is not None and worst[e]["p99"] <= 10 for e in EVENTS),
        }
    write_result(
        args.name,
        {
            "model_server": {"ttft_s": args.ttft, "token_delay_s": args.token_delay, "stream": True},
            "levels": levels,
            "target_at_100_sessions": target,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
