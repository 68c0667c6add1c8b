"""Shared fixtures: the local model server, a live Daphne, and which real services this run has.

The suite runs in two modes (see `.ci/run`): embedded defaults (SQLite, the
in-memory channel layer) and real services (DATABASE_URL, REDIS_URL). Tests that
need a real service are marked and skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from testkit.fake_bedrock import FakeBedrock
from testkit.fake_llm import FakeLLM
from testkit.server import ROOT, TEST_API_KEY, LiveServer, server_env

ARTIFACTS = ROOT / "test-artifacts"


def pytest_collection_modifyitems(config, items) -> None:
    uses_postgres = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    uses_redis = bool(settings.REDIS_URL)
    for item in items:
        if "postgres" in item.keywords and not uses_postgres:
            item.add_marker(pytest.mark.skip(reason="needs PostgreSQL: run with DATABASE_URL set (.ci/run does)"))
        if "redis" in item.keywords and not uses_redis:
            item.add_marker(pytest.mark.skip(reason="needs Redis: run with REDIS_URL set (.ci/run does)"))


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory) -> None:
    """SQLite's test database is a file, so a live Daphne process can share it; a PostgreSQL
    test database is named for this run, so two runs on one server never collide."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        db.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")
    else:
        db.setdefault("TEST", {})["NAME"] = f"test_r2d2_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _close_connection_pools(django_db_setup) -> Iterator[None]:
    """Open connections (the async ORM's worker thread holds its own) would block the test database's teardown."""
    yield
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    from chat.turns import pgpool

    pgpool.close_all()
    asyncio.run(sync_to_async(connections.close_all)())
    for connection in connections.all(initialized_only=True):
        connection.close()
        if hasattr(connection, "close_pool"):
            connection.close_pool()


@pytest.fixture(autouse=True)
def _frames_match_published_protocol(monkeypatch) -> None:
    """In-process tests too: every frame a WebsocketCommunicator receives must match asyncapi.yaml
    (testkit.client.ProtocolClient checks the frames of live servers)."""
    from channels.testing import WebsocketCommunicator

    from testkit.contract import check_frame

    original = WebsocketCommunicator.receive_from

    async def receive_from(self, timeout=1):
        text = await original(self, timeout)
        if isinstance(text, str):
            check_frame(text)
        return text

    monkeypatch.setattr(WebsocketCommunicator, "receive_from", receive_from)


@pytest.fixture(autouse=True)
def _anonymous_by_default(settings) -> None:
    """Connections need no principal unless a test says so (R2D2_REQUIRE_AUTH follows DEBUG otherwise),
    and each test starts with empty quota counters."""
    from chat.accounts import counters

    settings.R2D2_REQUIRE_AUTH = False
    counters.reset_counters()


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLM, settings) -> FakeLLM:
    """The local model server, emptied, with this process's settings pointed at it."""
    fake_llm_server.reset()
    settings.OPENAI_BASE_URL = fake_llm_server.url
    settings.OPENAI_API_KEY = TEST_API_KEY
    return fake_llm_server


@pytest.fixture(scope="session")
def fake_bedrock_server() -> Iterator[FakeBedrock]:
    server = FakeBedrock().start()
    yield server
    server.stop()


@pytest.fixture
def fake_bedrock(fake_bedrock_server: FakeBedrock) -> FakeBedrock:
    """The local Bedrock server, emptied (point a server at it with `bedrock_env`)."""
    fake_bedrock_server.reset()
    return fake_bedrock_server


@pytest.fixture
def daphne_factory(transactional_db, fake_llm: FakeLLM, tmp_path: Path):
    """Start Daphne processes sharing this test's database; `factory(**env)` returns a started one."""
    servers: list[LiveServer] = []

    def factory(*, command: list[str] | None = None, **overrides: str) -> LiveServer:
        server = LiveServer(
            server_env(fake_llm, **overrides), tmp_path / f"daphne-{len(servers)}.log", command=command
        ).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def daphne(daphne_factory) -> LiveServer:
    """One live Daphne with the default settings."""
    return daphne_factory()
