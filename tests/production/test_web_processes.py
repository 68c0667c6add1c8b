"""The bundle's Procfile on a multi-core instance: one Daphne per core on one port, behind the bundle's nginx.

r2d2site/serve.py starts R2D2_WEB_PROCESSES Daphne processes on SO_REUSEPORT sockets;
nginx proxies to the one port, the kernel spreads WebSockets across the processes.
Conversations, an operator's end and the orphan sweep work across them, and a
killed process is started again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import ChatSession, EndReason, ServerProcess
from testkit import nginx
from testkit.client import ProtocolClient
from testkit.server import ROOT, server_env
from testkit.wait import async_wait_until
from tests.production.bundle import ProcfileServer
from tests.production.conftest import FAST_LIVENESS

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(nginx.NGINX is None, reason="nginx is not installed (apt-get install nginx-light)"),
]

HOST = "r2d2.example.com"
CLIENTS = 12


async def owners(session_ids: list[str]) -> dict[str, str]:
    return {str(s.id): s.owner_process async for s in ChatSession.objects.filter(id__in=session_ids)}


async def test_two_processes_behind_nginx_share_the_work(fake_llm, manage, tmp_path):
    env = server_env(
        fake_llm,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS=HOST,
        DJANGO_SECURE_SSL_REDIRECT="0",
        R2D2_WEB_PROCESSES="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        **FAST_LIVENESS,
    )
    server = ProcfileServer(env, tmp_path / "web.log", ROOT).start()
    main, port = nginx.prepare(ROOT, tmp_path / "nginx", upstream_port=server.port)
    proxy = nginx.Nginx(main, port).start()
    clients: list[ProtocolClient] = []
    try:
        for _ in range(CLIENTS):
            ws = await websockets.connect(f"ws://{HOST}/", host="127.0.0.1", port=port)
            clients.append(ProtocolClient(ws))
        session_ids = [await c.start_session() for c in clients]
        replies = await asyncio.gather(
            *(c.post(s, f"hello {s}", stream=True) for c, s in zip(clients, session_ids, strict=True))
        )
        for session_id, frames in zip(session_ids, replies, strict=True):
            assert {"type": "message", "data": f"Echo: hello {session_id}"} in frames

        held = await owners(session_ids)
        processes = set(held.values())
        assert len(processes) == 2, f"all {CLIENTS} sockets went to one process: {processes}"

        # An operator ends a session held by either process.
        first = {p: next(s for s in session_ids if held[s] == p) for p in processes}
        one, other = sorted(processes)
        result = await sync_to_async(manage)("end_session", first[one])
        assert result.returncode == 0, result.stderr
        frames = await clients[session_ids.index(first[one])].until("session_end")
        assert frames[-1]["data"] == {"session_id": first[one], "reason": "operator"}

        # SIGKILL the other process: its sessions are ended as orphaned by the survivor's sweep,
        # the survivor's sessions carry on, and the launcher starts a new process on the same socket.
        victim = await ServerProcess.objects.aget(process_id=other)
        os.kill(victim.pid, signal.SIGKILL)
        orphan = first[other]

        async def orphaned() -> bool:
            return (await ChatSession.objects.aget(id=orphan)).end_reason == EndReason.ORPHANED

        await async_wait_until(orphaned, timeout=10)
        assert (await ChatSession.objects.aget(id=orphan)).end_reason == EndReason.ORPHANED
        survivor = next(s for s in session_ids if held[s] == one and s != first[one])
        frames = await clients[session_ids.index(survivor)].post(survivor, "still here?")
        assert {"type": "message", "data": "Echo: still here?"} in frames
        await async_wait_until(lambda: "starting another" in server.log(), timeout=10)
        assert "starting another" in server.log()

        # New connections are all served (none reach a dead socket), and by two live processes again.
        fresh = []
        for _ in range(CLIENTS):
            ws = await websockets.connect(f"ws://{HOST}/", host="127.0.0.1", port=port)
            fresh.append(ProtocolClient(ws))
        fresh_ids = [await c.start_session() for c in fresh]
        assert len(set((await owners(fresh_ids)).values()) - {other}) == 2
        clients += fresh
    finally:
        for client in clients:
            await client.close()
        proxy.stop()
        server.stop()
