"""A real Prometheus (Debian's) scraping R2D2 as deploy/prometheus/prometheus.yml does on Elastic Beanstalk:
the instance's private address and the app's port, over plain HTTP, from the instance's two Daphne processes
started the Procfile's way. The target is up, a real turn is counted, the dashboard's queries answer, and
`promtool check metrics` accepts the exposition."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets
import yaml

from testkit.client import ProtocolClient
from testkit.server import ROOT, LiveServer, server_env
from tests.interfaces.test_dashboard import concrete, expressions
from tests.production.bundle import ProcfileServer, environment_properties
from tests.production.conftest import FAST_LIVENESS, http_get

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
HOST = "r2d2.example.com"

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="Prometheus is not installed (apt-get install prometheus: .ci/run does)",
    ),
]


def test_the_shipped_configuration_discovers_the_environment_and_passes_promtool():
    result = subprocess.run([PROMTOOL, "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [job] = yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    [discovery] = job["ec2_sd_configs"]
    assert "tag:elasticbeanstalk:environment-name" in [f["name"] for f in discovery["filters"]]
    [address] = [r for r in job["relabel_configs"] if r.get("target_label") == "__address__"]
    assert address["source_labels"] == ["__meta_ec2_private_ip"]
    # The app's own port, as the bundle sets it (nginx's port 80 would work too, but is one more hop).
    assert address["replacement"] == "${1}:" + environment_properties()["PORT"]
    assert job["scheme"] == "http" and job["metrics_path"] == "/metrics"


def local_configuration(directory: Path, port: int) -> Path:
    """The shipped job with EC2 discovery replaced by a file naming this machine as one instance, with the
    labels EC2 discovery gives; the shipped relabelling then picks the address, with the test server's port."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    del job["ec2_sd_configs"]
    targets = directory / "instances.json"
    instance = {
        "__meta_ec2_private_ip": "127.0.0.1",
        "__meta_ec2_instance_id": "i-0123456789abcdef0",
        "__meta_ec2_availability_zone": "eu-west-1a",
        "__meta_ec2_tag_elasticbeanstalk_environment_name": "r2d2-test",
    }
    targets.write_text(json.dumps([{"targets": ["discovered-by-ec2"], "labels": instance}]))
    job["file_sd_configs"] = [{"files": [str(targets)]}]
    for rule in job["relabel_configs"]:
        if rule.get("target_label") == "__address__":
            rule["replacement"] = rule["replacement"].replace(":8000", f":{port}")
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus(LiveServer):
    """Debian's Prometheus on a free port, with a storage directory of its own."""

    def __init__(self, config: Path, directory: Path) -> None:
        super().__init__(dict(os.environ), directory / "prometheus.log")
        self.command = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def start(self) -> Prometheus:
        super().start()
        deadline = time.monotonic() + 30
        while True:  # the port opens before the storage is ready (503 until then)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                    return self
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict]:
        return self.api("query", query=expression)["result"]

    def wait_for(self, expression: str, predicate, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expression)
            if predicate(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.25)


def total(result: list[dict]) -> float:
    return sum(float(series["value"][1]) for series in result)


async def test_prometheus_scrapes_both_processes_of_an_instance(fake_llm, tmp_path):
    env = server_env(
        fake_llm,
        # As deployed: debug off, HTTPS redirect on, only the public name allowed as Host.
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS=HOST,
        R2D2_WEB_PROCESSES="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        R2D2_MODEL_PRICES="gpt-3.5-turbo=0.50:1.50",
        **FAST_LIVENESS,
    )
    server = ProcfileServer(env, tmp_path / "web.log", ROOT).start()
    prometheus = Prometheus(local_configuration(tmp_path, server.port), tmp_path).start()
    try:
        [target] = [
            t
            for t in await asyncio.to_thread(
                lambda: prometheus.wait_for('up{job="r2d2"}', lambda r: r and r[0]["value"][1] == "1")
            )
        ]
        assert target["value"][1] == "1", "the instance's target is not up"
        assert target["metric"]["instance"] == "i-0123456789abcdef0"
        [active] = (await asyncio.to_thread(prometheus.api, "targets"))["activeTargets"]
        assert active["health"] == "up" and active["scrapeUrl"] == f"http://127.0.0.1:{server.port}/metrics"

        answered = 'sum(r2d2_turns_total{job="r2d2", outcome="answered"})'
        before = total(await asyncio.to_thread(prometheus.query, answered))
        clients = []
        for _ in range(4):  # the kernel spreads sockets over the two processes
            ws = await websockets.connect(f"ws://{HOST}/", host="127.0.0.1", port=server.port)
            clients.append(ProtocolClient(ws))
        for client in clients:
            session_id = await client.start_session()
            frames = await client.post(session_id, "count me", stream=True)
            assert {"type": "message", "data": "Echo: count me"} in frames
        await clients[0].send("not json")
        assert (await clients[0].recv())["data"]["code"] == "invalid_json"

        counted = await asyncio.to_thread(prometheus.wait_for, answered, lambda r: total(r) >= before + 4)
        assert total(counted) == before + 4, "the turns were not counted"
        sockets = await asyncio.to_thread(
            prometheus.wait_for, 'sum(r2d2_open_sockets{job="r2d2"})', lambda r: total(r) == 4
        )
        assert total(sockets) == 4

        # Every query of the dashboard answers; those whose metrics moved have data.
        await asyncio.sleep(2.5)  # rate() needs two scrapes after the turns
        for expression in expressions():
            result = await asyncio.to_thread(prometheus.query, concrete(expression))
            # No model call failed, so nothing fell back and no breaker opened: those have no series yet.
            if not any(name in expression for name in ("upstream_errors", "fallbacks_total", "circuit_open")):
                assert result, f"no data for {expression!r}"

        # The exposition as Prometheus reads it passes promtool's own check.
        scrape = await asyncio.to_thread(http_get, server.port, "/metrics", host="10.0.3.7:8000")
        assert scrape.status == 200
        check = await asyncio.to_thread(
            subprocess.run, [PROMTOOL, "check", "metrics"], input=scrape.body, capture_output=True, timeout=60
        )
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        for client in clients:
            await client.close()
    finally:
        prometheus.stop()
        server.stop()
