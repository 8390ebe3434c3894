"""The ``admission:`` section of the policy file: priority classes, concurrency limits, shedding.

It imports only ``config_base`` (never ``config``), so ``config.py`` can import it at the top
without an import cycle.

Units are in the field names (``_ms``, ``_s``, ``_mib``). Defaults follow docs/architecture.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from .base import PositiveFloat, Priority, StrictModel

Share = Annotated[float, Field(gt=0, le=1)]


def _nothing_required(schema: dict[str, Any]) -> None:
    # Every key has a default where the section is used (ClassesSettings gives each class its
    # own): editors must accept a class given in part, as the policy loader does.
    schema.pop("required", None)


class ClassSettings(StrictModel):
    """How one priority class queues, how much of the limit it may use, its default deadline.
    The defaults are per class (``ClassesSettings``); a class given in part keeps the rest."""

    model_config = ConfigDict(json_schema_extra=_nothing_required)

    queue_target_ms: PositiveFloat = Field(
        description="CoDel target: when the minimum queueing delay of this class stays above "
        "this for a whole interval, the class (and every class below it) enters drop mode"
    )
    max_queue: int = Field(
        ge=0, description="waiting requests of this class per deployment; more are shed at once"
    )
    holdback_share: Share = Field(
        description="share of the concurrency limit this class may fill; a request of the class "
        "takes a slot only while in-flight stays within it, so the classes above find one. A "
        "share of the limit between whole slots (3.8 of 4) is kept over time while calls end "
        "within the queue target of the classes above: the fourth slot 80 % of the time"
    )
    default_deadline_s: PositiveFloat = Field(
        description="deadline when the client sends neither X-Request-Timeout nor "
        "x-stainless-read-timeout"
    )


class ClassesSettings(StrictModel):
    """One ``ClassSettings`` per priority class.

    Queue targets are short (1000/300/500/500 ms): they bound time spent waiting in this
    gateway, not the upstream's latency. An agent step that waits longer means the class is
    overloaded; shedding new runs then (runs in progress are spared) lets the runs under way
    finish, where long targets let every run crawl and few complete. Critical's is the longest
    of the upper classes: no class above it gains from shedding it, and critical demand near
    the upstream's capacity comes in bursts that a queue absorbs and shedding turns into
    failed runs."""

    critical: ClassSettings = ClassSettings(
        queue_target_ms=1000, max_queue=1000, holdback_share=1.0, default_deadline_s=60
    )
    high: ClassSettings = ClassSettings(
        queue_target_ms=300, max_queue=1000, holdback_share=0.95, default_deadline_s=120
    )
    normal: ClassSettings = ClassSettings(
        queue_target_ms=500, max_queue=1000, holdback_share=0.85, default_deadline_s=300
    )
    low: ClassSettings = ClassSettings(
        queue_target_ms=500, max_queue=100, holdback_share=0.70, default_deadline_s=600
    )

    def of(self, priority: Priority) -> ClassSettings:
        settings: ClassSettings = getattr(self, priority.name)
        return settings

    def holdback_shares(self) -> tuple[float, ...]:
        """Each class's holdback share, indexed by priority (critical first)."""
        return tuple(self.of(p).holdback_share for p in Priority)

    @model_validator(mode="after")
    def _shares_descend(self) -> ClassesSettings:
        shares = self.holdback_shares()
        if shares[0] != 1.0:
            raise ValueError("critical.holdback_share must be 1.0: nothing ranks above critical")
        if any(a < b for a, b in itertools.pairwise(shares)):
            raise ValueError("holdback_share must not grow from critical down to low")
        return self


LimitAlgorithm = Literal["vegas", "aimd"]


class ConcurrencySettings(StrictModel):
    """The adaptive concurrency limit of one deployment, per gateway replica: AIMD on errors,
    plus (``vegas``) a queue estimate from time to first token. The defaults are for an upstream
    whose capacity is unknown (docs/architecture.md, "How the concurrency limit finds
    capacity")."""

    min_limit: int = Field(default=4, ge=1, description="the limit never goes below this")
    initial_limit: int = Field(
        default=4, ge=1,
        description="the limit at start; it grows in slow start (half a slot per first token "
        "that comes at the no-load speed, or per success while no call streams: x1.5 a round "
        "trip) while the upstream shows no queueing, so starting low costs a few round trips, "
        "not capacity, and requests queued meanwhile wait for it instead of being shed (the "
        "first window measures the no-load time to first token)",
    )
    max_limit: int = Field(default=500, ge=1, description="the limit never goes above this")
    algorithm: LimitAlgorithm = Field(
        default="vegas",
        description="vegas: AIMD on errors plus the number of requests waiting inside the "
        "provider, estimated from time to first token above its no-load baseline (Little's "
        "law); aimd: errors only (for upstreams whose first token says nothing about load)",
    )
    upstream_queue_share: Share = Field(
        default=0.03,
        description="vegas: requests tolerated waiting inside the provider, as a share of the "
        "limit (at least upstream_queue_min); above it the limit drops by the excess, below "
        "half of it the limit may grow",
    )
    upstream_queue_min: PositiveFloat = Field(
        default=0.75,
        description="vegas: the tolerance never goes below this many requests (small limits)",
    )
    baseline_window_s: PositiveFloat = Field(
        default=30.0,
        description="vegas: the no-load time to first token is the lowest level seen within "
        "this many seconds (each window's smoothed level, plus what chance may have put it "
        "below the true one where first tokens scatter), so a slow period is forgotten after it",
    )
    decrease_factor: float = Field(
        default=0.9, gt=0, lt=1,
        description="multiplicative decrease on a provider 429, 5xx/529, connect error or "
        "first-byte timeout (at least down to the concurrency the provider served successfully "
        "in the window); applied at most once per decision window",
    )
    increase_step: PositiveFloat = Field(
        default=1.0,
        description="additive increase, at most once per decision window, on success while "
        "the limit is actually used",
    )
    decision_window_s: PositiveFloat = Field(
        default=1.0,
        description="at most one decrease and one increase per window, so a correlated burst "
        "of failures counts once",
    )
    min_utilization: Share = Field(
        default=0.5,
        description="the limit grows only while demand (in flight + queued) is at least this "
        "share of it",
    )
    latency_brake: float | None = Field(
        default=None, gt=1,
        description="optional: when time to first token per prompt size rises above this "
        "multiple of its baseline, treat successes as overload; null disables",
    )
    pace_by_rate_headers: bool = Field(
        default=True,
        description="send no faster than the provider's own request quota allows, as its "
        "answers report it (x-ratelimit-remaining-requests, anthropic-ratelimit-requests-"
        "remaining): requests wait in their class queue for the quota to refill instead of "
        "drawing 429s, and each class leaves 1 - holdback_share of the quota to the classes "
        "above (docs/architecture.md, \"Pacing by the provider's quota\")",
    )

    @classmethod
    def fit_defaults(cls, values: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
        """Bounds left out follow the bounds given: ``{max_limit: 2}`` for a two-slot server
        lowers the default minimum and start (4) to 2 rather than refusing the policy, and
        ``{min_limit: 50}`` starts at 50. Bounds given that contradict each other are still
        refused (``_ordered``)."""
        bounds = ("min_limit", "initial_limit", "max_limit")
        if not all(type(values.get(name)) is int and values[name] >= 1 for name in bounds):
            return values  # wrong types or values: validation names the key given
        low, start, high = (values[name] for name in bounds)
        if "min_limit" not in given:
            low = min([low] + [values[n] for n in ("initial_limit", "max_limit") if n in given])
        if "max_limit" not in given:
            high = max([high] + [values[n] for n in ("min_limit", "initial_limit") if n in given])
        if "initial_limit" not in given:
            start = min(max(start, low), high)
        return values | {"min_limit": low, "initial_limit": start, "max_limit": high}

    @model_validator(mode="before")
    @classmethod
    def _fit_left_out(cls, data: Any) -> Any:
        """Validated on its own (not laid over a default by ``overlay``): the keys left out
        take their defaults, fitted to the bounds given."""
        if not isinstance(data, dict) or all(name in data for name in cls.model_fields):
            return data
        defaults = {name: field.default for name, field in cls.model_fields.items()}
        return cls.fit_defaults(defaults | data, data.keys())

    @model_validator(mode="after")
    def _ordered(self) -> ConcurrencySettings:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need min_limit <= initial_limit <= max_limit")
        return self


class ConcurrencyOverride(StrictModel):
    """Per-deployment changes to ``concurrency``; unset fields keep the shared value, except
    that the bounds left out (``min_limit``, ``initial_limit``, ``max_limit``) are fitted to
    the ones given: ``{max_limit: 2}`` lowers a shared floor of 4 to 2 for this deployment."""

    min_limit: int | None = Field(default=None, ge=1, description="see concurrency.min_limit")
    initial_limit: int | None = Field(
        default=None, ge=1, description="see concurrency.initial_limit")
    max_limit: int | None = Field(default=None, ge=1, description="see concurrency.max_limit")
    algorithm: LimitAlgorithm | None = Field(
        default=None, description="see concurrency.algorithm")
    upstream_queue_share: Share | None = Field(
        default=None, description="see concurrency.upstream_queue_share")
    upstream_queue_min: PositiveFloat | None = Field(
        default=None, description="see concurrency.upstream_queue_min")
    baseline_window_s: PositiveFloat | None = Field(
        default=None, description="see concurrency.baseline_window_s")
    decrease_factor: float | None = Field(default=None, gt=0, lt=1,
                                          description="see concurrency.decrease_factor")
    increase_step: PositiveFloat | None = Field(default=None,
                                                description="see concurrency.increase_step")
    decision_window_s: PositiveFloat | None = Field(
        default=None, description="see concurrency.decision_window_s")
    min_utilization: Share | None = Field(default=None,
                                          description="see concurrency.min_utilization")
    latency_brake: float | None = Field(default=None, gt=1,
                                        description="see concurrency.latency_brake")
    pace_by_rate_headers: bool | None = Field(
        default=None, description="see concurrency.pace_by_rate_headers")


class SelfProtectionSettings(StrictModel):
    """Limits on the gateway process itself; crossing one sheds the lowest classes at the door.

    At 1x a limit ``low`` is shed, at 1.5x ``normal`` too, at 2x ``high`` too; never ``critical``.
    """

    max_loop_lag_ms: PositiveFloat = Field(
        default=200, description="event-loop scheduling delay measured by a periodic probe"
    )
    max_open_streams: int = Field(
        default=4096, ge=1, description="streamed responses being relayed"
    )
    max_rss_mib: PositiveFloat | None = Field(
        default=None,
        description="resident memory; null: 85% of the cgroup memory limit when there is one, "
        "else no memory check",
    )
    lag_probe_interval_ms: PositiveFloat = Field(
        default=100, description="how often the probe runs"
    )
    tenant_work_share: float = Field(
        default=0.5, gt=0, le=1, description="event-loop seconds per second one tenant's "
        "requests may take before its own limits run (reading bodies as JSON, checking them, "
        "counting prompts), beyond tenant_work_burst_s ahead; past it the tenant gets 429 "
        "too_much_request_work with Retry-After, before its next body is read. Its limits "
        "count requests and tokens, not what a body costs to read, and a body refused as bad "
        "input counts against none of them"
    )
    tenant_work_burst_s: PositiveFloat = Field(
        default=1.0, description="event-loop seconds a tenant may take ahead of "
        "tenant_work_share (a burst of big bodies)"
    )
    rss_sample_s: PositiveFloat = Field(
        default=1.0, description="RSS is read at most this often"
    )


class AdmissionPolicy(StrictModel):
    """Admission control: per-deployment concurrency limits, priority queues, shedding and
    deadlines."""

    classes: ClassesSettings = ClassesSettings()
    concurrency: ConcurrencySettings = ConcurrencySettings()
    deployments: dict[str, ConcurrencyOverride] = Field(
        default={},
        description="overrides of `concurrency` keyed by deployment label provider/model",
    )
    codel_interval_ms: PositiveFloat = Field(
        default=1000, description="CoDel interval: drop mode is decided once per interval"
    )
    cohort_buckets: int = Field(
        default=128, ge=2, le=4096,
        description="agent sessions hash into this many cohorts; shedding moves a threshold "
        "across them so every replica drops the same runs",
    )
    cohort_step_up: int = Field(
        default=16, ge=1,
        description="cohorts added to the shed threshold per interval of overload",
    )
    cohort_step_down: int = Field(
        default=4, ge=1,
        description="cohorts taken off the shed threshold per interval without overload",
    )
    run_memory_s: float = Field(
        default=120.0, ge=0,
        description="a session admitted within this many seconds (on this replica) counts as "
        "a run in progress: cohort shedding spares it until the level passes its whole class; "
        "0: no run is spared. X-Agent-Step is not trusted for this (a client could set it)",
    )
    holdback_memory_s: PositiveFloat = Field(
        default=60.0,
        description="a class holds back its reserve of slots (1 - holdback_share of the "
        "concurrency limit) only while a class above it has had a request granted or queued "
        "at the deployment within this many seconds; otherwise it may fill the whole limit, so "
        "a tenant that sends one class is not held below the provider's capacity. Raise it "
        "where a rare class above must always find a free slot at once. (The reserves of the "
        "provider's request quota stay, whoever is present)",
    )
    ttft_prior_s: PositiveFloat = Field(
        default=1.0,
        description="expected time to first byte of a deployment before any is measured",
    )
    drain_window_s: PositiveFloat = Field(
        default=10.0, description="time constant of the measured drain (completion) rate"
    )
    retry_after_min_s: PositiveFloat = Field(default=1.0, description="lower bound of Retry-After")
    retry_after_max_s: float = Field(
        default=30.0, gt=0, le=60,
        description="upper bound of Retry-After (at most 60: the Anthropic SDK honours any value)",
    )
    retry_after_jitter: float = Field(
        default=0.5, ge=0, lt=1,
        description="Retry-After is drawn uniformly from its base value times 1 +- this",
    )
    max_deadline_s: PositiveFloat = Field(
        default=900.0,
        description="no request deadline is longer than this, whatever the client asks",
    )
    tenant_max_deadline_s: dict[str, PositiveFloat] = Field(
        default={}, description="tighter deadline caps for some tenants, keyed by tenant name"
    )
    self_protection: SelfProtectionSettings = SelfProtectionSettings()
    shadow: bool = Field(
        default=False,
        description="shadow mode: sheds are logged and counted as would_shed, nothing is "
        "refused (deadline 504s still apply)",
    )

    @model_validator(mode="after")
    def _check(self) -> AdmissionPolicy:
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ValueError("retry_after_min_s is above retry_after_max_s")
        for label in self.deployments:
            self.concurrency_for(label)  # raises when the merged bounds are out of order
        return self

    def concurrency_for(self, deployment: str) -> ConcurrencySettings:
        """The shared ``concurrency`` settings with this deployment's overrides applied."""
        override = self.deployments.get(deployment)
        if override is None:
            return self.concurrency
        given = override.model_dump(exclude_none=True)
        merged = ConcurrencySettings.fit_defaults(self.concurrency.model_dump() | given, given)
        try:
            return ConcurrencySettings.model_validate(merged)
        except ValidationError as exc:
            reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise ValueError(f"deployments.{deployment}: {reason}") from None

    def deadline_cap_s(self, tenant: str) -> float:
        """The longest deadline this tenant may have."""
        return min(self.max_deadline_s, self.tenant_max_deadline_s.get(tenant, self.max_deadline_s))
