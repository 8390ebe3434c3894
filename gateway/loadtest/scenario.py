"""Load-test scenarios: one YAML file, validated strictly (unknown keys are errors).

A scenario is a list of **phases** run back to back. Each phase has an **arrival process**
(how often new agent runs start), the **upstream knobs** sent to the mock upstream during it,
an optional **mix** override, and an optional shell **hook** run when it starts. Every arrival
starts one **run** of a **workload** drawn by weight: ``steps`` dependent requests sharing one
``X-Agent-Session``, with think time between them (``steps: 1`` is a plain request).

Arrival rates are in runs per second, so a 10-step workload at ``rate: 5`` offers about 50
requests/s while its runs survive. Sizes and times are lognormal, given as a median and a
p99 (``{median: 200, p99: 2000}``); a median alone is a constant; ``slow_share`` and
``slow_factor`` make a share of the draws that many times larger (a provider's slow few). See
config/scenarios/ for examples and docs/benchmarks.md for how the shipped ones behave.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, NonNegativeFloat, ValidationError, model_validator

from gateway.config import PositiveFloat, PriorityName, StrictModel

__all__ = ["Arrival", "Dist", "Phase", "Scenario", "ScenarioError", "Workload", "load_scenario"]

MAX_PHASE_S = 3600.0
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


class Dist(StrictModel):
    """A lognormal distribution by its median and 99th percentile, clipped to [min, max]; a
    ``slow_share`` of the draws ``slow_factor`` times larger (before clipping).

    Given whole, never laid over a field's default distribution: ``{median: 20}`` is the
    constant 20, not a median of 20 with the default's p99 (the policy's partial sections
    did that to every scenario from 636c143 on, and a working run of the runaway scenario
    then drew an 11k-token step now and then and met its run budget)."""

    overlays_defaults: ClassVar[bool] = False

    median: PositiveFloat
    p99: PositiveFloat | None = Field(default=None, description="None: the median, always")
    min: float = Field(default=0.0, ge=0)
    max: float | None = Field(default=None, gt=0)
    slow_share: float = Field(
        default=0.0, ge=0, lt=1,
        description="a share of the draws that is slow_factor times larger; for a first token, "
        "a provider's slow few (a cache miss, a busy replica), which no lognormal's tail has "
        "as they come")
    slow_factor: float = Field(default=1.0, ge=1,
                               description="how many times larger the slow_share of draws is")

    @model_validator(mode="after")
    def _ordered(self) -> Dist:
        if self.p99 is not None and self.p99 < self.median:
            raise ValueError("p99 must be at least the median")
        if self.slow_share > 0 and self.slow_factor <= 1:
            raise ValueError("a slow_share needs a slow_factor above 1")
        return self

    @property
    def sigma(self) -> float:
        """The lognormal's shape (0: the median, always)."""
        return 0.0 if self.p99 is None else math.log(self.p99 / self.median) / _Z99

    def mean(self) -> float:
        """The mean of the draws before clipping: ``median x exp(sigma^2 / 2)``, and the slow
        share's on top."""
        slow = 1.0 + self.slow_share * (self.slow_factor - 1.0)
        return self.median * math.exp(self.sigma * self.sigma / 2) * slow

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A function drawing one value."""
        lo, hi = self.min, self.max if self.max is not None else math.inf
        share, factor = self.slow_share, self.slow_factor
        if self.sigma == 0.0 and share == 0.0:
            value = min(hi, max(lo, self.median))
            return lambda: value
        mu, sigma = math.log(self.median), self.sigma
        draw = rng.lognormvariate
        chance = rng.random

        def one() -> float:
            value = draw(mu, sigma) if sigma else self.median
            if share and chance() < share:
                value *= factor
            return min(hi, max(lo, value))

        return one


class Tenant(StrictModel):
    """An API key the generator sends as ``Authorization: Bearer``."""

    api_key: str | None = None
    api_key_env: str | None = Field(default=None, description="read the key from this variable")

    @model_validator(mode="after")
    def _one(self) -> Tenant:
        if (self.api_key is None) == (self.api_key_env is None):
            raise ValueError("set exactly one of api_key, api_key_env")
        return self


class Workload(StrictModel):
    """One kind of traffic: who sends it, at which class, how big, how many steps."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    weight: float = Field(default=1.0, ge=0)
    tenant: str
    priority: PriorityName | None = Field(default=None, description="X-Priority; None: not sent")
    model: str = "gpt-4o-mini"
    stream: float = Field(default=0.0, ge=0, le=1, description="share of requests that stream")
    steps: int = Field(default=1, ge=1, le=1000, description="requests per agent run")
    think_ms: Dist = Dist(median=200, p99=1000)
    prompt_tokens: Dist = Dist(median=300, p99=3000, max=32000)
    max_tokens: Dist = Dist(median=64, p99=512, min=1, max=4096)
    output_tokens: Dist | None = Field(
        default=None, description="tokens the mock answers (x-mock-chunks); None: max_tokens"
    )
    deadline_s: PositiveFloat | None = Field(
        default=None, description="sent as X-Request-Timeout; goodput counts answers within it"
    )
    timeout_s: PositiveFloat = Field(default=120.0, description="the client gives up after this")
    tool_calls: Literal["none", "distinct", "loop"] = Field(
        default="none", description="each step resends the run's history, as agent frameworks "
        "do: distinct: every earlier step called a tool with new arguments (an agent making "
        "progress); loop: every earlier step called the same tool with the same arguments "
        "(an agent stuck waiting for external data); none: no history"
    )


class Client(StrictModel):
    """How the simulated client reacts to errors."""

    retries: int = Field(default=0, ge=0, le=5, description="extra attempts per request")
    backoff: Literal["sdk", "none"] = Field(
        default="sdk", description="sdk: the OpenAI SDK's backoff, Retry-After and x-should-retry; "
        "none: retry at once"
    )
    max_retry_after_s: PositiveFloat = Field(
        default=120.0, description="a longer Retry-After means do not retry (the openai SDK's rule)"
    )
    connections: int = Field(default=0, ge=0, description="connection pool size; 0: unlimited")


class Arrival(StrictModel):
    """When runs start. Open loop unless ``process: closed``, which hides queueing."""

    process: Literal["poisson", "constant", "onoff", "ramp", "spike", "diurnal", "closed"]
    rate: float = Field(default=0.0, ge=0, description="runs/s (onoff: while on; ramp: at the start)")
    off_rate: float = Field(default=0.0, ge=0, description="onoff: runs/s while off")
    on_s: PositiveFloat = Field(default=1.0, description="onoff: length of a burst")
    off_s: PositiveFloat = Field(default=4.0, description="onoff: gap between bursts")
    to_rate: float = Field(default=0.0, ge=0, description="ramp: runs/s at the end of the phase")
    spike_rate: float = Field(default=0.0, ge=0, description="spike: runs/s during the spike")
    spike_at_s: float = Field(default=0.0, ge=0, description="spike: start, from the phase start")
    spike_s: PositiveFloat = Field(default=1.0, description="spike: length")
    period_s: PositiveFloat = Field(default=60.0, description="diurnal: one day, compressed")
    amplitude: float = Field(default=0.8, ge=0, le=1, description="diurnal: swing around rate")
    concurrency: int = Field(default=0, ge=0, le=100_000, description="closed: runs kept going")

    @model_validator(mode="after")
    def _closed_has_workers(self) -> Arrival:
        if self.process == "closed" and self.concurrency < 1:
            raise ValueError("a closed-loop phase needs concurrency >= 1")
        return self


class Outage(StrictModel):
    """A window inside a phase during which every request is told to fail upstream."""

    at_s: float = Field(ge=0)
    duration_s: PositiveFloat
    status: int = Field(default=503, ge=400, le=599)
    fail: Literal["drop", "hang", "midstream-cut", "midstream-error"] | None = None


class Upstream(StrictModel):
    """Knobs for the mock upstream, sent as x-mock-* headers (the gateway must forward them:
    ``forward_headers: ["x-mock-*"]``, as config/example.yaml does)."""

    latency_ms: float | None = Field(default=None, ge=0)
    ttft_ms: NonNegativeFloat | Dist | None = Field(
        default=None,
        description="first token delay: a constant, or a distribution drawn per request (a "
        "provider's first tokens scatter by themselves: bench/overload.py --ttft-p99-ms)")
    chunk_gap_ms: float | None = Field(default=None, ge=0)
    fail_rate: float | None = Field(default=None, ge=0, le=1)
    status: int | None = Field(default=None, ge=400, le=599, description="error status of fail_rate")
    fail: Literal["drop", "hang", "midstream-cut", "midstream-error"] | None = None
    retry_after_s: float | None = Field(default=None, ge=0)
    outages: list[Outage] = Field(default=[], description="failure windows")
    headers: dict[str, str] = Field(default={}, description="any other header, sent as is")


class Hook(StrictModel):
    """A shell command run when the phase starts (only with --allow-hooks)."""

    command: str = Field(min_length=1)
    timeout_s: PositiveFloat = 30.0


class Phase(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    duration_s: float = Field(gt=0, le=MAX_PHASE_S)
    arrival: Arrival
    upstream: Upstream = Upstream()
    mix: dict[str, float] | None = Field(default=None, description="workload weights for this phase")
    hook: Hook | None = None


class Scenario(StrictModel):
    """The whole file."""

    name: str
    description: str = ""
    target: str = Field(default="http://127.0.0.1:8080", description="--target overrides")
    path: str = "/v1/chat/completions"
    seed: int | None = None
    tenants: dict[str, Tenant] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    client: Client = Client()
    phases: list[Phase] = Field(min_length=1)
    drain_s: float = Field(default=30.0, ge=0, le=600, description="wait for in-flight runs after")
    max_requests: int = Field(default=1_000_000, ge=1, description="attempts, retries included")
    bucket_s: PositiveFloat | None = Field(default=None, description="timeline resolution (auto)")

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        names = [w.name for w in self.workloads]
        if len(set(names)) != len(names):
            raise ValueError("workload names must be unique")
        for w in self.workloads:
            if w.tenant not in self.tenants:
                raise ValueError(f"workload {w.name}: unknown tenant {w.tenant!r}")
        phase_names = [p.name for p in self.phases]
        if len(set(phase_names)) != len(phase_names):
            raise ValueError("phase names must be unique")
        for p in self.phases:
            for name in p.mix or {}:
                if name not in names:
                    raise ValueError(f"phase {p.name}: mix names unknown workload {name!r}")
            if not any(self.weights(p)):
                raise ValueError(f"phase {p.name}: every workload weight is 0")
        return self

    @property
    def duration_s(self) -> float:
        """Length of all phases, without the drain."""
        return sum(p.duration_s for p in self.phases)

    def api_keys(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Each tenant's key: from ``overrides``, the file or its environment variable;
        ``ScenarioError`` when one is missing."""
        keys = {}
        for name, tenant in self.tenants.items():
            key = (overrides or {}).get(name) or tenant.api_key or os.environ.get(
                tenant.api_key_env or "", "")
            if not key:
                raise ScenarioError(f"no API key for tenant {name} (set ${tenant.api_key_env} "
                                    "or pass --key)")
            keys[name] = key
        return keys

    def weights(self, phase: Phase) -> list[float]:
        """Workload weights in force during ``phase``, in ``workloads`` order."""
        mix = phase.mix or {}
        return [mix.get(w.name, w.weight if phase.mix is None else 0.0) for w in self.workloads]


class ScenarioError(Exception):
    """A scenario file that cannot be used; the message names the file and the key path."""


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate an already-loaded document."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: the file must contain a mapping at the top level")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{source}: {loc}: {str(msg).removeprefix('Value error, ')}")
        raise ScenarioError("\n".join(problems)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file (a path, or a name of a file in config/scenarios/)."""
    resolved = resolve_path(path)
    try:
        data = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{resolved}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{resolved}: not valid YAML: {exc}") from None
    return parse_scenario(data, str(resolved))


def resolve_path(path: str | Path) -> Path:
    """``burst`` -> ``config/scenarios/burst.yaml`` when no such file exists as given."""
    given = Path(path)
    if given.exists() or given.suffix:
        return given
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "config" / "scenarios" / f"{given.name}.yaml"
        if candidate.exists():
            return candidate
    return given
