"""The cost of authentication and accounting per turn: the same load with and without an API key.

One Daphne (PostgreSQL, Redis), the model answering at once, N sockets x T turns, in
alternating rounds. Anonymous: R2D2_REQUIRE_AUTH=0. Keyed: R2D2_REQUIRE_AUTH=1, every socket
with one API key whose every limit is on (messages per minute, tokens per day, dollars per
day and per month at R2D2_MODEL_PRICES, sessions, an output cap) but too high to refuse
anything: each message is admitted by the Redis admission script (a reservation in tokens and
dollars) and each turn settled by the settlement script. Prints turns/s and server CPU per turn
for both, their difference (what a key, admission and settlement cost a turn), and, measured
apart in one process against the same Redis, the CPU of one admission + settlement against an
anonymous turn's no-op reservation.

    .venv/bin/python bench/auth_cost.py [--sessions 100] [--turns 10] [--rounds 2]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import json
import statistics
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
HIGH_USD = "99999999"
#: The default model is priced, so the keyed turns count dollars too.
PRICES = "gpt-3.5-turbo=0.50:1.50"


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


def make_key(model) -> str:
    made = subprocess.run(
        [PYTHON, "manage.py", "create_api_key", f"bench-{time.time_ns()}"]
        + ["--messages-per-minute", HIGH, "--tokens-per-day", HIGH, "--max-sessions", HIGH]
        + ["--usd-per-day", HIGH_USD, "--usd-per-month", HIGH_USD, "--max-output-tokens", "256"],
        cwd=ROOT,
        env=daphne_env(model, R2D2_MODEL_PRICES=PRICES),
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


def run(model, sessions: int, turns: int, *, auth: bool) -> dict:
    env = {"R2D2_REQUIRE_AUTH": "1" if auth else "0", "R2D2_MODEL_PRICES": PRICES}
    key = make_key(model) if auth else None
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


def micro(model, pairs: int) -> dict:
    """Admission + settlement alone, in one process against the bench's Redis: CPU per turn (the client's side:
    building the reservation, the script call, reading its answer), keyed and anonymous."""
    result = subprocess.run(
        [PYTHON, "bench/auth_cost.py", "--micro", str(pairs)],
        cwd=ROOT,
        env=daphne_env(model, R2D2_MODEL_PRICES=PRICES),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_micro(pairs: int) -> None:
    """(In its own process, with the server's settings.) Print the figures `micro` returns."""
    import django

    django.setup()
    from chat import llm
    from chat.accounts import counters, principals, reservations
    from chat.protocol import PostMessage

    high = int(HIGH)
    keyed = principals.Principal(
        api_key_id=10**12 + os.getpid(),
        label="bench",
        limits=principals.Limits(high, high, high, (), float(HIGH_USD), float(HIGH_USD), 256),
    )
    post = PostMessage(session_id=None, user_message="hi 3", system_message=None, stream=False)
    history = [("user", "hi 1"), ("assistant", "Echo: hi 1"), ("user", "hi 2"), ("assistant", "Echo: hi 2")]
    request = [{"role": "user", "content": "hi 3"}]

    async def one(principal) -> None:
        reservation = await reservations.admit(
            principal,
            model="gpt-3.5-turbo",
            prompt_tokens_estimate=reservations.estimate_prompt_tokens("", history, post),
            max_output_tokens=principal.limits.max_output_tokens,
            tally=counters.Tally(),
        )
        await reservation.cover(request)
        await reservation.settle(llm.Reply(prompt_tokens=12, completion_tokens=3, sent=True), request, "Echo: hi 3")

    async def measure(principal) -> float:
        for _ in range(200):  # warm up: the client, its pool, the scripts loaded
            await one(principal)
        cpu0 = time.process_time()
        for _ in range(pairs):
            await one(principal)
        return (time.process_time() - cpu0) / pairs * 1e6

    async def both() -> dict:
        return {
            "pairs": pairs,
            "keyed_us_per_turn": round(await measure(keyed), 1),
            "anonymous_us_per_turn": round(await measure(principals.ANONYMOUS), 1),
        }

    print(json.dumps(asyncio.run(both())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternating anonymous/keyed rounds")
    parser.add_argument("--pairs", type=int, default=3000, help="admissions + settlements measured apart")
    parser.add_argument("--micro", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro:
        measure_micro(args.micro)
        return
    redis = Redis().start()
    prepare_database()
    model = start_model()
    rounds = []
    try:
        for _ in range(args.rounds):
            truncate()
            anonymous = run(model, args.sessions, args.turns, auth=False)
            truncate()
            keyed = run(model, args.sessions, args.turns, auth=True)
            rounds.append({"anonymous": anonymous, "api_key_and_accounting": keyed})
        parts = micro(model, args.pairs)
    finally:
        model.stop()
        redis.stop()
    anon_cpu = statistics.fmean(r["anonymous"]["cpu_ms_per_turn"] for r in rounds)
    keyed_cpu = statistics.fmean(r["api_key_and_accounting"]["cpu_ms_per_turn"] for r in rounds)
    anon_tps = statistics.fmean(r["anonymous"]["turns_per_s"] for r in rounds)
    keyed_tps = statistics.fmean(r["api_key_and_accounting"]["turns_per_s"] for r in rounds)
    result = {
        "rounds": rounds,
        "anonymous_cpu_ms_per_turn": round(anon_cpu, 3),
        "keyed_cpu_ms_per_turn": round(keyed_cpu, 3),
        "added_cpu_ms_per_turn": round(keyed_cpu - anon_cpu, 3),
        "throughput_ratio": round(keyed_tps / anon_tps, 3),
        "cpu_per_turn_ratio": round(keyed_cpu / anon_cpu, 3),
        "admission_and_settlement": parts,
    }
    for n, r in enumerate(rounds, 1):
        for name in ("anonymous", "api_key_and_accounting"):
            row = r[name]
            print(
                f"round {n} {name:23} {row['turns']}/{row['expected']} turns  {row['turns_per_s']:7.1f} turns/s  "
                f"{row['cpu_ms_per_turn']:.2f} ms CPU/turn"
            )
    print(
        f"keyed / anonymous (mean of {len(rounds)}): throughput x{result['throughput_ratio']}, CPU per turn "
        f"x{result['cpu_per_turn_ratio']} ({anon_cpu:.2f} -> {keyed_cpu:.2f} ms, +{keyed_cpu - anon_cpu:.2f} ms)"
    )
    print(
        f"admission + settlement alone ({parts['pairs']} turns, one process, Redis): "
        f"{parts['keyed_us_per_turn']} us CPU per keyed turn, {parts['anonymous_us_per_turn']} us anonymous"
    )
    write_result("auth_cost", result)


if __name__ == "__main__":
    main()
