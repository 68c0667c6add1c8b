"""Clients that read slowly, or not at all: the server's memory, and who gets closed (chat/edge/flow.py).

Two runs against one Daphne on PostgreSQL + Redis, each with its own model server:

- stalled: N sockets each start a session and ask for a long streamed reply (8 MB),
  then never read a byte. The server's resident set is sampled every 0.25 s until it
  has closed them all (4408, after R2D2_STALLED_READER_SECONDS, 30 s by default,
  without progress) or `--stalled-seconds` passed; then the sockets are closed, and
  once every partial reply is saved and a few seconds passed, it is read again.
  Flow control bounds what each socket's send buffer holds at R2D2_SEND_BUFFER_BYTES
  plus a frame; the reply said so far (what the kernel took before that) is kept to
  be saved.
- steady: N clients each ask for a streamed reply of `--reply-mb` MB and read it
  through a local link carrying `--rate` KiB/s (testkit/slow_link.py), slower than the
  model streams: every reply must arrive whole, and no client be closed.

    .venv/bin/python bench/slow_readers.py [--clients 100] [--stalled-seconds 90] [--rate 64] [--reply-mb 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import websockets
from common import LOGS, Redis, db_query, prepare_database, rss_kib, start_daphne, start_model, truncate, write_result

from testkit.raw_websocket import RawWebSocket
from testkit.slow_link import SlowLink

#: Words of 4 KB: a stalled client's reply is 2,000 of them (8 MB in 2,000 frames).
WORD, STALLED_WORDS = "x" * 4095 + " ", 2_000
CLOSED_LOG_LINE = "closing a connection that does not read"


def closed_by_server(name: str) -> int:
    return (LOGS / f"{name}.log").read_text(errors="replace").count(CLOSED_LOG_LINE)


async def stalled(clients: int, seconds: float) -> dict:
    truncate()
    model = start_model(text=WORD, repeat=STALLED_WORDS)
    # A beat a second: the heartbeat also hands freed memory back (chat/sessions/heartbeat.py).
    server = start_daphne(model, name="daphne-stalled", R2D2_HEARTBEAT_SECONDS="1")
    try:
        baseline = rss_kib(server.pid)
        sockets = [await asyncio.to_thread(RawWebSocket, server.port) for _ in range(clients)]
        session_ids = []
        for sock in sockets:
            sock.send({"action": "chatbot_session_start"})
            session_ids.append((await asyncio.to_thread(sock.receive))["data"]["session_id"])  # its last read
        for sock, session_id in zip(sockets, session_ids, strict=True):
            post = {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go", "stream": True}
            sock.send(post)
        started = time.monotonic()
        peak = peak_paused = baseline
        first_close = last_close = None
        while (elapsed := time.monotonic() - started) < seconds:
            rss = rss_kib(server.pid)
            peak = max(peak, rss)
            closed = closed_by_server(server.name)
            if first_close is None and closed:
                first_close = round(elapsed, 1)
            if first_close is None:
                peak_paused = max(peak_paused, rss)  # every client connected, none closed yet
            if closed >= clients:
                last_close = round(elapsed, 1)
                break
            await asyncio.sleep(0.25)
        for sock in sockets:
            sock.close()
        ended = "SELECT count(*) FROM chat_chatsession WHERE ended_at IS NOT NULL"
        while db_query(ended)[0][0] < clients and time.monotonic() - started < seconds + 60:  # noqa: ASYNC110 (polls the database)
            await asyncio.sleep(0.5)  # every turn cancelled, its partial reply saved, its session ended
        await asyncio.sleep(5.0)
        final = rss_kib(server.pid)
        saved = db_query(
            "SELECT count(*), coalesce(sum(length(content)), 0) FROM chat_chatmessage WHERE role = %s", ("assistant",)
        )
        return {
            "clients": clients,
            "seconds": seconds,
            "rss_start_mib": round(baseline / 1024, 1),
            "rss_peak_while_paused_mib": round(peak_paused / 1024, 1),
            "rss_peak_mib": round(peak / 1024, 1),
            "rss_final_mib": round(final / 1024, 1),
            "closed_by_server": closed_by_server(server.name),
            "first_close_after_s": first_close,
            "last_close_after_s": last_close,
            "replies_saved": saved[0][0],
            "reply_mib_saved_per_client": round(saved[0][1] / max(1, saved[0][0]) / 2**20, 2),
        }
    finally:
        server.stop()
        model.stop()


async def steady(clients: int, rate_kib: float, reply_mb: float) -> dict:
    truncate()
    words = int(reply_mb * 1_000_000 / len(WORD))
    model = start_model(text=WORD, repeat=words)
    server = start_daphne(model, name="daphne-steady", R2D2_HEARTBEAT_SECONDS="1")
    link = await SlowLink(server.port, rate_kib * 1024).start()
    try:
        baseline = peak = rss_kib(server.pid)
        # Plain websockets clients (not testkit.client.ProtocolClient, which checks every frame against
        # asyncapi.yaml): a hundred of them in this one process must keep up with their links.
        peers = [
            await websockets.connect(link.url, max_size=None, ping_interval=None, open_timeout=60)
            for _ in range(clients)
        ]
        sessions = []
        for peer in peers:
            await peer.send(json.dumps({"action": "chatbot_session_start"}))
            sessions.append(json.loads(await peer.recv())["data"]["session_id"])

        async def read(peer: websockets.ClientConnection, session_id: str) -> str:
            post = {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go", "stream": True}
            deltas, final = [], None
            try:
                await peer.send(json.dumps(post))
                while (frame := json.loads(await asyncio.wait_for(peer.recv(), 300)))["type"] != "processing_end":
                    if frame["type"] == "message_delta":
                        deltas.append(frame["data"])
                    elif frame["type"] == "message":
                        final = frame["data"]
            except Exception as exc:  # a close, or a frame that never came
                return type(exc).__name__
            text = "".join(deltas)
            return "whole" if final == text and len(text) == words * len(WORD) else "incomplete"

        started = time.monotonic()
        reading = asyncio.gather(*(read(peer, session_id) for peer, session_id in zip(peers, sessions, strict=True)))
        while not reading.done():
            peak = max(peak, rss_kib(server.pid))
            await asyncio.wait([reading], timeout=0.25)
        took = time.monotonic() - started
        outcomes = reading.result()
        for peer in peers:
            await peer.close()
        return {
            "clients": clients,
            "rate_kib_per_s": rate_kib,
            "reply_mb": reply_mb,
            "replies_whole": outcomes.count("whole"),
            "other_outcomes": sorted({o for o in outcomes if o != "whole"}),
            "closed_by_server": closed_by_server(server.name),
            "seconds": round(took, 1),
            "mean_rate_kib_per_s": round(link.forwarded / took / 1024 / clients, 1),
            "rss_start_mib": round(baseline / 1024, 1),
            "rss_peak_mib": round(peak / 1024, 1),
        }
    finally:
        await link.stop()
        server.stop()
        model.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument(
        "--stalled-seconds", type=float, default=90.0, help="longest the stalled clients stay (if not closed before)"
    )
    parser.add_argument("--rate", type=float, default=64.0, help="KiB/s each steady client reads")
    parser.add_argument("--reply-mb", type=float, default=1.0, help="each steady client's reply, MB")
    args = parser.parse_args()
    redis = Redis().start()
    prepare_database()
    try:
        still = await stalled(args.clients, args.stalled_seconds)
        moving = await steady(args.clients, args.rate, args.reply_mb)
    finally:
        redis.stop()
    print(
        f"{still['clients']} stalled clients: RSS start {still['rss_start_mib']} MiB, "
        f"peak while paused {still['rss_peak_while_paused_mib']} MiB, peak {still['rss_peak_mib']} MiB, "
        f"after close {still['rss_final_mib']} MiB; closed by the server (4408): {still['closed_by_server']} "
        f"(first after {still['first_close_after_s']} s, last after {still['last_close_after_s']} s); "
        f"replies saved {still['replies_saved']}, {still['reply_mib_saved_per_client']} MiB each"
    )
    print(
        f"{moving['clients']} steady clients at {moving['rate_kib_per_s']:.0f} KiB/s, {moving['reply_mb']} MB "
        f"streamed replies: {moving['replies_whole']} whole, closed by the server: {moving['closed_by_server']}, "
        f"other outcomes {moving['other_outcomes']}; {moving['seconds']} s, {moving['mean_rate_kib_per_s']} KiB/s "
        f"each on average; RSS start {moving['rss_start_mib']} MiB, peak {moving['rss_peak_mib']} MiB"
    )
    write_result("slow-readers", {"stalled": still, "steady": moving})


if __name__ == "__main__":
    asyncio.run(main())
