"""Shared fixtures: the local model server, a live Daphne, and which real services this run has.

The suite runs in two modes (see `.ci/run`): embedded defaults (SQLite, the
in-memory channel layer) and real services (DATABASE_URL, REDIS_URL). Tests that
need a real service are marked and skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.fake_bedrock import FakeBedrock
from tests.fake_llm import FakeLLM

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
TEST_API_KEY = "sk-test-secret-key-0123456789abcdef"


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
    (tests.client.ProtocolClient checks the frames of live servers)."""
    from channels.testing import WebsocketCommunicator

    from tests.protocol_contract import check_frame

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


def bedrock_env(fake: FakeBedrock, *models: str) -> dict[str, str]:
    """A server process's environment for Bedrock at the fake: the real boto3, dummy credentials,
    and `models` listed in R2D2_BEDROCK_MODELS."""
    env = {
        "R2D2_BEDROCK_ENDPOINT_URL": fake.url,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance metadata service
    }
    if models:
        env["R2D2_BEDROCK_MODELS"] = ",".join(models)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


def server_env(fake: FakeLLM | None, **overrides: str) -> dict[str, str]:
    """The environment of a server process: this run's database and Redis, the fake model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "R2D2_"))}
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        env.pop("DATABASE_URL", None)
        env["R2D2_SQLITE_PATH"] = str(db["NAME"])
    else:
        env["DATABASE_URL"] = "postgres://{USER}@{HOST}:{PORT}/{NAME}".format(
            USER=db.get("USER") or "postgres",
            HOST=db.get("HOST") or "127.0.0.1",
            PORT=db.get("PORT") or 5432,
            NAME=db["NAME"],
        )
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    if fake is not None:
        env["OPENAI_BASE_URL"] = fake.url
        env["OPENAI_API_KEY"] = TEST_API_KEY
    # Every test client connects from 127.0.0.1, and one run starts and stops hundreds of servers
    # sharing one Redis (a stopped server's sockets count for 30 s more): the per-address cap has
    # its own tests (tests/production/test_connection_limits.py), which set it; so has the per-principal cap.
    env["R2D2_MAX_CONNECTIONS_PER_ADDRESS"] = "0"
    env["R2D2_MAX_CONNECTIONS_PER_PRINCIPAL"] = "0"
    env["DJANGO_SETTINGS_MODULE"] = "r2d2site.settings"
    # Anonymous by default, whatever DEBUG is: the auth tests turn it on explicitly.
    env["R2D2_REQUIRE_AUTH"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["R2D2_WEB_PROCESSES"] = "1"
    env.update(overrides)
    return env


class LiveServer:
    """A Daphne process serving r2d2site on a free port, its output kept in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {**env, "PORT": str(self.port)}
        # The Procfile's launcher (one process unless R2D2_WEB_PROCESSES says otherwise), so the
        # server runs as in production: on the event loop r2d2site/loop.py installs.
        self.command = command or [
            sys.executable,
            "-m",
            "r2d2site.serve",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "r2d2site.asgi:application",
        ]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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
