"""The ``breaker:`` policy model: when a deployment is taken out of rotation and how it returns.

Kept apart from breaker.py so ``config.py`` can import it without pulling in pybreaker, the
state backend and the breakers themselves; like the other ``*_policy`` modules it imports only
``config_base``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import StrictModel


class BreakerPolicy(StrictModel):
    """When a deployment is taken out of rotation, for how long, and how it comes back."""

    window_s: float = Field(30.0, gt=0, description="failure-rate window, seconds")
    # 20 calls: with fewer, a 20% error rate reaches 50% in one window by chance too often,
    # and a breaker on the only deployment turns a flaky provider into an outage.
    min_calls: int = Field(20, ge=1, description="calls in the window before the rate can trip")
    failure_rate: float = Field(
        0.5, gt=0, le=1, description="failed share of the window's calls that trips it")
    # 10 in a row: a dead deployment still trips within 10 calls, while a 20%-flaky one
    # (0.2**10 per run) practically never does; 5 tripped it about once per 4,000 calls.
    consecutive_failures: int = Field(10, ge=1, description="failures in a row that trip it")
    reset_timeout_s: float = Field(10.0, gt=0, description="open period after a first trip")
    max_reset_timeout_s: float = Field(
        120.0, gt=0, description="cap of the open period, which doubles on each repeated trip; "
        "also the longest 429 cooldown")
    reset_jitter: float = Field(0.2, ge=0, lt=1, description="open periods are up to this "
                                "share shorter, at random, so they do not end in lockstep")
    half_open_probes: int = Field(2, ge=1, le=100, description="probes let through at once, "
                                  "fleet-wide, when the open period ends")
    probe_lease_s: float = Field(60.0, gt=0, description="a probe slot whose replica never "
                                 "released it frees itself after this long")
    slow_first_token_s: float | None = Field(None, gt=0, description="a first byte slower "
                                             "than this counts as a failure (null: off)")
    sync_interval_s: float = Field(0.5, gt=0, le=10, description="how often breaker state is "
                                   "exchanged with the other replicas")
    cooldown_default_s: float = Field(1.0, gt=0, description="cooldown after a 429 that has "
                                      "no Retry-After")

    @model_validator(mode="after")
    def _cap_above_base(self) -> BreakerPolicy:
        if self.max_reset_timeout_s < self.reset_timeout_s:
            raise ValueError("max_reset_timeout_s must be at least reset_timeout_s")
        return self
