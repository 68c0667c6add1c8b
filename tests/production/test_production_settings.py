"""Production mode (DJANGO_DEBUG=0) as Elastic Beanstalk runs it: behind an HTTPS load balancer
whose health checker speaks plain HTTP with the instance's private IP as Host."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys

import pytest

from chat.models import ChatSession
from testkit.client import ProtocolClient
from testkit.server import ROOT, LiveServer, free_port, server_env
from tests.production.conftest import http_get

pytestmark = pytest.mark.django_db(transaction=True)

HOST = "r2d2.example.com"
PRIVATE_IP = "172.31.21.7"


def production_env(**overrides: str) -> dict[str, str]:
    return {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": HOST,
        **overrides,
    }


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_has_no_warnings(fake_llm):
    # As deployed: R2D2_REQUIRE_AUTH follows DEBUG (on); the test suite's servers turn it off.
    # And with the models limited, as docs/deploying.md's step 5 does (else r2d2.W002).
    env = server_env(fake_llm, **production_env(R2D2_ALLOWED_MODELS="gpt-4o-mini"))
    del env["R2D2_REQUIRE_AUTH"]
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_missing_secret_key_stops_start_up_with_a_clear_message(fake_llm, tmp_path):
    env = server_env(fake_llm, **production_env())
    del env["DJANGO_SECRET_KEY"]
    result = run_manage("check", env=env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr.strip().splitlines()[-1]

    server = LiveServer(env, tmp_path / "daphne.log")
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    server.stop()
    assert "DJANGO_SECRET_KEY is not set" in server.log()


@pytest.fixture
def production_server(daphne_factory, fake_llm, tmp_path) -> LiveServer:
    """A production-mode Daphne with `collectstatic` run first, as the bundle's container_commands do."""
    static_root = tmp_path / "static"
    env = production_env(DJANGO_STATIC_ROOT=str(static_root))
    collected = run_manage("collectstatic", "--noinput", env=server_env(fake_llm, **env))
    assert collected.returncode == 0, collected.stderr
    assert (static_root / "staticfiles.json").exists()
    return daphne_factory(**env)


def test_health_check_from_the_load_balancer(production_server):
    """The private IP as Host, plain HTTP: 200, not 400 (host validation) nor 301 (HTTPS redirect)."""
    response = http_get(production_server.port, "/healthz", host=PRIVATE_IP)
    assert response.status == 200
    assert json.loads(response.body) == {"status": "ok", "checks": {"database": "ok", "channel_layer": "ok"}}

    # Everything else keeps both protections.
    assert http_get(production_server.port, "/admin/login/", host=PRIVATE_IP).status == 400
    redirect = http_get(production_server.port, "/admin/login/", host=HOST)
    assert redirect.status == 301 and redirect.headers["location"] == f"https://{HOST}/admin/login/"


def test_admin_and_its_static_files_over_the_load_balancer(production_server):
    """Behind the load balancer (X-Forwarded-Proto: https) the admin answers with HSTS and secure
    cookies, and its stylesheets come from WhiteNoise with far-future caching."""
    https = {"X-Forwarded-Proto": "https"}
    page = http_get(production_server.port, "/admin/login/", host=HOST, headers=https)
    assert page.status == 200
    assert page.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "secure" in page.headers["set-cookie"].lower()
    stylesheets = re.findall(r'href="(/static/admin/css/[^"]+\.css)"', page.body.decode())
    assert stylesheets, "the login page links no stylesheet"
    for href in stylesheets:
        assert re.search(r"\.[0-9a-f]{12}\.css$", href), f"{href} is not a hashed (manifest) name"
        css = http_get(production_server.port, href, host=HOST, headers=https)
        assert css.status == 200, href
        assert css.headers["content-type"].startswith("text/css")
        assert "immutable" in css.headers["cache-control"]
        assert css.body


def test_health_is_503_when_the_channel_layer_is_down(daphne_factory):
    server = daphne_factory(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    response = http_get(server.port, "/healthz", host=PRIVATE_IP)
    assert response.status == 503
    body = json.loads(response.body)
    assert body["status"] == "unhealthy"
    assert body["checks"]["database"] == "ok" and body["checks"]["channel_layer"] != "ok"


def test_health_is_503_when_the_database_is_down(daphne_factory):
    server = daphne_factory(DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/r2d2", R2D2_DB_POOL_TIMEOUT="1")
    response = http_get(server.port, "/healthz", host=PRIVATE_IP)
    assert response.status == 503
    body = json.loads(response.body)
    assert body["checks"]["database"] != "ok" and body["checks"]["channel_layer"] == "ok"


@pytest.mark.postgres
async def test_elastic_beanstalk_rds_variables_configure_the_database(daphne_factory):
    """An environment created with `eb create --database` gets RDS_* variables, not DATABASE_URL:
    the server's sessions land in that database (this run's PostgreSQL test database)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    server = daphne_factory(
        DATABASE_URL="",
        RDS_HOSTNAME=db.get("HOST") or "127.0.0.1",
        RDS_PORT=str(db.get("PORT") or 5432),
        RDS_DB_NAME=db["NAME"],
        RDS_USERNAME=db.get("USER") or "postgres",
        RDS_PASSWORD=db.get("PASSWORD") or "",
    )
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    await client.close()
    assert await ChatSession.objects.filter(id=session_id).aexists()
