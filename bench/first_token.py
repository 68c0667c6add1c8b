"""Model's first token -> client's first `message_delta` (issue 3), median over >= 200 streamed turns.

The model server (bench/stamp_llm.py, its own process) writes its clock
(CLOCK_MONOTONIC, shared by every process on the machine) into the first token
just before sending it; the client subtracts it from its own clock when the
first `message_delta` arrives. The baseline is the same measurement for a
direct AsyncOpenAI streaming call (first token written -> first chunk parsed).

    .venv/bin/python bench/first_token.py [--turns 250]
"""

from __future__ import annotations

import argparse
import asyncio

from common import (
    Redis,
    model_url,
    prepare_database,
    raise_nofile,
    run_direct,
    run_sessions,
    start_daphne,
    start_model,
    summary_ms,
    write_result,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=250, help="turns per level (at least 200)")
    parser.add_argument("--quick", action="store_true", help="same as the default: this one is already short")
    args = parser.parse_args()
    raise_nofile()
    redis = Redis().start()
    prepare_database()
    model = start_model(ttft=0.02, token_delay=0.002, stamp=True)
    daphne = start_daphne(model)
    levels = []
    try:
        asyncio.run(run_sessions(daphne.url, 5, 2))
        for sessions in (1, 10):
            turns = -(-args.turns // sessions)
            states, _, _ = asyncio.run(run_sessions(daphne.url, sessions, turns, jitter=0.05))
            direct, _, _ = asyncio.run(run_direct(model_url(model), sessions, turns, jitter=0.05))
            lags = [t.stamp_lag for s in states for t in s.turns if t.stamp_lag is not None]
            r2d2 = summary_ms(lags)
            base = summary_ms(direct["stamp_lags"])
            levels.append({"sessions": sessions, "r2d2_ms": r2d2, "direct_ms": base})
            print(
                f"{sessions:>3} sessions, {r2d2['n']} turns: model first token -> first message_delta "
                f"median {r2d2['p50']} ms (p99 {r2d2['p99']}); direct AsyncOpenAI first chunk median "
                f"{base['p50']} ms (p99 {base['p99']})",
                flush=True,
            )
    finally:
        daphne.stop()
        model.stop()
        redis.stop()
    write_result("first_token", {"levels": levels, "model_server": {"ttft_s": 0.02, "token_delay_s": 0.002}})


if __name__ == "__main__":
    main()
