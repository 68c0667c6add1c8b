"""Debug is off unless asked for, and even on, Django's error page shows no credential."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testkit.server import ROOT, LiveServer, free_port, server_env, wait_for_port
from tests.production.conftest import http_get

pytestmark = pytest.mark.django_db(transaction=True)

UNLISTED_HOST = "unlisted.example.com"


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def test_debug_is_off_unless_the_environment_turns_it_on(fake_llm):
    env = without(server_env(fake_llm), "DJANGO_DEBUG")
    show = [sys.executable, "-c", "from django.conf import settings; print(settings.DEBUG)"]
    assert subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True).stdout.strip().endswith("False")
    # manage.py's other commands too; an explicit value always wins.
    shell = [sys.executable, "manage.py", "shell", "-c", "from django.conf import settings; print(settings.DEBUG)"]
    assert subprocess.run(shell, cwd=ROOT, env=env, capture_output=True, text=True).stdout.strip().endswith("False")
    on = {**env, "DJANGO_DEBUG": "1"}
    assert subprocess.run(shell, cwd=ROOT, env=on, capture_output=True, text=True).stdout.strip().endswith("True")


def test_daphne_without_the_variable_is_production(fake_llm, tmp_path):
    """No DJANGO_DEBUG: Daphne refuses to start without a secret key, and with one answers an
    unlisted Host with a bare 400, not the debug page."""
    env = without(server_env(fake_llm), "DJANGO_DEBUG", "DJANGO_SECRET_KEY")
    refused = LiveServer(env, tmp_path / "refused.log")
    with pytest.raises(RuntimeError, match="exited"):
        refused.start()
    refused.stop()
    assert "DJANGO_SECRET_KEY is not set" in refused.log()

    server = LiveServer({**env, "DJANGO_SECRET_KEY": "k" * 50}, tmp_path / "daphne.log").start()
    try:
        response = http_get(server.port, "/", host=UNLISTED_HOST)
        assert response.status == 400
        assert b"DisallowedHost" not in response.body and b"Traceback" not in response.body
    finally:
        server.stop()


def test_runserver_defaults_to_debug_and_needs_no_key(fake_llm, tmp_path):
    """The README's quick start, `manage.py runserver`, with neither variable set."""
    env = without(server_env(fake_llm), "DJANGO_DEBUG", "DJANGO_SECRET_KEY")
    port = free_port()
    with open(tmp_path / "runserver.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, process, timeout=30)
            response = http_get(port, "/", host=UNLISTED_HOST)
            assert response.status == 400 and b"DisallowedHost" in response.body  # the debug page
        finally:
            process.terminate()
            process.wait(10)


def test_debug_page_and_logs_show_no_credentials(daphne_factory):
    """DEBUG on, credentials in every place settings keep them: the page for an unlisted Host lists
    the settings (REDIS_URL, CHANNEL_LAYERS, DATABASES, ...) with none of the secrets."""
    markers = {
        "redis": "redispw-3f9c1e7a",
        "database": "dbpw-8b2d4c6e",
        "openai": "sk-openai-5a7e9c1b3d",
        "secret_key": "djangosecret-2c4e6a8b0d-" + "x" * 30,
    }
    server = daphne_factory(
        DJANGO_DEBUG="1",
        REDIS_URL=f"redis://default:{markers['redis']}@127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgres://r2d2:{markers['database']}@127.0.0.1:{free_port()}/r2d2",
        R2D2_DB_POOL_TIMEOUT="1",
        OPENAI_API_KEY=markers["openai"],
        DJANGO_SECRET_KEY=markers["secret_key"],
    )
    response = http_get(server.port, "/", host=UNLISTED_HOST)
    page = response.body.decode(errors="replace")
    assert response.status == 400 and "DisallowedHost" in page, "not Django's debug page"
    assert "REDIS_URL" in page and "CHANNEL_LAYERS" in page and "redis://default:" in page
    # The debug 404 page cleanses the settings too (one of django-axes' was a lazy string, which broke it: a 500).
    missing = http_get(server.port, "/no-such-page")
    assert missing.status == 404 and b"Page not found" in missing.body
    # Also a page whose traceback is in the database layer: the health check fails but never shows a secret.
    health = http_get(server.port, "/healthz", host=UNLISTED_HOST)
    for name, marker in markers.items():
        assert marker not in page, f"the debug page shows the {name} credential"
        assert marker not in health.body.decode(errors="replace"), f"/healthz shows the {name} credential"
        assert marker not in server.log(), f"the log shows the {name} credential"


def test_quick_start_migrate_needs_no_key(fake_llm, tmp_path):
    """The README's first quick-start command, as written, on a fresh database."""
    env = without(server_env(fake_llm), "DJANGO_DEBUG", "DJANGO_SECRET_KEY", "DATABASE_URL")
    env["R2D2_SQLITE_PATH"] = str(tmp_path / "fresh.sqlite3")
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_a_local_api_key_needs_no_secret_key(fake_llm, tmp_path):
    """docs/accounts.md's `create_api_key`, run on a fresh clone as the quick start's commands are, makes a key
    (it stopped with "DJANGO_SECRET_KEY is not set"); the key is alone on the last line."""
    env = without(server_env(fake_llm), "DJANGO_DEBUG", "DJANGO_SECRET_KEY", "DATABASE_URL")
    env["R2D2_SQLITE_PATH"] = str(tmp_path / "fresh.sqlite3")
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run("migrate").returncode == 0
    made = run("create_api_key", "laptop")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().splitlines()[-1].startswith("r2d2_")
    assert run("revoke_api_key", "laptop").returncode == 0
