"""deploy/observability: alert rules pass ``promtool check rules`` and their unit tests, the
dashboard is valid JSON with parseable PromQL, and every metric either references exists.

promtool comes from Debian's ``prometheus`` package. These tests fail (never skip) without it,
so a CI machine that lost it cannot pass silently.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config.model import parse_config
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.pulled import PULLED_COUNTERS, PULLED_GAUGES
from gateway.request.auth import hash_key

OBS = Path(__file__).resolve().parent.parent.parent / "deploy" / "observability"
ALERTS = OBS / "alerts.yml"
ALERT_TESTS = OBS / "alerts.test.yml"
DASHBOARD = OBS / "dashboard.json"
METRIC = re.compile(r"\bgateway_[a-z0-9_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(apt-get install -y prometheus)")
    return path


def run(promtool: str, *args: str, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def exposed_names() -> set[str]:
    """Every series name the gateway can expose."""
    config = parse_config({
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:1"}},
        "models": {"m": {"deployments": [{"provider": "p", "model": "m"}]}},
        "tenants": {"t": {"api_keys": [hash_key("k")]}},
    })
    names = set(PULLED_GAUGES) | {name + "_total" for name in PULLED_COUNTERS}
    for family in GatewayMetrics(config, CollectorRegistry()).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_tested_both_ways() -> None:
    rules = load_rules()
    names = {rule["alert"] for rule in rules}
    assert {"GatewayQueueDelayOverTarget", "GatewayShedRateHigh", "GatewayBreakerOpen",
            "GatewayBudgetNearlySpent", "GatewayRedisDegraded", "GatewayEventLoopLag"} <= names
    for rule in rules:
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        assert re.fullmatch(r"docs/operations\.md#[a-z0-9-]+", notes["runbook"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for name in names:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} never shown quiet"


def test_rules_tests_and_dashboard_use_only_exposed_metrics() -> None:
    exposed = exposed_names()
    sources = {
        "alerts.yml": ALERTS.read_text(),
        "alerts.test.yml": ALERT_TESTS.read_text(),
        "dashboard.json": "\n".join(dashboard_targets()),
    }
    for where, text in sources.items():
        used = set(METRIC.findall(text))
        assert used, where
        assert used <= exposed, f"{where} uses unknown metrics: {sorted(used - exposed)}"


def test_dashboard_is_valid_and_its_queries_parse(promtool: str, tmp_path: Path) -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "llm-gateway"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    assert all("gridPos" in p for p in data["panels"])
    assert [v["name"] for v in data["templating"]["list"]] == ["datasource", "tenant", "model"]
    titles = " | ".join(p["title"] for p in data["panels"]).lower()
    for wanted in ("in flight", "queued", "queue wait p99", "sheds", "rate-limit",
                   "concurrency limit", "breaker state", "tokens/s", "cost/s",
                   "time to first token", "redis mode", "redis latency", "event-loop lag"):
        assert wanted in titles, wanted
    # promtool parses PromQL only inside rule files: wrap each query as a recording rule
    exprs = [e.replace("$__rate_interval", "5m").replace("$tenant", ".*").replace("$model", ".*")
             for e in dashboard_targets()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
