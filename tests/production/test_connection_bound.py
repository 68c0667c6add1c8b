"""500 concurrent sessions against one live Daphne on this machine's PostgreSQL: every turn succeeds
and the server never holds more database connections than its pools allow (R2D2_DB_POOL_MAX for the
ORM, R2D2_DB_TURN_POOL_MAX for the turns' writes).

The consumers' async ORM calls share one thread-sensitive executor thread, but every HTTP request
that reads through the ORM (the admin, transcripts) runs its ORM work on a thread of its own: without the pool,
a burst of them opens one PostgreSQL connection each. So a signed-in operator's admin pages hammer the server
during the turns, and the pool is made small enough that they must queue for it; the control gives the pool
room for all and shows that the same load then takes many more connections (so the bound is the pool's doing).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from chat.models import ChatMessage, ChatSession, EndReason, Role
from testkit.client import ProtocolClient

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SESSIONS = 500
POOL_MAX = 4
TURN_POOL_MAX = 2
ADMIN_PAGES = 30
CONNECTING_AT_ONCE = 50  # Twisted listens with a backlog of 50


class ConnectionSampler(threading.Thread):
    """Counts the server's backends in pg_stat_activity every 20 ms: the ORM's (named
    `application_name`) and the turns' (named `application_name`-turns, chat/turns/pgpool.py)."""

    def __init__(self, application_name: str) -> None:
        super().__init__(daemon=True)
        self.application_name = application_name
        self.samples: list[tuple[int, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        db = settings.DATABASES["default"]
        with psycopg.connect(
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
            user=db.get("USER") or "postgres",
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            while not self._done.is_set():
                row = connection.execute(
                    "SELECT count(*) FILTER (WHERE application_name = %s), "
                    "count(*) FILTER (WHERE application_name = %s) FROM pg_stat_activity",
                    [self.application_name, f"{self.application_name}-turns"],
                ).fetchone()
                self.samples.append((row[0], row[1]))
                time.sleep(0.02)

    def stop(self) -> list[tuple[int, int]]:
        self._done.set()
        self.join(10)
        return self.samples


@pytest.mark.parametrize(
    "pool_max", [pytest.param(POOL_MAX, id="bounded"), pytest.param(10 * ADMIN_PAGES, id="control-unbounded")]
)
async def test_500_concurrent_sessions_stay_within_the_connection_pool(daphne_factory, fake_llm, pool_max):
    application_name = f"r2d2-bound-{uuid.uuid4().hex[:8]}"
    server = daphne_factory(
        R2D2_DB_POOL_MAX=str(pool_max),
        R2D2_DB_POOL_MIN="1",
        R2D2_DB_TURN_POOL_MAX=str(TURN_POOL_MAX),
        PGAPPNAME=application_name,  # libpq names the server's connections, so they can be counted
        R2D2_HEARTBEAT_SECONDS="0.5",
        R2D2_MAX_CONNECTIONS_PER_ADDRESS="0",  # every client here is 127.0.0.1
    )
    operator = Client()
    await sync_to_async(operator.force_login)(
        await get_user_model().objects.acreate_user("operator", password="x", is_staff=True, is_superuser=True)
    )
    cookie = f"sessionid={operator.cookies['sessionid'].value}"
    sampler = ConnectionSampler(application_name)
    sampler.start()
    connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
    everyone_open = asyncio.Barrier(SESSIONS)
    turns_started = asyncio.Event()

    async def one_session(index: int) -> tuple[str, list[dict]]:
        async with connecting:
            client = await ProtocolClient.connect(server.url, open_timeout=60)
        try:
            session_id = await client.start_session()
            await everyone_open.wait()  # all 500 sessions open before any turn starts
            turns_started.set()
            frames = await client.post(session_id, f"[[ttft=0.2]] hello from {index}")
            await client.send({"action": "chatbot_session_end", "session_id": session_id})
            assert await client.recv(timeout=60) == {"type": "session_end", "data": None}
            return session_id, frames
        finally:
            await client.close()

    async def admin_page() -> int:
        """The sessions list, as an operator opens it: its ORM reads run on a thread of their own."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"GET /admin/chat/chatsession/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status_line = await asyncio.wait_for(reader.readline(), 60)
        await reader.read()
        writer.close()
        return int(status_line.split()[1])

    async def admin_pages_during_the_turns() -> list[int]:
        await turns_started.wait()
        return await asyncio.gather(*(admin_page() for _ in range(ADMIN_PAGES)))

    started = time.monotonic()
    try:
        results, statuses = await asyncio.wait_for(
            asyncio.gather(asyncio.gather(*(one_session(i) for i in range(SESSIONS))), admin_pages_during_the_turns()),
            150,
        )
    finally:
        samples = sampler.stop()
    elapsed = time.monotonic() - started
    assert statuses == [200] * ADMIN_PAGES

    for index, (_, frames) in enumerate(results):
        assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"], frames
        assert frames[1]["data"] == f"Echo: hello from {index}"
    session_ids = [session_id for session_id, _ in results]
    assert len(set(session_ids)) == SESSIONS
    assert await ChatSession.objects.filter(id__in=session_ids, end_reason=EndReason.CLIENT).acount() == SESSIONS
    assert await ChatMessage.objects.filter(session_id__in=session_ids, role=Role.ASSISTANT).acount() == SESSIONS

    peak = max(orm for orm, _ in samples)
    turns_peak = max(turns for _, turns in samples)
    print(
        f"\n{SESSIONS} sessions and {ADMIN_PAGES} admin pages in {elapsed:.1f}s; "
        f"server connections to PostgreSQL: peak {peak} (pool max {pool_max}), "
        f"turns' peak {turns_peak} (max {TURN_POOL_MAX})"
    )
    assert 0 < turns_peak <= TURN_POOL_MAX, f"the turns held {turns_peak} connections (max {TURN_POOL_MAX})"
    if pool_max == POOL_MAX:
        assert 0 < peak <= POOL_MAX, f"the server held {peak} connections (pool max {POOL_MAX})"
    else:
        assert peak > 2 * POOL_MAX, f"the control needed only {peak} connections: the load proves nothing"
