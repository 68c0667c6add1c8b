"""`manage.py runserver` as the README's quick start runs it (autoreloader and all): each log line is
printed once, as JSON, and the first connection logs no warning a newcomer could do nothing about."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
import websockets

from testkit.server import ROOT, free_port, server_env, wait_for_port

pytestmark = pytest.mark.django_db(transaction=True)


async def one_turn(port: int) -> str:
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send(json.dumps({"action": "chatbot_session_start"}))
        session_id = json.loads(await ws.recv())["data"]["session_id"]
        await ws.send(json.dumps({"action": "chatbot_post_message", "session_id": session_id, "user_message": "Hi"}))
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(3)]
        assert [frame["type"] for frame in frames] == ["processing_start", "message", "processing_end"]
        return frames[1]["data"]


def test_runserver_prints_each_log_line_once_and_no_signal_warning(tmp_path):
    env = server_env(None)  # no model: the offline responder, as on a fresh clone
    env.pop("DJANGO_DEBUG", None)  # runserver's own default (on)
    port = free_port()
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as log:
        # Its own process group: the autoreloader runs the server in a child process.
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_for_port(port, process, timeout=30)
            reply = asyncio.run(one_turn(port))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    assert "offline responder" in reply

    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    records, plain = [], []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            plain.append(line)
    # Django's own console handler printed every django.* line a second time, as plain text.
    assert plain == [], f"lines on stderr that are not JSON log records: {plain}"
    messages = [record["message"] for record in records]
    assert sum("WebSocket CONNECT" in message for message in messages) == 1, messages
    assert sum("Watching for file changes" in message for message in messages) == 1, messages
    # Under runserver the server is not on the main thread, so no drain on SIGTERM: nothing to warn about.
    warnings = [r for r in records if r["level"] in ("WARNING", "ERROR") and r["logger"] == "chat.sessions.drain"]
    assert warnings == []
