"""The Grafana dashboard (deploy/grafana/r2d2-dashboard.json): it has the panels an operator needs, and
every PromQL expression in it names only metrics that /metrics exports (and parses, with promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from testkit.server import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "r2d2-dashboard.json"
METRIC = re.compile(r"\b(r2d2_[a-z0-9_]+)\b")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")
#: Grafana's variables, as a Prometheus query needs them spelled out (every instance, a 1-minute window).
VARIABLES = {"$job": "r2d2", "$instance": ".*", "$__rate_interval": "1m"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    """Every PromQL expression: the panels' queries and the variables' (`label_values(<selector>, label)`)."""
    found = [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found.append(LABEL_VALUES.match(variable["query"]["query"]).group(1))
    return found


def concrete(expression: str) -> str:
    """The expression as Grafana sends it, for one job and every instance."""
    for name, value in VARIABLES.items():
        expression = expression.replace(name, value)
    return expression


def exported(text: str) -> set[str]:
    """The metric names a scrape of `text` gives Prometheus (a counter's `_total`, a histogram's three series)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "summary": ["_count", "_sum", ""]}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_panels_an_operator_needs_are_there():
    panels = {panel["title"]: panel for panel in dashboard()["panels"]}
    wanted = {
        "Turns per second, by outcome": ["r2d2_turns_total", "by (outcome)"],
        "Errors per second, by code": ["r2d2_upstream_errors_total", "r2d2_rejected_frames_total", "by (code)"],
        "Time to first delta (model call to first message_delta)": [
            "histogram_quantile(0.5,",
            "histogram_quantile(0.99,",
            "r2d2_time_to_first_delta_seconds_bucket",
        ],
        "Live sessions and open sockets": ["r2d2_live_sessions", "r2d2_open_sockets"],
        "Tokens per second, by model": ["r2d2_tokens_total", "by (model, kind)"],
        "Estimated cost per hour, by model": ["r2d2_cost_dollars_total", "by (model)"],
        "Fallbacks per second, by model asked for and model that answered": [
            "r2d2_fallbacks_total",
            "by (requested, served, reason)",
        ],
        "Open circuit breakers, by upstream and model": ["r2d2_circuit_open", "by (upstream, model)"],
    }
    for title, fragments in wanted.items():
        text = " ".join(target["expr"] for target in panels[title]["targets"])
        for fragment in fragments:
            assert fragment in text, (title, fragment)
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in panels.values())


@pytest.mark.django_db
def test_every_expression_names_metrics_that_metrics_exports():
    response = Client().get("/metrics", REMOTE_ADDR="10.0.0.5")  # a Prometheus in the VPC
    assert response.status_code == 200
    names = exported(response.content.decode())
    for expression in expressions():
        named = set(METRIC.findall(expression))
        assert named, f"no R2D2 metric in {expression!r}"
        assert named <= names, f"{expression!r} names {sorted(named - names)}, which /metrics does not export"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_every_expression_parses(tmp_path: Path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"r2d2_dashboard:expression_{index}", "expr": concrete(expression)}
                    for index, expression in enumerate(expressions())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
