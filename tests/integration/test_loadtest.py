"""Unit tests of the load tester: scenarios, arrival processes, the SDK retry rule, statistics,
reports, the live view, hooks and the safety checks. No network."""

from __future__ import annotations

import io
import itertools
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.loadtest.arrivals import arrival_times, expected_count, rate_at
from gateway.loadtest.cli import check_target
from gateway.loadtest.cli import main as loadtest_main
from gateway.loadtest.client import AttemptResult, classify_error, parse_retry_after, retry_delay
from gateway.loadtest.hist import Histogram
from gateway.loadtest.hooks import run_hook
from gateway.loadtest.scenario import (
    Arrival,
    Client,
    Dist,
    Hook,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from gateway.loadtest.traffic import PhaseKnobs, SyntheticText

SCENARIOS = Path(__file__).resolve().parent.parent.parent / "config" / "scenarios"


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t", "tenants": {"a": {"api_key": "k"}},
        "workloads": [{"name": "w", "tenant": "a"}],
        "phases": [{"name": "p", "duration_s": 1, "arrival": {"process": "poisson", "rate": 1}}],
    }
    data.update(extra)
    return data


# --- scenarios ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads_and_is_bounded(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.duration_s + scenario.drain_s <= 300
    assert scenario.target.startswith("http://127.0.0.1:")
    assert scenario.api_keys()


def test_shipped_scenarios_cover_the_issue() -> None:
    names = {p.stem for p in SCENARIOS.glob("*.yaml")}
    assert {"steady", "burst", "spike-and-recover", "diurnal", "brownout",
            "redis-outage"} <= names
    drill = load_scenario("redis-outage")
    assert [p.hook is not None for p in drill.phases] == [False, True, True]


def test_a_scenario_name_resolves_to_the_shipped_file() -> None:
    assert load_scenario("burst").name == "burst"


@pytest.mark.parametrize(("change", "message"), [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"workloads": [{"name": "w", "tenant": "nobody"}]}, "unknown tenant 'nobody'"),
    ({"phases": [{"name": "p", "duration_s": 7200, "arrival": {"process": "poisson"}}]},
     "phases.0.duration_s"),
    ({"phases": [{"name": "p", "duration_s": 1, "arrival": {"process": "closed"}}]},
     "closed-loop phase needs concurrency"),
    ({"phases": [{"name": "p", "duration_s": 1, "arrival": {"process": "poisson"},
                  "mix": {"nope": 1}}]}, "unknown workload 'nope'"),
])
def test_bad_scenarios_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(minimal(**change), "x.yaml")


def test_lognormal_by_median_and_p99() -> None:
    draw = Dist(median=100, p99=1000).sampler(random.Random(1))
    values = sorted(draw() for _ in range(20000))
    assert values[10000] == pytest.approx(100, rel=0.05)
    assert values[19800] == pytest.approx(1000, rel=0.1)
    assert Dist(median=5).sampler(random.Random(1))() == 5
    clipped = Dist(median=100, p99=1000, max=150).sampler(random.Random(1))
    assert max(clipped() for _ in range(1000)) == 150


def test_a_slow_share_of_draws_is_that_much_slower() -> None:
    """A provider's slow few: 2 % of first tokens 5x the rest, on a constant or a lognormal."""
    draw = Dist(median=400, slow_share=0.02, slow_factor=5).sampler(random.Random(1))
    values = [draw() for _ in range(20000)]
    assert set(values) == {400, 2000}
    assert values.count(2000) / len(values) == pytest.approx(0.02, rel=0.15)
    assert Dist(median=400, slow_share=0.02, slow_factor=5).mean() == pytest.approx(432)
    scattered = Dist(median=400, p99=600, slow_share=0.01, slow_factor=10, max=5000)
    draw = scattered.sampler(random.Random(2))
    draws = sorted(draw() for _ in range(20000))
    assert draws[10000] == pytest.approx(400, rel=0.05)
    assert sum(d > 2000 for d in draws) / len(draws) == pytest.approx(0.01, rel=0.2)
    assert max(draws) == 5000  # the factor applies before the clip
    # Without a slow share the draws are the plain lognormal's, number for number: shipped
    # scenarios and their seeds draw what they drew before.
    plain, rng = Dist(median=100, p99=1000).sampler(random.Random(3)), random.Random(3)
    sigma = Dist(median=100, p99=1000).sigma
    assert [plain() for _ in range(50)] == [rng.lognormvariate(math.log(100), sigma)
                                            for _ in range(50)]
    with pytest.raises(ValueError, match="slow_factor"):
        Dist(median=400, slow_share=0.02)  # a slow share that is not slower


def test_a_median_alone_in_a_scenario_is_a_constant() -> None:
    """A workload's distribution given in part is the whole distribution, not laid over the
    field's default (median 300, p99 3000): the runaway scenario's working runs then drew
    11k-token steps now and then and met their run budget (a flaky CI test)."""
    workload = {"name": "w", "tenant": "a", "think_ms": {"median": 20},
                "prompt_tokens": {"median": 300}, "max_tokens": {"median": 64}}
    w = parse_scenario(minimal(workloads=[workload])).workloads[0]
    rng = random.Random(1)
    for dist, value in ((w.think_ms, 20), (w.prompt_tokens, 300), (w.max_tokens, 64)):
        draw = dist.sampler(rng)
        assert {draw() for _ in range(200)} == {value}
    shipped = load_scenario("runaway").workloads
    assert all(w.prompt_tokens.p99 is None and w.think_ms.p99 is None for w in shipped)


def test_phase_mix_overrides_weights() -> None:
    data = minimal(workloads=[{"name": "a", "tenant": "a"}, {"name": "b", "tenant": "a"}])
    data["phases"][0]["mix"] = {"b": 2}
    scenario = parse_scenario(data)
    assert scenario.weights(scenario.phases[0]) == [0.0, 2.0]


# --- arrivals --------------------------------------------------------------------------------


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_poisson_has_the_rate_and_exponential_gaps() -> None:
    times = list(arrival_times(Arrival(process="poisson", rate=200), 50, random.Random(3)))
    assert len(times) == pytest.approx(10_000, abs=300)  # 3 sigma = 300
    gaps = _gaps(times)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1.0, abs=0.05)  # exponential gaps: coefficient of variation 1
    assert all(0 <= t < 50 for t in times) and times == sorted(times)


def test_constant_is_evenly_spaced() -> None:
    times = list(arrival_times(Arrival(process="constant", rate=10), 2, random.Random(0)))
    assert len(times) == 20 and max(_gaps(times)) == pytest.approx(0.1)


def _counts(times: list[float], window: float, duration: float) -> list[int]:
    counts = [0] * int(duration / window)
    for t in times:
        counts[int(t / window)] += 1
    return counts


def test_onoff_bursts_have_their_rates_and_are_bursty() -> None:
    arrival = Arrival(process="onoff", rate=400, off_rate=20, on_s=1, off_s=3)
    times = list(arrival_times(arrival, 40, random.Random(5)))
    on = [t for t in times if t % 4 < 1]
    assert len(on) / 10 == pytest.approx(400, rel=0.05)  # ten 1-s bursts
    assert (len(times) - len(on)) / 30 == pytest.approx(20, rel=0.15)
    counts = _counts(times, 0.5, 40)
    dispersion = statistics.pvariance(counts) / statistics.fmean(counts)
    assert dispersion > 20  # Poisson: ~1
    assert expected_count(arrival, 40) == pytest.approx(10 * 400 + 30 * 20, rel=0.01)


def test_ramp_spike_and_diurnal_follow_their_rate() -> None:
    ramp = Arrival(process="ramp", rate=0, to_rate=400)
    times = list(arrival_times(ramp, 10, random.Random(7)))
    first, second = sum(t < 5 for t in times), sum(t >= 5 for t in times)
    assert first == pytest.approx(500, rel=0.1) and second == pytest.approx(1500, rel=0.1)
    spike = Arrival(process="spike", rate=10, spike_rate=500, spike_at_s=2, spike_s=1)
    times = list(arrival_times(spike, 5, random.Random(8)))
    assert sum(2 <= t < 3 for t in times) == pytest.approx(500, rel=0.15)
    diurnal = Arrival(process="diurnal", rate=100, amplitude=1, period_s=10)
    assert rate_at(diurnal, 0, 10) == 0 and rate_at(diurnal, 5, 10) == pytest.approx(200)
    times = list(arrival_times(diurnal, 10, random.Random(9)))
    assert sum(4 <= t < 6 for t in times) > 5 * sum(t < 1 or t >= 9 for t in times)


# --- the SDK-like client -------------------------------------------------------------------


def _result(status: int, outcome: str, **kw: Any) -> AttemptResult:
    return AttemptResult(status, outcome, 0.0, **kw)


def test_retry_rule_matches_the_official_sdks() -> None:
    sdk, rng = Client(retries=2), random.Random(1)
    assert retry_delay(sdk, _result(429, "rate_limited", retry_after_s=0.3), 0, rng) == 0.3
    assert retry_delay(sdk, _result(429, "rate_limited", retry_after_s=200), 0, rng) is None
    assert retry_delay(sdk, _result(503, "shed", should_retry=False), 0, rng) is None
    assert retry_delay(sdk, _result(400, "client_error", should_retry=True), 0, rng) is not None
    assert retry_delay(sdk, _result(400, "client_error"), 0, rng) is None
    assert retry_delay(sdk, _result(200, "stream_error"), 0, rng) is None  # after first byte
    first = retry_delay(sdk, _result(0, "transport"), 0, rng)
    second = retry_delay(sdk, _result(500, "upstream_error"), 1, rng)
    assert first is not None and 0.375 <= first <= 0.5
    assert second is not None and 0.75 <= second <= 1.0
    assert retry_delay(sdk, _result(500, "upstream_error"), 2, rng) is None  # 3 attempts
    assert retry_delay(Client(retries=0), _result(500, "upstream_error"), 0, rng) is None
    assert retry_delay(Client(retries=1, backoff="none"), _result(0, "timeout"), 0, rng) == 0.0


def test_retry_after_headers_and_outcomes() -> None:
    assert parse_retry_after({"retry-after-ms": "300", "retry-after": "1"}) == 0.3
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    date = "Wed, 21 Oct 2015 07:28:10 GMT"
    assert parse_retry_after({"retry-after": date}, now_epoch_s=1445412480.0) == 10.0
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    assert classify_error(503, "overloaded") == "shed"
    assert classify_error(503, "upstream_unavailable") == "upstream_error"
    assert classify_error(429, None) == "rate_limited"
    assert classify_error(504, "deadline_exceeded") == "deadline"
    assert classify_error(403, None) == "client_error"


def test_prompts_are_synthetic_and_sized() -> None:
    text = SyntheticText(random.Random(0))
    prompt = text.prompt(500, random.Random(1))
    assert len(prompt) == 2000 and prompt.isascii()
    assert len(text.prompt(100_000, random.Random(1))) == 400_000


def test_outage_windows_switch_the_knobs() -> None:
    scenario = parse_scenario(minimal(phases=[{
        "name": "p", "duration_s": 10, "arrival": {"process": "poisson"},
        "upstream": {"ttft_ms": 100, "outages": [{"at_s": 2, "duration_s": 1, "status": 502}]},
    }]))
    knobs = PhaseKnobs(scenario.phases[0], random.Random(0))
    assert knobs.headers(1.0) == {"x-mock-ttft-ms": "100"}
    assert knobs.headers(2.5) == {"x-mock-ttft-ms": "100", "x-mock-status": "502",
                                  "x-mock-fail-rate": "1"}


def test_a_first_token_delay_given_as_a_distribution_is_drawn_per_request() -> None:
    """A provider's first tokens scatter: the mock is asked for a different delay each time,
    spread as the distribution says (here a median of 400 ms and a p99 of 1,600)."""
    scenario = parse_scenario(minimal(phases=[{
        "name": "p", "duration_s": 10, "arrival": {"process": "poisson"},
        "upstream": {"ttft_ms": {"median": 400, "p99": 1600}, "chunk_gap_ms": 5},
    }]))
    knobs = PhaseKnobs(scenario.phases[0], random.Random(0))
    drawn = []
    for _ in range(2000):
        headers = knobs.headers(1.0)
        assert headers["x-mock-chunk-gap-ms"] == "5"
        drawn.append(float(headers["x-mock-ttft-ms"]))
    drawn.sort()
    assert 370 <= drawn[1000] <= 430 and 1300 <= drawn[1980] <= 1950, (drawn[1000], drawn[1980])


# --- histograms, safety, hooks -----------------------------------------------------------------


def test_histogram_percentiles_are_within_its_precision() -> None:
    hist, values = Histogram(), [i / 1000 for i in range(1, 10_001)]  # 1 ms .. 10 s
    for v in values:
        hist.record(v)
    summary = hist.summary_ms()
    assert summary["p50"] == pytest.approx(5000, rel=0.002)
    assert summary["p99"] == pytest.approx(9900, rel=0.002)
    assert summary["max"] == 10_000 and summary["mean"] == pytest.approx(5000.5, rel=1e-4)
    both = Histogram()
    both.add(hist)
    both.add(hist)
    assert both.count == 20_000 and both.percentile_ms(50) == summary["p50"]
    assert Histogram().summary_ms()["p99"] is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:1/v1",
                                 "http://127.9.9.9", "http://[::1]:8080"])
def test_loopback_targets_are_allowed(url: str) -> None:
    check_target(url, allow_remote=False)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "https://api.openai.com",
                                 "http://192.168.1.2", "ftp://127.0.0.1"])
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(SystemExit, match="refusing|must be"):
        check_target(url, allow_remote=False)


def test_cli_refuses_a_remote_target_before_sending_anything(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--allow-remote"):
        loadtest_main(["burst", "--target", "http://10.1.2.3:8080", "--out",
                       str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_cli_refuses_scenarios_longer_than_max_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest_main(["burst", "--max-duration", "10"]) == 2
    assert "over --max-duration" in capsys.readouterr().err


async def test_hooks_are_off_unless_allowed(tmp_path: Path) -> None:
    hook = Hook(command=f"echo $LOADTEST_PHASE > {tmp_path}/out; echo done")
    skipped = await run_hook(hook, phase="p1", scenario="s", target="t", allowed=False, at_s=0)
    assert "skipped" in skipped and not (tmp_path / "out").exists()
    ran = await run_hook(hook, phase="p1", scenario="s", target="t", allowed=True, at_s=0)
    assert ran["exit_status"] == 0 and ran["output"] == "done\n"
    assert (tmp_path / "out").read_text() == "p1\n"
    slow = await run_hook(Hook(command="sleep 5", timeout_s=0.2), phase="p", scenario="s",
                          target="t", allowed=True, at_s=0)
    assert slow["timed_out"] is True and slow["seconds"] < 2


def test_live_view_redraws_on_a_tty_and_prints_lines_otherwise() -> None:
    from gateway.loadtest.engine import Engine, EngineOptions
    from gateway.loadtest.live import LiveView

    engine = Engine(parse_scenario(minimal()), {"a": "k"}, EngineOptions(target="http://x"))
    engine.live.started, engine.live.outcomes[0] = 10, 8
    engine.live.latency.record(0.2)
    tty_out, plain_out = io.StringIO(), io.StringIO()
    tty, plain = LiveView(engine, tty_out, tty=True), LiveView(engine, plain_out, tty=False)
    for view in (tty, plain):
        view.draw(1.0)
        view.draw(2.0)
    assert "\x1b[4F\x1b[J" in tty_out.getvalue()  # cursor up over the 4-line block, clear
    lines = plain_out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in plain_out.getvalue()
    assert "ok 8" in lines[0] and "p50 200 ms" in lines[0]


async def test_the_outage_drill_runs_a_list_of_commands_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Cluster takes several commands to stop: the drill's hook passed
    ``for p in ...; do ...; done`` to the shell as one word ("for: not found"), and Redis was
    never stopped. The command in the environment is now run as shell code."""
    drill = load_scenario("redis-outage")
    stop = next(p.hook for p in drill.phases if p.hook is not None)
    monkeypatch.setenv("LOADTEST_REDIS_STOP", "for p in 1 2; do echo stop $p; done && echo ok")
    ran = await run_hook(stop, phase="redis-down", scenario="redis-outage", target="t",
                         allowed=True, at_s=0)
    assert (ran["exit_status"], ran["output"]) == (0, "stop 1\nstop 2\nok\n")


def test_a_drill_whose_hook_failed_exits_4_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failed hook (the fault never injected) was one trailing line and exit 0: a drill in
    CI passed without its outage."""
    scenario = minimal(target="http://127.0.0.1:9", drain_s=0, phases=[
        {"name": "down", "duration_s": 1.0, "arrival": {"process": "poisson", "rate": 1},
         "hook": {"command": "echo cannot stop it; exit 3"}}])
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(scenario))
    status = loadtest_main([str(path), "--allow-hooks", "--no-live", "--out",
                            str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert status == 4
    assert "hook at 0.0 s (down): exit 3: FAILED, the phase ran without it (cannot stop it)" \
        in out.out
    assert "1 hook(s) failed (phases down)" in out.err
    ok = minimal(target="http://127.0.0.1:9", drain_s=0, phases=[
        {"name": "up", "duration_s": 1.0, "arrival": {"process": "poisson", "rate": 1},
         "hook": {"command": "true"}}])
    path.write_text(yaml.safe_dump(ok))
    assert loadtest_main([str(path), "--allow-hooks", "--no-live", "--out",
                          str(tmp_path / "r.json")]) == 0
