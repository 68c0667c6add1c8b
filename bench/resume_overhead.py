"""Resumable sessions' cost: turns/s with and without `"resumable": true`, in one run, one Daphne.

Each resumable frame gets a seq, is kept in memory and (with REDIS_URL) appended to a Redis Stream.
Target: within 10% of the plain sessions. Uses the embedded defaults unless DATABASE_URL/REDIS_URL are set.

    .venv/bin/python bench/resume_overhead.py [--sessions 100] [--turns 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.fake_llm import FakeLLM, Script  # noqa: E402
from testkit.server import free_port, wait_for_port  # noqa: E402


async def run(url: str, sessions: int, turns: int, resumable: bool) -> float:
    import websockets

    async def one() -> int:
        async with websockets.connect(url, compression=None, max_queue=None) as ws:
            await ws.send(json.dumps({"action": "chatbot_session_start", "resumable": resumable}))
            session_id = json.loads(await ws.recv())["data"]["session_id"]
            for n in range(turns):
                await ws.send(
                    json.dumps(
                        {
                            "action": "chatbot_post_message",
                            "session_id": session_id,
                            "user_message": f"turn {n}",
                            "stream": True,
                        }
                    )
                )
                while json.loads(await ws.recv())["type"] != "processing_end":
                    pass
            return turns

    started = time.perf_counter()
    done = sum(await asyncio.gather(*(one() for _ in range(sessions))))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = FakeLLM(defaults=Script(text="one two three four five six seven eight", ttft=0.05), record=False).start()
    db = Path(tempfile.mkdtemp()) / "bench.sqlite3"
    env = {
        **os.environ,
        "OPENAI_BASE_URL": model.url,
        "OPENAI_API_KEY": "sk-bench",
        # As in production (debug off: no per-query bookkeeping), anonymous clients.
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "bench-secret-key-not-for-production-0123456789abcdefghijklmnop",
        "R2D2_REQUIRE_AUTH": "0",
        "R2D2_SQLITE_PATH": str(db),
        "R2D2_RATE_LIMIT_PER_MINUTE": "0",
        "R2D2_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "R2D2_LOG_LEVEL": "WARNING",
        "R2D2_WEB_PROCESSES": "1",
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "r2d2site.serve", "daphne", "-p", str(port), "r2d2site.asgi:application"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server)
        url = f"ws://127.0.0.1:{port}/"
        figures: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
            for resumable in (False, True):
                figures[resumable].append(asyncio.run(run(url, args.sessions, args.turns, resumable)))
        plain, resumable = max(figures[False]), max(figures[True])
        print(f"plain     {plain:7.1f} turns/s  (rounds: {', '.join(f'{x:.1f}' for x in figures[False])})")
        print(f"resumable {resumable:7.1f} turns/s  (rounds: {', '.join(f'{x:.1f}' for x in figures[True])})")
        print(f"resumable / plain = {resumable / plain:.2f}  (target >= 0.90)")
    finally:
        server.terminate()
        server.wait(30)
        model.stop()


if __name__ == "__main__":
    main()
