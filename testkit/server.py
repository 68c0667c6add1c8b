"""A live Daphne process serving r2d2site on a free port, and the environment it runs in.

`free_port` and `wait_for_port` serve every process the tests and benchmarks start (model servers,
Redis, nginx); `server_env` reads the test run's Django settings (its database and Redis), so it is
for tests; bench/common.py builds its own production-mode environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testkit.fake_bedrock import FakeBedrock
    from testkit.fake_llm import FakeLLM

ROOT = Path(__file__).resolve().parent.parent
TEST_API_KEY = "sk-test-secret-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Return once something listens on `port`; raise if `process` exits first or `timeout` passes.

    60 s: a server starts in about 1 s, but several test workers starting theirs on 2 busy cores took over 20 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args} exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {port} within {timeout}s")


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


def server_env(fake: FakeLLM | None, **overrides: str) -> dict[str, str]:
    """The environment of a server process: this test run's database and Redis, the fake model."""
    from django.conf import settings

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
