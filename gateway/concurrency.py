"""The adaptive concurrency limit of one deployment on one replica (AIMD).

A small plug-in in the manner of Netflix concurrency-limits: the admission controller owns one
``AIMDLimit`` per deployment, reports every finished call with ``on_sample`` and reads ``limit``.
The object holds no clock: every call passes ``now``.

- Multiplicative decrease on ``overload`` (provider 429, 5xx/529, connect error, first-byte
  timeout), at most once per decision window: calls that were in flight together fail together,
  and a burst of them is one signal, not twenty.
- Additive increase on ``success``, at most once per decision window and only while the limit is
  actually used (demand at least ``min_utilization`` of it): a limit that nobody pushes against
  says nothing about the upstream's capacity, so it must not drift up to ``max_limit``.
  Increases are per window rather than per success so the speed of recovery does not depend on
  how long calls last (LLM calls run for seconds to minutes).
- ``ignore`` (client cancelled, 4xx) leaves the limit alone.
- Optional latency brake: time to first token per prompt size, compared with its own slowly
  moving baseline; when it rises past ``latency_brake`` times the baseline a success counts as
  overload, so the limit comes down before the provider starts answering 429.
"""

from __future__ import annotations

import math
from typing import Literal

from .admission_policy import ConcurrencySettings

Outcome = Literal["success", "overload", "ignore"]
"""How a call ended, as far as the limit cares: see the module docstring."""

# Prompt sizes are normalised as (prompt_tokens + _PROMPT_UNIT) / _PROMPT_UNIT: prefill time
# grows with the prompt, and the fixed part keeps tiny prompts from dividing by almost nothing.
_PROMPT_UNIT = 1000.0


class AIMDLimit:
    """An AIMD concurrency limit within ``[min_limit, max_limit]``; see the module docstring."""

    def __init__(self, settings: ConcurrencySettings, now: float) -> None:
        self._settings = settings
        self._limit = float(settings.initial_limit)
        self._last_decrease = -math.inf
        self._last_increase = now
        self._brake = _LatencyBrake(settings.latency_brake) if settings.latency_brake else None

    @property
    def limit(self) -> int:
        """The current limit: how many calls may be in flight to the deployment at once."""
        return int(self._limit)

    @property
    def settings(self) -> ConcurrencySettings:
        return self._settings

    def on_sample(
        self,
        now: float,
        outcome: Outcome,
        in_flight: int,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        """Feed one finished call.

        ``in_flight`` is the demand when the call finished: calls in flight (this one
        included) plus requests queued for the deployment. ``ttft_s`` and ``prompt_tokens``
        feed the latency brake when it is enabled.
        """
        if outcome == "ignore":
            return
        s = self._settings
        braking = (
            outcome == "success" and self._brake is not None and ttft_s is not None
            and self._brake.slow(ttft_s, prompt_tokens or 0)
        )
        if braking:
            outcome = "overload"
        if outcome == "overload":
            if now - self._last_decrease >= s.decision_window_s:
                self._limit = max(float(s.min_limit), self._limit * s.decrease_factor)
                self._last_decrease = now
                # The window after a decrease shows how the smaller limit copes: no increase yet.
                self._last_increase = now
            return
        if in_flight < s.min_utilization * self._limit:
            return
        if now - self._last_increase >= s.decision_window_s:
            self._limit = min(float(s.max_limit), self._limit + s.increase_step)
            self._last_increase = now

    def restart_low(self, now: float) -> None:
        """Back to ``min_limit`` (after a breaker closes): probe a recovering upstream gently."""
        self._limit = float(self._settings.min_limit)
        self._last_increase = now

    def reconfigure(self, settings: ConcurrencySettings) -> None:
        """New bounds from a policy reload; the current limit is kept within them."""
        self._settings = settings
        self._limit = min(float(settings.max_limit), max(float(settings.min_limit), self._limit))
        if settings.latency_brake is None:
            self._brake = None
        elif self._brake is None:
            self._brake = _LatencyBrake(settings.latency_brake)
        else:
            self._brake.ratio = settings.latency_brake


class _LatencyBrake:
    """Compares recent normalised time to first token with a baseline that falls fast and
    rises slowly, so the baseline sits near the unloaded latency."""

    _RECENT_WEIGHT = 0.2
    _BASELINE_DOWN = 0.1
    _BASELINE_UP = 0.01

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._recent: float | None = None
        self._baseline: float | None = None

    def slow(self, ttft_s: float, prompt_tokens: int) -> bool:
        norm = ttft_s * _PROMPT_UNIT / (max(0, prompt_tokens) + _PROMPT_UNIT)
        if self._recent is None or self._baseline is None:
            self._recent = self._baseline = norm
            return False
        self._recent += self._RECENT_WEIGHT * (norm - self._recent)
        weight = self._BASELINE_DOWN if norm < self._baseline else self._BASELINE_UP
        self._baseline += weight * (norm - self._baseline)
        return self._recent > self.ratio * self._baseline
