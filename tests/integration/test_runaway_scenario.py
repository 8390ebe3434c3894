"""The runaway scenario (issue 22 item 4): run budgets stop looping agent runs.

config/scenarios/runaway.yaml, shortened, against a gateway in this process whose two tenants
differ only in run budgets (as bench/configs/runaway.yaml): `guarded` spends < 10 % of `open`,
and the runs that make progress complete at the same rate in both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from gateway.app import GATEWAY
from gateway.loadtest.engine import Engine, EngineOptions
from gateway.loadtest.report import build_report, render
from gateway.loadtest.scenario import load_scenario, parse_scenario
from gateway.request.auth import hash_key
from tests.plugin_gateway import MakeGateway

GATEWAY_CONFIG = Path(__file__).resolve().parent.parent.parent / "bench" / "configs" / "runaway.yaml"


async def test_run_budgets_cut_a_runaway_tenants_spend_below_a_tenth(
    make_gateway: MakeGateway
) -> None:
    shipped = yaml.safe_load(GATEWAY_CONFIG.read_text(encoding="utf-8"))[
        "tenants"]["guarded"]["run_budget"]
    gw = await make_gateway(tenants={
        "guarded": {"api_keys": [hash_key("sk-demo-guarded")], "run_budget": shipped},
        "open": {"api_keys": [hash_key("sk-demo-open")]},
    })
    data: dict[str, Any] = load_scenario("runaway").model_dump(exclude_defaults=True)
    for w in data["workloads"]:
        w["model"] = "gpt-test"
        if w["name"].startswith("looping"):
            w["steps"] = 80  # shorter than the shipped 150: a test, not a benchmark
    data["phases"][0]["duration_s"] = 5
    data["phases"][0]["upstream"] = {}
    data["target"] = str(gw.make_url("")).rstrip("/")
    scenario = parse_scenario(data)
    engine = Engine(scenario, scenario.api_keys(), EngineOptions(target=data["target"]))
    await engine.run()
    report = build_report(engine)
    runs = report["runs"]
    guarded, open_ = runs["tenants"]["guarded"], runs["tenants"]["open"]
    assert guarded["tokens"] < 0.10 * open_["tokens"], render(report)
    loopers = runs["workloads"]["looping-guarded"]
    assert loopers["runs"] >= 1 and loopers["stopped"] == {"run_budget_exceeded": loopers["runs"]}
    assert runs["workloads"]["looping-open"]["completion_ratio"] == 1.0
    working = [runs["workloads"][f"working-{t}"] for t in ("guarded", "open")]
    # When an honest run is refused (seen once in a full CI run, never reproduced alone), say
    # which cap it met: the guarded tenant's live runs as the gateway counted them.
    live = gw.app[GATEWAY].inflight.runs.snapshot(lambda _tenant: 3600.0, top=50)
    # (A string, not a tuple: pytest cuts a long repr of one, and the cap was cut off when it
    # recurred under a full CI run's load in 2026-12.)
    assert all(w["runs"] >= 3 and w["completion_ratio"] == 1.0 for w in working), (
        json.dumps({"working": working, "guarded_live_runs": live.get("guarded")},
                   default=str, indent=1))
    assert runs["biggest"][0]["tenant"] == "open"
    assert "agent runs" in render(report)
