"""Policy models for tenant limits, budgets, the runaway-agent guard and Redis trouble.

Kept apart from config.py so that file stays about the file's overall shape; these are the
knobs operators tune most. Every limit can be ``shadow: true``: evaluated, counted and reported
in ``x-gateway-shadow``, never enforced.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config_base import PriorityName, StrictModel


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


# Routes counted by a request-only plan (gateway/endpoints.py) that a tenant may exempt from
# its request limits; the proxied routes, which carry tokens and budgets, never can be.
ExemptRoute = Literal[
    "GET /v1/models", "GET /v1/models/{model}", "GET /v1/deferred/{id}",
    "GET /v1/deferred/{id}/response", "DELETE /v1/deferred/{id}",
    "POST /v1/messages/count_tokens", "POST /v1/responses/input_tokens",
]

CacheReads = Literal["auto", "count", "exclude"]
CACHE_READS_DESCRIPTION = (
    "whether prompt tokens read from the provider's cache count: auto counts them on OpenAI "
    "routes (OpenAI's TPM counts cached tokens) and excludes them on Anthropic routes (its "
    "input-tokens-per-minute limit excludes cache reads on current models); see "
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
