"""Memory per idle connection: RSS of one Daphne process from 0 to 10,000 open sockets, each with a live session.

Sockets are opened in steps; after each step the server's resident set
(VmRSS from /proc) is read once it has settled. Per connection = the slope of
a least-squares line through (connections, RSS), and also (RSS at the top -
RSS at 0) / connections. Then every socket closes and the RSS is read again, to
see what returns.

    .venv/bin/python bench/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from common import Redis, db_query, prepare_database, raise_nofile, rss_kib, start_daphne, start_model, write_result
from websockets.asyncio.client import connect


def settle(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


async def open_sockets(url: str, count: int, concurrency: int = 100) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            ws = await connect(url, compression=None, ping_interval=None, open_timeout=120, max_queue=4)
            await ws.send('{"action": "chatbot_session_start"}')
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            assert frame["type"] == "session_start", frame
            return ws

    return await asyncio.gather(*(one() for _ in range(count)))


def slope(points: list[tuple[int, int]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 2,000 connections")
    parser.add_argument("--max", type=int, default=None)
    args = parser.parse_args()
    raise_nofile()
    top = args.max or (2000 if args.quick else 10000)
    step = max(100, top // 10)
    redis = Redis().start()
    prepare_database()
    model = start_model()
    daphne = start_daphne(model, R2D2_MAX_SESSIONS_PER_CONNECTION="8")
    points: list[tuple[int, int]] = []
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sockets: list = []
    try:
        # One warm-up connection so imports, pools and the channel layer are counted in the baseline.
        sockets += loop.run_until_complete(open_sockets(daphne.url, 1))
        loop.run_until_complete(sockets.pop().close())
        points.append((0, settle(daphne.pid)))
        print(f"{0:>6} connections: RSS {points[-1][1] / 1024:.1f} MiB", flush=True)
        while len(sockets) < top:
            started = time.monotonic()
            sockets += loop.run_until_complete(open_sockets(daphne.url, step))
            points.append((len(sockets), settle(daphne.pid)))
            print(
                f"{len(sockets):>6} connections: RSS {points[-1][1] / 1024:.1f} MiB "
                f"(+{step} in {time.monotonic() - started:.1f}s)",
                flush=True,
            )
        live = db_query("SELECT count(*) FROM chat_chatsession WHERE ended_at IS NULL")[0][0]

        async def close_all(batch: list) -> None:
            await asyncio.gather(*(ws.close() for ws in batch))

        loop.run_until_complete(close_all(sockets))
        sockets.clear()
        closed_at = time.monotonic()
        ended = 0
        while time.monotonic() - closed_at < 180:
            ended = db_query("SELECT count(*) FROM chat_chatsession WHERE end_reason = 'disconnect'")[0][0]
            if ended >= live:
                break
            time.sleep(1)
        drain_s = time.monotonic() - closed_at
        after_close = settle(daphne.pid, 3.0)
    finally:
        for ws in sockets:
            loop.run_until_complete(ws.close())
        loop.close()
        daphne.stop()
        model.stop()
        redis.stop()
    per_conn_slope = slope(points) * 1024  # bytes per connection
    per_conn_total = (points[-1][1] - points[0][1]) * 1024 / points[-1][0]
    print(
        f"per idle connection with a session: {per_conn_slope / 1024:.1f} KiB (slope), "
        f"{per_conn_total / 1024:.1f} KiB ((RSS at {points[-1][0]} - RSS at 0) / n); target <= 40 KiB (issue 13)"
    )
    print(
        f"after all {points[-1][0]} sockets closed: RSS {after_close / 1024:.1f} MiB "
        f"(start {points[0][1] / 1024:.1f}, peak {points[-1][1] / 1024:.1f}); sessions live at peak {live}, "
        f"ended as disconnect {ended} within {drain_s:.1f} s"
    )
    write_result(
        "memory",
        {
            "points": [{"connections": c, "rss_kib": r} for c, r in points],
            "per_connection_kib_slope": round(per_conn_slope / 1024, 2),
            "per_connection_kib_total": round(per_conn_total / 1024, 2),
            "rss_after_close_kib": after_close,
            "live_sessions_at_peak": live,
            "sessions_ended_disconnect": ended,
            "seconds_until_all_ended": round(drain_s, 1),
            "target_le_40_kib": per_conn_slope / 1024 <= 40,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
