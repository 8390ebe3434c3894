"""The ``deferred:`` section of the policy file: deferred requests (``Prefer: respond-async``).

Off unless ``enabled: true``; then a request carrying ``Prefer: respond-async`` is stored in a
durable queue and answered with 202 (see gateway/deferred/ and docs/architecture.md,
"Deferred requests"). Per-tenant settings (``tenants:``) override ``defaults`` key by key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import PositiveFloat, StrictModel

DeferMode = Literal["always", "on_shed", "off"]


class DeferredTenant(StrictModel):
    """How one tenant's ``Prefer: respond-async`` requests are treated."""

    mode: DeferMode = Field(
        "always", description="always: every non-streaming request that prefers respond-async "
        "is queued and answered 202; on_shed: it runs at once, and only a would-be 503 "
        "overloaded shed of its low class becomes a deferral; off: the preference is ignored"
    )
    ttl_s: int = Field(
        86_400, ge=1, le=7 * 86_400, description="an entry not finished this long after submit "
        "expires (its reservation is refunded); its record is readable for result_grace_s more"
    )
    max_queued: int = Field(
        10_000, ge=1, le=1_000_000, description="unfinished entries of the tenant; more are "
        "refused with 429 deferred_queue_full"
    )
    max_queued_bytes: int = Field(
        128 * 1024 * 1024, ge=1024, description="request bytes (bodies and the headers kept "
        "with them) of the tenant's unfinished entries, held in the state store (the process "
        "with the memory backend); more are refused with 429 deferred_queue_full. An entry's "
        "reservation counts tokens, not bytes: a 5 MiB image costs a few hundred"
    )


class DeferredPolicy(StrictModel):
    """Deferred requests: a durable queue (Redis Streams; the memory backend keeps it in the
    process only, lost on restart) drained at the low class's spare capacity."""

    enabled: bool = Field(False, description="honour Prefer: respond-async (RFC 7240)")
    workers: int = Field(
        8, ge=0, le=1024, description="deferred entries one replica runs at a time; each also "
        "needs a free low-class admission slot (0: this replica only accepts and answers)"
    )
    visibility_timeout_s: PositiveFloat = Field(
        60.0, description="an entry whose replica stopped renewing its claim this long ago is "
        "re-claimed and run again (claims are renewed every third of this while running)"
    )
    poll_interval_s: PositiveFloat = Field(
        1.0, description="longest pause between looks for new work when the queue seems empty"
    )
    max_runs: int = Field(
        5, ge=1, le=100, description="runs that reached the upstream (or were lost with their "
        "replica) before a retryable failure (429, 5xx, timeout) becomes the final answer"
    )
    retry_backoff_s: PositiveFloat = Field(
        2.0, description="wait before re-running after a retryable failure; doubles per run, "
        "at most 60 s"
    )
    run_timeout_s: PositiveFloat = Field(
        600.0, description="deadline of one run (bounds the upstream timeouts like a client's "
        "X-Request-Timeout)"
    )
    max_wait_s: PositiveFloat = Field(60.0, description="cap on GET ?wait=N (long poll)")
    max_open_polls: int = Field(
        100, ge=0, le=100_000, description="?wait= long polls one tenant may hold open on one "
        "replica; beyond it a poll answers at once with the current status (never an error) "
        "and Retry-After: 1. An open poll re-reads its entry at most every 2 s, a refused one "
        "comes back every second: keep this above a tenant's usual count of entries awaited"
    )
    result_grace_s: int = Field(
        3_600, ge=1, le=7 * 86_400, description="a finished entry stays readable at least this "
        "long, and an expired one this long after its expiry"
    )
    sweep_interval_s: PositiveFloat = Field(
        5.0, description="how often a replica expires old entries and refreshes the queue "
        "depth and age metrics"
    )
    defaults: DeferredTenant = DeferredTenant()
    tenants: dict[str, DeferredTenant] = Field(
        {}, description="per-tenant overrides of defaults (only the keys given)"
    )

    @model_validator(mode="after")
    def _timeouts(self) -> DeferredPolicy:
        if self.visibility_timeout_s < 0.3:
            raise ValueError("visibility_timeout_s must be at least 0.3")
        return self

    def for_tenant(self, name: str) -> DeferredTenant:
        """The tenant's settings: ``defaults`` with the tenant's own keys on top."""
        own = self.tenants.get(name)
        if own is None:
            return self.defaults
        return self.defaults.model_copy(update=own.model_dump(include=own.model_fields_set))

    def check_tenants(self, known: set[str]) -> None:
        """ValueError naming a tenant under ``tenants:`` that the policy does not define."""
        for name in self.tenants:
            if name not in known:
                raise ValueError(f"deferred.tenants: unknown tenant '{name}'")
