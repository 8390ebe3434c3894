"""The adaptive concurrency limit of one deployment on one replica.

A small plug-in in the manner of Netflix concurrency-limits: the admission controller owns one
``AdaptiveLimit`` per deployment, reports every finished call with ``on_sample`` and reads
``limit``. The object holds no clock: every call passes ``now``.

Two signals move the limit (docs/architecture.md, "How the concurrency limit finds capacity"):

**Errors (AIMD).** Multiplicative decrease on ``overload`` (provider 429, 5xx/529, connect error,
first-byte timeout), at most once per decision window: calls that were in flight together fail
together, and a burst of them is one signal, not twenty. The decrease goes at least down to the
concurrency the upstream actually served successfully in the window (Little's law: successful
call-seconds / seconds), so a limit that overshot a quota comes back in one step, not twenty.
Once errors other than a provider 429 stop, the limit returns x1.5 per window to one decrease below where it stood when
they began (TCP's slow start to ssthresh): a few seconds of timeouts from a hanging upstream
must not leave it at its floor for a minute of queueing and 503s. Errors again during that
return mean the old limit was too high after all: the return ends, growth is additive again.

**Queueing (Vegas-style, ``algorithm: vegas``).** Providers publish rate limits, not
concurrency: past its real capacity an upstream queues requests internally, where priority means
nothing, long before it answers 429. Queueing shows as time to first token (TTFT) above its
no-load level, and Little's law turns that excess into a count: requests waiting inside the
provider ``Q = completions/s x mean excess TTFT``. Each decision window (at least
``decision_window_s`` and ``_MIN_SAMPLES`` streamed first tokens):

- the window's no-load level per prompt size ``mean(ttft) / mean(size)`` (size =
  ``(prompt_tokens + 1000) / 1000``: prefill grows with the prompt) is smoothed and fed to the
  *baseline*, its minimum over ``baseline_window_s``. The minimum is re-probed: it ages out, so
  a slow period is forgotten; and when three decreases in a row did not bring TTFT down, the
  latency is the provider's new normal, not our queue, and becomes the baseline at once;
- ``Q`` is compared with the tolerance ``max(upstream_queue_min, upstream_queue_share x
  limit)``: above it the limit drops by the excess (down to the concurrency that leaves half
  the tolerance queued); below half of it, and while the limit is actually used (demand at
  least ``min_utilization`` of it), the limit grows; in between it holds;
- growth is a slow start (x1.5 per window) until the first decrease or hold, then additive
  (``increase_step`` per window). After a latency decrease, growth waits ``_PROBE_BACKOFF``
  windows, twice as long after each probe that had to be taken back at once (up to
  ``_PROBE_BACKOFF_MAX``): at the knee every probe queues a request inside the provider, where
  priority means nothing, so probes there become rare; a probe the provider takes resets it.

Non-streamed calls have no first token: a window without any TTFT, or with far more
non-streamed successes than first tokens, falls back to the AIMD increase (one
``increase_step`` per window while used). ``ignore`` (client cancelled, 4xx)
leaves the limit alone.

The optional ``latency_brake`` (off by default) is the older, cruder latency signal: time to
first token per prompt size against its own slowly moving baseline; above ``latency_brake``
times it a success counts as overload.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from gateway.config import ConcurrencySettings

Outcome = Literal["success", "overload", "rate_limited", "timeout", "ignore"]
"""How a call ended, as far as the limit cares: see the module docstring."""

# Prompt sizes are normalised as (prompt_tokens + _PROMPT_UNIT) / _PROMPT_UNIT: prefill time
# grows with the prompt, and the fixed part keeps tiny prompts from dividing by almost nothing.
_PROMPT_UNIT = 1000.0
# First tokens a latency decision needs: fewer make the mean too noisy to act on.
_MIN_SAMPLES = 8
# Windows without growth after a latency decrease (probe rarely at the knee, see docstring);
# doubled after each probe that had to be taken back, up to the maximum.
_PROBE_BACKOFF = 5
_PROBE_BACKOFF_MAX = 40
# Latency decreases in a row after which TTFT that did not fall becomes the new baseline.
_REBASE_AFTER = 3
# Weight of a new window in the smoothed no-load level fed to the baseline minimum.
_LEVEL_WEIGHT = 0.5


def size_factor(prompt_tokens: int | None) -> float:
    """How much longer than a tiny prompt's this prompt's prefill is expected to take."""
    return (max(0, prompt_tokens or 0) + _PROMPT_UNIT) / _PROMPT_UNIT


class _Window:
    """What one decision window saw."""

    __slots__ = ("busy_ok", "n", "ok", "sizes", "start", "ttfts")

    def __init__(self, start: float) -> None:
        self.start = start
        self.ok = 0  # successful calls that finished
        self.busy_ok = 0.0  # their call-seconds
        self.ttfts = 0.0  # sum of streamed first-token times
        self.sizes = 0.0  # sum of their size factors
        self.n = 0  # how many first tokens

    def excess_s(self, baseline: float) -> float:
        """Mean first-token time above ``baseline`` (per size unit) at this window's sizes."""
        return max(0.0, self.ttfts / self.n - baseline * (self.sizes / self.n))


class AdaptiveLimit:
    """A concurrency limit within ``[min_limit, max_limit]``; see the module docstring."""

    def __init__(self, settings: ConcurrencySettings, now: float) -> None:
        self._settings = settings
        self._limit = float(settings.initial_limit)
        self._last_decrease = -math.inf
        self._last_increase = now
        self._brake = _LatencyBrake(settings.latency_brake) if settings.latency_brake else None
        self._window = _Window(now)
        self._level: float | None = None  # smoothed no-load TTFT per size unit
        self._baseline: deque[tuple[float, float]] = deque()  # (when, level), for the minimum
        self._slow_start = True
        self._backoff = 0  # windows left without growth after a latency decrease
        self._probe_backoff = _PROBE_BACKOFF  # what the next latency decrease sets it to
        # After growth past the slow start: quiet windows left before the probe counts as
        # taken (its effect shows a window late, so one quiet window proves nothing).
        self._probing = 0
        self._cuts = 0  # latency decreases in a row after which TTFT did not fall
        self._cut_from = 0.0  # the level at the last of them
        self._next_cut = -math.inf  # no latency decrease before this
        self._decided_at = -math.inf  # when the last latency decision was made
        self.upstream_queue: float | None = None  # the last estimate Q (for status)
        # After errors cut the limit: the limit the upstream coped with before them (one
        # decrease below it). Once errors stop, growth goes back there x1.5 per window (TCP's
        # slow start to ssthresh): a few seconds of timeouts must not cost a minute of 503s.
        # Errors again once that growth has begun: the old limit was too high after all, and
        # growth goes back to one step at a time.
        self._recover_to: float | None = None
        self._recovering = False

    @property
    def limit(self) -> int:
        """The current limit: how many calls may be in flight to the deployment at once."""
        return int(self._limit)

    @property
    def settings(self) -> ConcurrencySettings:
        return self._settings

    @property
    def baseline_s(self) -> float | None:
        """The no-load time to first token of a tiny prompt (None before any is measured)."""
        return min(level for _, level in self._baseline) if self._baseline else None

    def on_sample(
        self,
        now: float,
        outcome: Outcome,
        in_flight: int,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Feed one finished call.

        ``in_flight`` is the demand when the call finished: calls in flight (this one
        included) plus requests queued for the deployment. ``ttft_s`` (seconds from sending
        to the first streamed token, None when not streamed) and ``prompt_tokens`` feed the
        queueing signal; ``duration_s`` (how long the call held its slot) the error decrease.
        """
        if outcome == "ignore":
            return
        s = self._settings
        window = self._window
        if outcome == "success":
            window.ok += 1
            if duration_s is not None:
                window.busy_ok += max(0.0, duration_s)
            if ttft_s is not None and ttft_s >= 0:
                window.ttfts += ttft_s
                window.sizes += size_factor(prompt_tokens)
                window.n += 1
            if self._brake is not None and ttft_s is not None and self._brake.slow(
                ttft_s, prompt_tokens or 0
            ):
                outcome = "overload"
        if outcome == "timeout":
            if self._answering_promptly(now):
                return  # a stuck call, not a queue: cutting the limit would not help it
            outcome = "overload"
        if outcome == "rate_limited":
            # The provider said "too fast" (429): the limit it had was too high by its own
            # word, so there is nothing to return to afterwards.
            self._decrease_on_error(now)
            self._recover_to, self._recovering = None, False
            return
        if outcome == "overload":
            self._decrease_on_error(now)
            return
        if now - window.start < s.decision_window_s:
            return
        if s.algorithm == "vegas" and window.n >= _MIN_SAMPLES:
            self._decide(now, in_flight)
        elif s.algorithm == "aimd" or window.n == 0 or window.ok - window.n >= _MIN_SAMPLES:
            # No latency signal to go by (AIMD, nothing streamed, or mostly calls that are not
            # streamed): successes alone let the limit grow.
            self._window = _Window(now)
            if in_flight >= s.min_utilization * self._limit:
                self._grow(now, s.increase_step)
        # else: a few first tokens only; the window goes on until it has enough

    def restart_low(self, now: float) -> None:
        """Back to ``min_limit`` (after a breaker closes): probe a recovering upstream gently,
        growing in slow start again."""
        self._limit = float(self._settings.min_limit)
        self._recover_to, self._recovering = None, False
        self._last_increase = now
        self._window = _Window(now)
        self._slow_start = True
        self._backoff = self._cuts = 0
        self._probe_backoff, self._probing = _PROBE_BACKOFF, 0
        self._next_cut = -math.inf

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

    # -- internals ----------------------------------------------------------------------------

    def _answering_promptly(self, now: float) -> bool:
        """Whether, by time to first token, the upstream is answering at its no-load speed now:
        then a call that timed out was stuck (a hung request, a bad connection), not queued
        behind others, and it is no reason to lower the limit. Vegas only, once a baseline is
        known: this window's first tokens if it has a few, else the last decision's."""
        s = self._settings
        if s.algorithm != "vegas" or not self._baseline:
            return False
        tolerance = self._tolerance()
        window = self._window
        if window.n >= _MIN_SAMPLES // 2:
            elapsed = max(now - window.start, s.decision_window_s / 10)
            return window.ok / elapsed * window.excess_s(self._baseline[0][1]) <= tolerance
        recent = now - self._decided_at <= 2 * s.decision_window_s
        return recent and self.upstream_queue is not None and self.upstream_queue <= tolerance

    def _tolerance(self) -> float:
        """Requests allowed to wait inside the provider at the current limit."""
        s = self._settings
        return max(s.upstream_queue_min, s.upstream_queue_share * self._limit)

    def _decrease_on_error(self, now: float) -> None:
        s = self._settings
        if now - self._last_decrease < s.decision_window_s:
            return
        target = self._limit * s.decrease_factor
        if self._recovering:
            self._recover_to, self._recovering = None, False
        elif self._recover_to is None:
            self._recover_to = target
        window = self._window
        elapsed = now - window.start
        if window.busy_ok > 0 and elapsed >= 0.5 * s.decision_window_s:
            # What the upstream served without complaint; never below half the limit at once,
            # so one unlucky window cannot collapse it.
            served = window.busy_ok / elapsed
            target = min(target, max(served, 0.5 * self._limit))
        self._set(target)
        self._last_decrease = now
        # The window after a decrease shows how the smaller limit copes: no increase yet.
        self._last_increase = now
        self._window = _Window(now)
        self._slow_start = False

    def _decide(self, now: float, demand: int) -> None:
        s = self._settings
        window = self._window
        elapsed = max(now - window.start, 1e-9)
        self._window = _Window(now)
        self._decided_at = now
        mean_ttft = window.ttfts / window.n
        mean_size = window.sizes / window.n
        level = mean_ttft / mean_size
        first = self._level is None
        self._level = level if self._level is None else (
            self._level + _LEVEL_WEIGHT * (level - self._level))
        horizon = now - s.baseline_window_s
        while self._baseline and self._baseline[0][0] < horizon:
            self._baseline.popleft()
        while self._baseline and self._baseline[-1][1] >= self._level:
            self._baseline.pop()  # a monotonic deque: its head is the minimum of the horizon
        self._baseline.append((now, self._level))
        baseline = self._baseline[0][1]
        excess_s = window.excess_s(baseline)
        queue = window.ok / elapsed * excess_s
        self.upstream_queue = queue
        if first:
            return  # nothing to compare the first window with
        tolerance = self._tolerance()
        if queue > tolerance:
            if now >= self._next_cut:
                # The effect of a decrease shows once the provider's queue has drained and
                # calls sent after it have their first token: not before ~ wait + TTFT.
                self._next_cut = now + s.decision_window_s + excess_s + mean_ttft
                self._decrease_on_queue(now, queue, tolerance, level, baseline)
            return
        self._cuts = 0
        if self._probing and queue < 0.5 * tolerance:
            self._probing -= 1
            if not self._probing:  # the provider took the probe: probe freely again
                self._probe_backoff = _PROBE_BACKOFF
        if self._backoff > 0:
            self._backoff -= 1
            return
        if queue < 0.5 * tolerance and demand >= s.min_utilization * self._limit:
            self._probing = 0 if self._slow_start else 2
            self._grow(now, max(s.increase_step, 0.5 * self._limit if self._slow_start else 0))
            return
        if queue >= 0.5 * tolerance:
            self._slow_start = False  # near the knee: slow start is over

    def _decrease_on_queue(self, now: float, queue: float, tolerance: float, level: float,
                           baseline: float) -> None:
        s = self._settings
        # Decreases in a row, each given time to show, and TTFT did not come down after any
        # of them: the provider got slower for everyone (or our limit is at its floor). The
        # latency is its new normal, not a queue of ours.
        self._cuts = self._cuts + 1 if self._cuts and level >= 0.95 * self._cut_from else 1
        self._cut_from = level
        if self._cuts >= _REBASE_AFTER or self._limit <= s.min_limit:
            self._baseline.clear()
            self._baseline.append((now, level))
            self._level = level
            self._cuts = 0
            # Where the knee is now is unknown: probe for it at once, and freely.
            self._backoff, self._probe_backoff = 0, _PROBE_BACKOFF
            return
        self._set(max(0.5 * self._limit, self._limit - (queue - 0.5 * tolerance)))
        # the provider queues here: the old limit was past its knee
        self._recover_to, self._recovering = None, False
        self._last_decrease = now
        self._slow_start = False
        # A probe taken back at once: the knee has not moved, so probe it half as often (at
        # most every _PROBE_BACKOFF_MAX windows) until a probe is taken.
        if self._probing:
            self._probe_backoff = min(2 * self._probe_backoff, _PROBE_BACKOFF_MAX)
        self._probing = 0
        self._backoff = self._probe_backoff

    def _grow(self, now: float, step: float) -> None:
        if now - self._last_increase < self._settings.decision_window_s:
            return
        target = self._limit + step
        if self._recover_to is not None:
            target = max(target, min(self._recover_to, 1.5 * self._limit))
            self._recovering = True
            if target >= self._recover_to:
                self._recover_to, self._recovering = None, False
        self._set(target)
        self._last_increase = now

    def _set(self, value: float) -> None:
        s = self._settings
        self._limit = min(float(s.max_limit), max(float(s.min_limit), value))


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
        norm = ttft_s / size_factor(prompt_tokens)
        if self._recent is None or self._baseline is None:
            self._recent = self._baseline = norm
            return False
        self._recent += self._RECENT_WEIGHT * (norm - self._recent)
        weight = self._BASELINE_DOWN if norm < self._baseline else self._BASELINE_UP
        self._baseline += weight * (norm - self._baseline)
        return self._recent > self.ratio * self._baseline
