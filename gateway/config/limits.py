"""Policy models for tenant limits, budgets, the runaway-agent guard and Redis trouble.

Kept apart from config.py so that file stays about the file's overall shape; these are the
knobs operators tune most. Every limit can be ``shadow: true``: evaluated, counted and reported
in ``x-gateway-shadow``, never enforced.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import PriorityName, StrictModel


class RateLimits(StrictModel):
    """Request, token and concurrency limits for one scope (tenant, tenant x model, session)."""

    requests_per_minute: int | None = Field(
        None, ge=1, description="steady request rate (GCRA); above it and its burst: 429"
    )
    request_burst: int | None = Field(
        None, ge=1, description="requests that may be sent at once (the bucket, refilled at "
        "requests_per_minute; x-ratelimit-remaining-requests is what it holds now) "
        "(default: a tenth of requests_per_minute, at least 1)"
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt estimate + max_tokens are reserved at admission and "
        "reconciled with the upstream's usage afterwards"
    )
    token_burst: int | None = Field(
        None, ge=1, description="tokens that may be reserved at once (the bucket, refilled "
        "at tokens_per_minute; x-ratelimit-remaining-tokens is what it holds now; a request "
        "reserving more is refused with no retry) (default: tokens_per_minute, a whole "
        "minute's worth, so any request that fits the per-minute limit can be admitted)"
    )
    max_concurrent: int | None = Field(None, ge=1, description="requests in flight at once")
    shadow: bool = Field(False, description="evaluate and report, never refuse")

    def is_empty(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)


# Routes counted by a request-only plan (gateway/app/endpoints.py) that a tenant may exempt from
# its request limits; the proxied routes, which carry tokens and budgets, never can be.
ExemptRoute = Literal[
    "GET /v1/models", "GET /v1/models/{model}", "GET /v1/deferred/{id}",
    "GET /v1/deferred/{id}/response", "DELETE /v1/deferred/{id}",
    "POST /v1/messages/count_tokens", "POST /v1/responses/input_tokens",
]

CacheReads = Literal["auto", "count", "exclude"]
CACHE_READS_DESCRIPTION = (
    "whether prompt tokens read from the provider's cache count: auto counts them when an "
    "OpenAI-compatible deployment served the request (OpenAI's TPM counts cached tokens) and "
    "excludes them when an Anthropic one did (its input-tokens-per-minute limit excludes "
    "cache reads on current models), whatever the client's dialect; see "
    "docs/architecture.md#accounting"
)


class TenantLimits(RateLimits):
    """A tenant's limits, optionally tighter per model and per agent session."""

    cache_reads: CacheReads = Field(
        "auto", description="tokens_per_minute (every scope of this tenant): "
        + CACHE_READS_DESCRIPTION
    )

    per_model: dict[str, RateLimits] = Field(
        {}, description="extra limits on this tenant's use of one model"
    )
    per_session: RateLimits | None = Field(
        None, description="limits for each X-Agent-Session, so one runaway run cannot eat "
        "its tenant's quota"
    )
    # 2 s rather than 1: a slot held by a one-second call frees a few tens of ms after the
    # second (the answer's relay and its settlement), so a 1 s wait lost that race and sent
    # the client a 429 it then had to retry (measured: six 1 s calls at max_concurrent 3
    # took 2.3-2.5 s with 1 s, instead of ~2 s).
    concurrency_wait_s: float = Field(
        2.0, ge=0, le=30, description="how long a request over a max_concurrent (tenant, "
        "model or session) waits for a slot to free before its 429; never past the request's "
        "deadline; 0 refuses at once"
    )
    exempt_routes: list[ExemptRoute] = Field(
        [], description="routes whose requests do not count against requests_per_minute "
        "(tenant and session), e.g. 'GET /v1/models'; default: none, every authenticated "
        "route is counted"
    )


class Budget(StrictModel):
    """Spend per UTC day and month, in tokens and/or money (the models' price table)."""

    daily_tokens: int | None = Field(
        None, ge=1, description="tokens (input + output) per UTC day; reset at 00:00 UTC"
    )
    monthly_tokens: int | None = Field(
        None, ge=1, description="tokens per calendar month (UTC)"
    )
    daily_cost: float | None = Field(None, gt=0, description="in the price table's currency")
    monthly_cost: float | None = Field(
        None, gt=0, description="per calendar month (UTC), in the price table's currency"
    )
    soft_ratio: float = Field(
        0.8, gt=0, le=1, description="above this share a warning header and metric appear"
    )
    cache_reads: CacheReads = Field(
        "auto", description="daily_tokens / monthly_tokens: " + CACHE_READS_DESCRIPTION
    )
    shadow: bool = Field(False, description="evaluate and report, never refuse")


class RunCaps(StrictModel):
    """Caps on one agent run (the requests sharing one ``X-Agent-Session``); unset: no cap."""

    max_tokens: int | None = Field(
        None, ge=1, description="prompt + output tokens of the whole run; every request "
        "in flight holds its reservation (prompt estimate + output cap) against it until its "
        "real usage is settled"
    )
    max_cost: float | None = Field(
        None, gt=0, description="what the whole run may cost, in the price table's currency "
        "(kept in integer micro-units); in-flight requests hold their reserved price"
    )
    max_steps: int | None = Field(
        None, ge=1, description="model calls in the run: every admitted request holds a step "
        "while in flight and keeps it once it reached an upstream, whatever the answer (one "
        "refused before any upstream call, e.g. shed, gives it back)"
    )
    max_age_s: float | None = Field(
        None, gt=0, description="wall-clock seconds since the run's first admitted request; "
        "later requests of the run are refused"
    )

    def is_empty(self) -> bool:
        return (self.max_tokens is None and self.max_cost is None and self.max_steps is None
                and self.max_age_s is None)


class RunBudget(RunCaps):
    """Per-run budgets: stop one runaway agent run before it spends the tenant's budget.

    Enforced in the same atomic admission as the tenant's limits, exactly across replicas
    (docs/architecture.md, "Agent runs"). A run over a cap gets 429 ``run_budget_exceeded``
    with ``x-should-retry: false``; past ``soft_ratio`` of a cap every answer carries
    ``x-gateway-run-budget-warning`` so the agent can wrap up.
    """

    per_model: dict[str, RunCaps] = Field(
        {}, description="caps for requests to one model; a cap set here replaces the "
        "tenant-wide one, an unset one keeps it (the run's totals are shared by its models)"
    )
    soft_ratio: float = Field(
        0.8, gt=0, le=1, description="share of a cap above which answers carry "
        "x-gateway-run-budget-warning"
    )
    idle_ttl_s: float = Field(
        86_400.0, ge=60, le=30 * 86_400, description="a run with no admitted request for "
        "this long is forgotten: its next request starts a new run with fresh totals and age "
        "(every admission renews it; a day keeps a stalled run's spend across the daily "
        "budget's horizon for a few small keys per run)"
    )
    shadow: bool = Field(False, description="evaluate and report, never refuse")

    def caps_for(self, model: str) -> RunCaps:
        """The caps that apply to a request for ``model``."""
        override = self.per_model.get(model)
        if override is None:
            return self
        return RunCaps(**{name: (getattr(override, name) if getattr(override, name) is not None
                                 else getattr(self, name)) for name in RunCaps.model_fields})


class LoopGuard(StrictModel):
    """Refuse the same request repeated too often within one agent session: a stuck agent.

    Fingerprinted: the model and the body's ``messages``, ``prompt``, ``input`` and
    ``system``, plus ``seed`` unless ``temperature`` is 0 (a sampled request with a new seed
    asks for a new answer). Not counted at all: SDK retries (``x-stainless-retry-count`` > 0)
    and requests asking for several choices (``n`` > 1).
    """

    enabled: bool = Field(True, description="refuse identical requests repeated too often "
                          "(429 loop_detected)")
    scope: Literal["session", "tenant"] = Field(
        "session", description="session: identical requests are counted per X-Agent-Session "
        "and requests without one are not guarded (fan-out, evals and self-consistency "
        "sampling repeat on purpose); tenant: counted across the whole tenant"
    )
    max_repeats: int = Field(20, ge=2, description="identical requests allowed per window")
    window_s: float = Field(60.0, gt=0, description="the window, in seconds, starting at the "
                            "first of them")
    shadow: bool = Field(False, description="evaluate and report, never refuse")


class AgentLoop(StrictModel):
    """The loop detector that reads the conversation (gateway/request/agent_loop.py): the assistant's
    tool calls in the request's history, in chat, Responses and Messages bodies."""

    enabled: bool = Field(True, description="read the history of every request with tool calls")
    action: Literal["warn", "refuse", "shadow"] = Field(
        "warn", description="warn: the answer carries x-gateway-agent-loop (the request runs "
        "as usual); refuse: 429 agent_loop_detected with x-should-retry: false; shadow: only "
        "the metric gateway_agent_loops_total and the access log"
    )
    max_repeats: int = Field(
        5, ge=2, le=1000, description="a loop when one tool was called this many times with "
        "the same arguments (compared as canonical JSON) in the history"
    )
    cycle_steps: int = Field(
        8, ge=0, le=64, description="a loop when the last this-many assistant steps repeat "
        "one pattern of 2 to cycle_steps/2 steps (e.g. A B A B A B A B); 0 turns cycle "
        "detection off"
    )

    @model_validator(mode="after")
    def _cycle_long_enough(self) -> AgentLoop:
        if 0 < self.cycle_steps < 4:
            raise ValueError("cycle_steps must be 0 (off) or at least 4 (two rounds of a "
                             "two-step cycle)")
        return self


DegradedAction = Literal["local", "fail_open", "fail_closed"]


class Degraded(StrictModel):
    """What to do while the shared store (Redis) is unreachable or slow.

    ``local``: enforce each limit at ``limit / replicas`` in this process; ``fail_open``: let
    requests through unlimited; ``fail_closed``: refuse with 503. Usage is journaled locally
    either way and replayed to Redis, exactly once, when it returns.
    """

    action: DegradedAction = Field(
        "local", description="local: each limit at limit / replicas in this process; "
        "fail_open: no limits; fail_closed: refuse with 503"
    )
    per_priority: dict[PriorityName, DegradedAction] = Field(
        {}, description="override the action for some classes, e.g. {critical: fail_open}"
    )
    replicas: int | Literal["auto"] = Field(
        "auto", description="replica count for local limits; auto: from the fleet heartbeat"
    )
    probe_interval_s: float = Field(0.5, gt=0, description="how often to retry Redis")
    journal_max: int = Field(100_000, ge=100, description="usage records kept while degraded")
    journal_dir: str | None = Field(
        None, description="directory where a stopping replica writes the usage it could not "
        "hand to Redis, for the next start to replay exactly once; null: the environment's "
        "GATEWAY_JOURNAL_DIR (set in the container image), else no journal file (such usage "
        "is then lost, logged and counted in gateway_usage_journal_lost_total)"
    )

    @model_validator(mode="after")
    def _replicas_positive(self) -> Degraded:
        if isinstance(self.replicas, int) and self.replicas < 1:
            raise ValueError("replicas must be at least 1 or auto")
        return self
