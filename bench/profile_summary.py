"""Summarise a py-spy raw (collapsed) profile of the Daphne process into cost buckets.

Each sample is charged to the innermost frame that belongs to a known library
(so the openai client's own work is "openai client", not "asyncio"); samples
whose innermost frame is a wait (epoll, psycopg waiting for the server) are idle.

    .venv/bin/python bench/profile_summary.py [bench/results/throughput-profile.txt]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

IDLE = ("EpollSelector.select", "Connection.wait (psycopg", "_worker (concurrent/futures/thread.py", "Condition.wait")
BUCKETS = [
    ("Django ORM + psycopg (INSERT/UPDATE per turn)", ("django/", "psycopg")),
    ("openai client (request build, response parse)", ("openai/",)),
    ("aiohttp (HTTP to the model)", ("aiohttp/",)),
    ("Daphne/Twisted/autobahn (WebSocket frames)", ("twisted/", "autobahn/", "daphne/", "txaio/")),
    ("asgiref (sync_to_async thread hops, Local)", ("asgiref/",)),
    ("channels + channels-redis + redis-py", ("channels/", "channels_redis", "redis/")),
    ("chat/ (R2D2's own code)", ("chat/",)),
    ("json", ("json/",)),
    ("asyncio event loop", ("asyncio/",)),
]


def summarise(path: Path) -> dict:
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        if any(key in frames[-1] for key in IDLE):
            counts["idle (waiting on sockets, the database)"] += n
            continue
        for frame in reversed(frames):
            bucket = next((name for name, keys in BUCKETS if any(k in frame for k in keys)), None)
            if bucket:
                counts[bucket] += n
                break
        else:
            counts["other"] += n
    idle = "idle (waiting on sockets, the database)"
    busy = total - counts[idle]
    return {
        "samples": total,
        "buckets": [
            {
                "cost": name,
                "pct_of_samples": round(100 * n / total, 1),
                "pct_of_busy": None if name == idle else round(100 * n / busy, 1),
            }
            for name, n in counts.most_common()
        ],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "profile",
        nargs="?",
        type=Path,
        default=Path("bench/results/throughput-profile.txt"),
        help="py-spy raw profile (default: the one bench/throughput.py --profile wrote)",
    )
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args()
    if not args.profile.exists():
        parser.exit(1, f"{args.profile}: no such profile; run bench/throughput.py --profile first\n")
    summary = summarise(args.profile)
    for row in summary["buckets"]:
        busy = f"{row['pct_of_busy']:5.1f}% of busy" if row["pct_of_busy"] is not None else " " * 16
        print(f"{row['pct_of_samples']:5.1f}% of samples  {busy}  {row['cost']}")
    if args.json:
        print(json.dumps(summary, indent=1))
