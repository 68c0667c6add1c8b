"""Throughput over N server processes on one instance, behind the bundle's own nginx configuration.

R2D2 as the Elastic Beanstalk bundle runs it (r2d2site/serve.py: R2D2_WEB_PROCESSES
Daphne processes on one port) and the bare relay (N bench/relay.py processes sharing
the port), each behind Debian's nginx with `.platform/nginx` laid out as on Amazon
Linux 2023 (testkit/nginx.py). The runs alternate (R2D2 1, relay 1, R2D2 N,
relay N, then again), so load from other users of the machine falls on all of them.
Server CPU is the whole process tree's (launcher and children), nginx excluded. Each run also
records how busy the machine's cores were and the load client's own CPU per turn: where the
load client, nginx and the model server share the cores, more server processes cannot go faster
once the machine is busy, and these say when that is so.

    .venv/bin/python bench/scaling.py [--processes 1 2] [--sessions 200] [--repeat 2] [--stream]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    PYTHON,
    ROOT,
    Process,
    Redis,
    cpu_seconds,
    daphne_env,
    model_url,
    prepare_database,
    raise_nofile,
    run_sessions,
    spawn,
    start_model,
    truncate,
    write_result,
)

from testkit import nginx

MODEL_TIME = 0.2
TURNS = 5


def tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += tree(int(child))
    return pids


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids if Path(f"/proc/{p}").exists())


def start_r2d2(model: Process, processes: int) -> Process:
    env = daphne_env(model, R2D2_WEB_PROCESSES=str(processes))
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [PYTHON, "-m", "r2d2site.serve", "daphne", "-b", "127.0.0.1", "-p", "{port}"]
    return spawn(f"web-{processes}", [*command, "r2d2site.asgi:application"], env=env)


def start_relays(model: Process, processes: int) -> list[Process]:
    first = spawn(
        "relay-0", [PYTHON, "bench/relay.py", "--reuse-port", "--port", "{port}", "--base-url", model_url(model)]
    )
    rest = [
        spawn(
            f"relay-{i}",
            [PYTHON, "bench/relay.py", "--reuse-port", "--port", "{port}", "--base-url", model_url(model)],
            port=first.port,
        )
        for i in range(1, processes)
    ]
    return [first, *rest]


def behind_nginx(port: int, scratch: Path) -> nginx.Nginx:
    main, proxy_port = nginx.prepare(ROOT, scratch, upstream_port=port)
    return nginx.Nginx(main, proxy_port).start()


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of every core of the machine so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def measure(proxy: nginx.Nginx, pids: list[int], sessions: int, stream: bool) -> dict:
    """Turns/s and the server's CPU per turn; also how busy the whole machine was and what the load
    client (this process) spent per turn, since on a small machine they share the cores."""
    cpu0, client0, (busy0, total0) = tree_cpu(pids), time.process_time(), machine_jiffies()
    url = f"ws://127.0.0.1:{proxy.port}/"
    states, t0, t1 = asyncio.run(run_sessions(url, sessions, TURNS, stream=stream, connect_concurrency=100))
    cpu, client, (busy1, total1) = tree_cpu(pids) - cpu0, time.process_time() - client0, machine_jiffies()
    answered = sum(1 for s in states for t in s.turns if t.ok)
    return {
        "answered": answered,
        "expected": sessions * TURNS,
        "turns_per_s": round(answered / (t1 - t0), 1),
        "cpu_ms_per_turn": round(cpu * 1000 / max(1, answered), 3),
        "load_client_cpu_ms_per_turn": round(client * 1000 / max(1, answered), 3),
        "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    if nginx.NGINX is None:
        sys.exit("bench/scaling.py needs nginx (apt-get install nginx-light)")
    raise_nofile()
    redis = Redis().start()
    prepare_database()
    model = start_model(ttft=MODEL_TIME)
    scratch = Path(tempfile.mkdtemp(prefix="r2d2-scaling-"))
    runs: dict[str, list[dict]] = {}
    try:
        for round_ in range(args.repeat):
            for n in args.processes:
                for kind in ("r2d2", "relay"):
                    servers = [start_r2d2(model, n)] if kind == "r2d2" else start_relays(model, n)
                    proxy = behind_nginx(servers[0].port, scratch / f"{kind}-{n}-{round_}")
                    try:
                        asyncio.run(run_sessions(f"ws://127.0.0.1:{proxy.port}/", 20, 2, stream=args.stream))
                        pids = [p for s in servers for p in tree(s.pid)]
                        row = measure(proxy, pids, args.sessions, args.stream)
                    finally:
                        proxy.stop()
                        for server in servers:
                            server.stop()
                    truncate()
                    runs.setdefault(f"{kind} x{n}", []).append(row)
                    print(f"round {round_}: {kind} x{n}: {row}", flush=True)
    finally:
        model.stop()
        redis.stop()
    summary = {
        name: {
            "turns_per_s_median": statistics.median(r["turns_per_s"] for r in rows),
            "cpu_ms_per_turn_median": statistics.median(r["cpu_ms_per_turn"] for r in rows),
            "machine_busy_median": statistics.median(r["machine_busy"] for r in rows),
            "lost": sum(r["expected"] - r["answered"] for r in rows),
            "runs": rows,
        }
        for name, rows in runs.items()
    }
    low, high = min(args.processes), max(args.processes)
    ratios = {
        f"r2d2 x{high} / r2d2 x{low}": summary[f"r2d2 x{high}"]["turns_per_s_median"]
        / summary[f"r2d2 x{low}"]["turns_per_s_median"],
        **{
            f"r2d2 x{n} / relay x{n}": summary[f"r2d2 x{n}"]["turns_per_s_median"]
            / summary[f"relay x{n}"]["turns_per_s_median"]
            for n in args.processes
        },
    }
    for name, row in summary.items():
        print(
            f"{name:>10}: {row['turns_per_s_median']} turns/s, "
            f"{row['cpu_ms_per_turn_median']} ms CPU/turn, machine {row['machine_busy_median']:.0%} busy, "
            f"lost {row['lost']}"
        )
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")
    kind = "stream" if args.stream else "plain"
    write_result(
        f"scaling-{kind}",
        {
            "sessions": args.sessions,
            "turns_per_session": TURNS,
            "model_ttft_s": MODEL_TIME,
            "summary": summary,
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
        },
    )


if __name__ == "__main__":
    main()
