"""Clients that never read: the server's memory with and without the unsent-bytes bound.

100 sockets each start a session and ask for a long streamed reply, then never
read a byte. The server (one Daphne on PostgreSQL + Redis) is sampled for its
resident set every 0.25 s while the replies stream, then the sockets close and
the resident set is read again once it has settled. The same run with
R2D2_MAX_UNSENT_BYTES=0 (no bound) is the baseline.

    .venv/bin/python bench/slow_readers.py [--clients 100] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import LOGS, Redis, db_query, prepare_database, rss_kib, start_daphne, start_model, truncate, write_result

from tests.raw_websocket import RawWebSocket

#: A reply of 2,000 words of 4 KB each, streamed as fast as the server takes it: 8 MB in 2,000 frames.
WORD, WORDS = "x" * 4095 + " ", 2_000


async def run(bound: int, clients: int, seconds: float, model) -> dict:
    truncate()
    # A beat a second: the heartbeat also hands freed memory back (chat/sessions/heartbeat.py).
    server = start_daphne(
        model, name=f"daphne-bound-{bound}", R2D2_MAX_UNSENT_BYTES=str(bound), R2D2_HEARTBEAT_SECONDS="1"
    )
    try:
        baseline = rss_kib(server.pid)
        sockets = [await asyncio.to_thread(RawWebSocket, server.port) for _ in range(clients)]
        for sock in sockets:
            sock.send({"action": "chatbot_session_start"})
        await asyncio.sleep(1.0)
        session_ids = [row[0] for row in db_query("SELECT id FROM chat_chatsession ORDER BY created_at")]
        for sock, session_id in zip(sockets, session_ids, strict=False):
            sock.send(
                {"action": "chatbot_post_message", "session_id": str(session_id), "user_message": "go", "stream": True}
            )
        peak = baseline
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(server.pid))
            await asyncio.sleep(0.25)
        for sock in sockets:
            sock.close()
        await asyncio.sleep(5.0)
        final = rss_kib(server.pid)
        log = (LOGS / f"{server.name}.log").read_text(errors="replace")
        closed_by_server = log.count("closing a connection that does not read")
        return {
            "clients": clients,
            "bound_bytes": bound,
            "rss_start_mib": round(baseline / 1024, 1),
            "rss_peak_mib": round(peak / 1024, 1),
            "rss_final_mib": round(final / 1024, 1),
            "connections_closed_by_server": closed_by_server,
        }
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 4])
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="how long the replies stream before the sockets close"
    )
    args = parser.parse_args()
    redis = Redis().start()
    prepare_database()
    model = start_model(text=WORD, repeat=WORDS)
    try:
        results = [
            await run(bound, clients, args.seconds, model) for clients in args.clients for bound in (1024 * 1024, 0)
        ]
    finally:
        model.stop()
        redis.stop()
    for result in results:
        label = f"bound {result['bound_bytes']} B" if result["bound_bytes"] else "no bound (baseline)"
        print(
            f"{result['clients']:>4} clients, {label:>20}: RSS start {result['rss_start_mib']} MiB, "
            f"peak {result['rss_peak_mib']} MiB, after close {result['rss_final_mib']} MiB; "
            f"closed by the server: {result['connections_closed_by_server']}"
        )
    write_result("slow-readers", {"seconds": args.seconds, "runs": results})


if __name__ == "__main__":
    asyncio.run(main())
