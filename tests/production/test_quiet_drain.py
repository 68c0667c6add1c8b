"""A clean drain (SIGTERM after a turn) logs no ERROR: the model server's HTTP sessions are closed."""

from __future__ import annotations

import json

import pytest

from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


def errors(log: str) -> list[str]:
    """ERROR lines: the server's JSON lines at ERROR or above, and anything else that says ERROR
    (aiohttp's `Unclosed client session` goes through asyncio's exception handler)."""
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "ERROR" in line or "Unclosed" in line:
                found.append(line)
            continue
        if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
            found.append(line)
    return found


async def test_sigterm_after_a_turn_logs_no_error(daphne_factory, fake_llm):
    server = daphne_factory()
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello", stream=True)
    assert {"type": "message", "data": "Echo: hello"} in frames
    frames = await client.post(session_id, "and again")
    assert {"type": "message", "data": "Echo: and again"} in frames

    server.stop()  # SIGTERM: the process drains and exits
    assert server.process.returncode is not None
    log = server.log()
    assert '"drained"' in log, log
    assert errors(log) == [], "\n".join(errors(log))
