"""Fixtures for the production tests: fast liveness settings, manage.py as a subprocess, HTTP helpers."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from testkit.fake_llm import FakeLLM
from testkit.server import ROOT, server_env

#: Heartbeat settings for live servers in tests: a process is gone 2 s after its last beat.
FAST_LIVENESS = {
    "R2D2_HEARTBEAT_SECONDS": "0.3",
    "R2D2_PROCESS_STALE_SECONDS": "2",
    "R2D2_ORPHAN_SWEEP_SECONDS": "0.5",
}


@pytest.fixture
def manage(fake_llm: FakeLLM) -> Callable[..., subprocess.CompletedProcess]:
    """Run `manage.py <args>` in its own process, against this test's database and Redis."""

    def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=server_env(fake_llm, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(port: int, path: str, *, host: str = "localhost", headers: dict[str, str] | None = None) -> Response:
    """One plain-HTTP GET with exactly the Host header given (as a load balancer's health checker sends it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
