"""Logs go to stderr (docs/operating.md): stdout stays free for commands' output (`manage.py chat` prints replies)."""

from __future__ import annotations

import json
import subprocess
import sys

from testkit.server import ROOT, server_env


def test_logs_are_json_lines_on_stderr():
    code = "import django, logging; django.setup(); logging.getLogger('chat').warning('where do I go')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=server_env(None), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "where do I go" not in result.stdout
    [line] = [ln for ln in result.stderr.splitlines() if "where do I go" in ln]
    assert json.loads(line)["message"] == "where do I go"
