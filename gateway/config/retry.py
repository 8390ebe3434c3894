"""The ``retries`` section: how hard the gateway tries before it answers with an upstream error.
The decisions themselves are in gateway.upstream (retry.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import StrictModel


class RetryPolicy(StrictModel):
    """How hard the gateway tries before it answers with an upstream error."""

    max_attempts: int = Field(
        3, ge=1, le=5, description="upstream attempts per request, failovers included (1: none)"
    )
    backoff_base_s: float = Field(0.1, gt=0, description="first retry waits up to this")
    backoff_cap_s: float = Field(2.0, gt=0, description="no backoff step waits longer")
    # 0.3: a deployment failing 20% of the time needs ~0.25 retries per request; at 0.2 or
    # 0.25 the bucket runs dry by chance and requests fail that one retry would have saved.
    # A total outage is unaffected: with no successes nothing is earned.
    budget_ratio: float = Field(
        0.3, gt=0, le=1, description="retry tokens a deployment earns per successful attempt"
    )
    budget_min_tokens: float = Field(
        3.0, ge=0, description="tokens at startup, so a few retries work before any success"
    )
    budget_max_tokens: float = Field(
        20.0, ge=1, description="most tokens a deployment can bank (its largest retry burst)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must be at least backoff_base_s")
        if self.budget_max_tokens < self.budget_min_tokens:
            raise ValueError("budget_max_tokens must be at least budget_min_tokens")
        return self
