"""The Elastic Beanstalk bundle: what `eb deploy` uploads, that its files are valid, and that the
Procfile's command, run from the unpacked bundle behind the bundle's nginx files, serves the protocol."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys

import pytest
import websockets
from django.urls import resolve

from chat.models import ChatSession
from testkit import nginx
from testkit.client import ProtocolClient
from testkit.fake_llm import SECRET_DETAIL
from testkit.server import ROOT, TEST_API_KEY, server_env
from tests.production.bundle import (
    PROCFILE_LINE,
    ProcfileServer,
    bundle_files,
    container_commands,
    copy_bundle,
    ebextensions,
    environment_properties,
    procfile_commands,
    venv_path,
)
from tests.production.conftest import http_get

#: The option namespaces the bundle uses, with their documented options (AWS Elastic Beanstalk developer
#: guide, "General options for all environments" and "Reverse proxy configuration"). A typo here or in
#: the bundle would otherwise only show up as an ignored setting on AWS.
REAL_NAMESPACES: dict[str, set[str] | None] = {
    # Environment properties: any name.
    "aws:elasticbeanstalk:application:environment": None,
    "aws:elasticbeanstalk:environment:process:default": {
        "DeregistrationDelay",
        "HealthCheckInterval",
        "HealthCheckPath",
        "HealthCheckTimeout",
        "HealthyThresholdCount",
        "MatcherHTTPCode",
        "Port",
        "Protocol",
        "StickinessEnabled",
        "StickinessLBCookieDuration",
        "StickinessType",
        "UnhealthyThresholdCount",
    },
    "aws:elbv2:loadbalancer": {
        "AccessLogsS3Bucket",
        "AccessLogsS3Enabled",
        "AccessLogsS3Prefix",
        "IdleTimeout",
        "ManagedSecurityGroup",
        "SecurityGroups",
    },
    "aws:elasticbeanstalk:environment:proxy": {"ProxyServer"},
    "aws:elasticbeanstalk:command": {"DeploymentPolicy", "Timeout", "BatchSizeType", "BatchSize", "IgnoreHealthCheck"},
    "aws:elasticbeanstalk:environment": {"EnvironmentType", "ServiceRole", "LoadBalancerType", "LoadBalancerIsShared"},
}
#: Top-level keys of an .ebextensions config file.
EBEXTENSIONS_SECTIONS = {
    "option_settings",
    "packages",
    "groups",
    "users",
    "sources",
    "files",
    "commands",
    "services",
    "container_commands",
    "Resources",
    "Outputs",
}
REQUIRED = [
    "manage.py",
    "requirements.txt",
    "Procfile",
    "r2d2site/settings.py",
    "r2d2site/asgi.py",
    "chat/websocket/consumer.py",
    "chat/migrations/0001_initial.py",
    ".ebextensions/01_r2d2.config",
    ".platform/nginx/conf.d/r2d2_websocket.conf",
    ".platform/nginx/conf.d/elasticbeanstalk/00_application.conf",
]
FORBIDDEN_PREFIXES = (
    "deploy/",
    "tests/",
    "testkit/",
    "bench/",
    ".ci/",
    ".venv/",
    ".git/",
    "staticfiles/",
    "test-artifacts/",
    ".elasticbeanstalk/",
)
SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style keys
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
HOST = "r2d2.example.com"


def test_ebextensions_parse_and_name_real_options():
    configs = ebextensions()
    assert configs, "no .ebextensions/*.config"
    for name, config in configs.items():
        assert isinstance(config, dict) and set(config) <= EBEXTENSIONS_SECTIONS, name
        for namespace, options in (config.get("option_settings") or {}).items():
            assert namespace in REAL_NAMESPACES, f"{name}: unknown namespace {namespace}"
            allowed = REAL_NAMESPACES[namespace]
            assert allowed is None or set(options) <= allowed, f"{name}: {set(options) - allowed} not in {namespace}"
            for option, value in options.items():
                assert isinstance(value, str), f"{name}: {namespace}:{option} should be a quoted string"

    settings_by_namespace: dict[str, dict[str, str]] = {}
    for config in configs.values():
        for namespace, options in (config.get("option_settings") or {}).items():
            settings_by_namespace.setdefault(namespace, {}).update(options)
    env = environment_properties()
    assert env["DJANGO_SETTINGS_MODULE"] == "r2d2site.settings" and env["DJANGO_DEBUG"] == "0"
    for secret in ("DJANGO_SECRET_KEY", "OPENAI_API_KEY", "REDIS_URL", "DATABASE_URL"):
        assert secret not in env, f"{secret} belongs in `eb setenv`, not in the bundle"

    process = settings_by_namespace["aws:elasticbeanstalk:environment:process:default"]
    assert process["HealthCheckPath"] == "/healthz"
    assert resolve(process["HealthCheckPath"]).url_name == "healthz"
    assert int(process["HealthCheckTimeout"]) < int(process["HealthCheckInterval"])
    assert settings_by_namespace["aws:elasticbeanstalk:environment"]["LoadBalancerType"] == "application"
    idle = int(settings_by_namespace["aws:elbv2:loadbalancer"]["IdleTimeout"])
    assert 600 <= idle <= 3600, "raise the load balancer's idle timeout (default 60 s) for quiet WebSockets"

    commands = container_commands()
    migrate = [c for c in commands.values() if "manage.py migrate" in c["command"]]
    collect = [c for c in commands.values() if "manage.py collectstatic" in c["command"]]
    assert len(migrate) == 1 and migrate[0].get("leader_only") is True
    assert len(collect) == 1 and not collect[0].get("leader_only"), "every instance serves its own static files"
    assert list(commands).index(next(k for k, c in commands.items() if c in migrate)) == 0, "migrate first"


def test_procfile_and_nginx_agree_on_the_port():
    [line] = [ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln.strip()]
    assert PROCFILE_LINE.match(line)
    web = procfile_commands()["web"]
    # One Daphne per core behind the same port (r2d2site/serve.py); the Daphne command follows the launcher.
    assert web.split()[:4] == ["python", "-m", "r2d2site.serve", "daphne"] and "-p $PORT" in web
    # Daphne's --proxy-headers trusts the client's own X-Forwarded-For claim; chat/edge/proxy.py replaces it.
    assert "--proxy-headers" not in web and environment_properties()["R2D2_TRUSTED_PROXIES"] == "2"
    application = (ROOT / ".platform/nginx/conf.d/elasticbeanstalk/00_application.conf").read_text()
    assert re.findall(r"proxy_pass\s+http://127\.0\.0\.1:(\d+);", application) == [environment_properties()["PORT"]]
    for directive in ("proxy_set_header    Upgrade", "proxy_set_header    Connection", "proxy_read_timeout"):
        assert directive in application
    assert not (ROOT / ".ebextensions" / "nginx").exists(), ".ebextensions/nginx is the retired (Amazon Linux 1) way"


@pytest.mark.skipif(nginx.NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_platform_nginx_files_pass_nginx_t(tmp_path):
    main, _ = nginx.prepare(ROOT, tmp_path)
    result = nginx.check(main)
    assert result.returncode == 0, result.stderr


def test_bundle_holds_the_app_and_no_tests_databases_or_secrets():
    files = bundle_files()
    for required in REQUIRED:
        assert required in files, f"{required} missing from the bundle"
    tracked_migrations = subprocess.run(
        ["git", "ls-files", "chat/migrations"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(tracked_migrations) <= set(files)
    for name in files:
        assert not name.startswith(FORBIDDEN_PREFIXES), name
        assert not re.search(r"\.sqlite3(-journal)?$|(^|/)\.env($|\.)|\.pem$|\.key$|__pycache__|\.pyc$", name), name
        assert name != "requirements-dev.txt", name
        text = (ROOT / name).read_bytes().decode(errors="ignore")
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{name} contains something like a secret ({pattern.pattern})"
    requirements = {
        re.split(r"[\[=<>~! ]", line.strip())[0].lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert {"django", "channels", "channels-redis", "daphne", "whitenoise", "boto3"} <= requirements
    assert not requirements & {"awsebcli", "pytest", "ruff", "moto"}, "deploy and test tools stay out of the runtime"


@pytest.mark.django_db(transaction=True)
async def test_procfile_from_the_bundle_serves_the_protocol_behind_nginx(fake_llm, tmp_path):
    """Unpack the bundle, run its container_commands (collectstatic; migrate is a no-op on the test
    database), start the Procfile's web command verbatim with PORT set, put the bundle's nginx files in
    front, and hold a streamed conversation through it as the load balancer forwards it."""
    bundle = copy_bundle(tmp_path / "staging")
    env = server_env(
        fake_llm,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS=HOST,
        **{k: v for k, v in environment_properties(bundle).items() if k not in {"PORT", "DJANGO_DEBUG"}},
    )
    if not nginx.NGINX:
        env["R2D2_TRUSTED_PROXIES"] = "1"  # the test client plays the load balancer, and no nginx appends
    for name, command in container_commands(bundle).items():
        # The platform activates its venv (/var/app/venv/*/bin/activate); here PATH points at ours.
        runnable = re.sub(r"^source \S+/activate && ", "", command["command"])
        result = await asyncio.to_thread(
            subprocess.run,
            ["/bin/sh", "-c", runnable],
            cwd=bundle,
            env={**env, "PATH": venv_path()},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
    assert (bundle / "staticfiles" / "staticfiles.json").exists()

    server = ProcfileServer(env, tmp_path / "web.log", bundle).start()
    proxy = None
    try:
        port = server.port
        if nginx.NGINX:
            main, port = nginx.prepare(bundle, tmp_path / "nginx", upstream_port=server.port)
            proxy = nginx.Nginx(main, port).start()
        # As the load balancer forwards it: the public Host, X-Forwarded-Proto for the TLS it
        # terminated, X-Forwarded-For with the client's address.
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
        client = ProtocolClient(
            await websockets.connect(f"ws://{HOST}/", host="127.0.0.1", port=port, additional_headers=forwarded)
        )
        session_id = await client.start_session()
        frames = await client.post(session_id, "[[text=streamed_through_the_proxy]] hi", stream=True)
        assert [f["type"] for f in frames] == ["processing_start", *["message_delta"] * 4, "message", "processing_end"]
        assert "".join(f["data"] for f in frames[1:5]) == frames[5]["data"] == "streamed through the proxy"
        await client.send({"action": "chatbot_session_end", "session_id": session_id})
        assert await client.recv() == {"type": "session_end", "data": None}
        await client.close()
        # chat/edge/proxy.py: the session records the client, not the proxy.
        assert (await ChatSession.objects.aget(id=session_id)).client_address == "203.0.113.9"

        health = http_get(port, "/healthz", host="172.31.0.9")
        assert health.status == 200 and json.loads(health.body)["status"] == "ok"
        admin = http_get(port, "/admin/login/", host=HOST, headers={"X-Forwarded-Proto": "https"})
        assert admin.status == 200
    finally:
        if proxy:
            proxy.stop()
        server.stop()


@pytest.mark.django_db(transaction=True)
async def test_production_logs_are_json_lines_without_contents_or_secrets(fake_llm, tmp_path):
    """Every line the Procfile's server prints during a conversation (one with an upstream failure too)
    is a JSON object; the session's lines carry its id; none carries what was said, the API key or
    the upstream's error body."""
    env = server_env(
        fake_llm,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="localhost,127.0.0.1",
        DJANGO_STATIC_ROOT=str(tmp_path / "static"),
        R2D2_UPSTREAM_RETRIES="0",
    )
    collected = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    assert collected.returncode == 0
    server = ProcfileServer(env, tmp_path / "web.log", ROOT).start()
    try:
        client = await ProtocolClient.connect(server.url, additional_headers={"X-Forwarded-Proto": "https"})
        session_id = await client.start_session()
        said = "my bank pin is 4711 and the plans are under the rug"
        frames = await client.post(session_id, said)
        assert {"type": "message", "data": f"Echo: {said}"} in frames
        frames = await client.post(session_id, "[[status=500]] please fail 9081")
        assert frames[-2]["type"] == "error"
        await client.send({"action": "chatbot_session_end", "session_id": session_id})
        await client.recv()
        await client.close()
        http_get(server.port, "/healthz", host="10.0.0.1")
    finally:
        server.stop()

    lines = [line for line in server.log().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # every line, Daphne's own included
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    mine = [r for r in records if r.get("session_id") == session_id]
    assert {r["message"] for r in mine} >= {"session started", "session ended"}
    text = "\n".join(lines)
    for leaked in ("4711", "under the rug", "please fail 9081", "Echo:", TEST_API_KEY, SECRET_DETAIL):
        assert leaked not in text, f"{leaked!r} reached the logs"
