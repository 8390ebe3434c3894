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
provider ``Q = calls/s x mean excess TTFT`` (a window's slowest 5 % counted at the level of
the next slowest: ``_Window.outlier_s``). First tokens are fed as they arrive
(``on_first_token``), so the signal lags by one TTFT, not by a whole streamed answer. Each
decision window (at least ``decision_window_s`` and ``_MIN_SAMPLES`` first tokens):

- the prefill time per prompt token is learned, as the slope of first token on prompt size
  about each window's means, pooled over ``_PREFILL_MEMORY`` (an assumed slope is noise
  wherever it is wrong: see docs/architecture.md);
- the window's no-load level, its mean TTFT less the prefill of its prompts (its slowest 5 %
  counted at the level of the next slowest: a provider's slow few are no queue), is smoothed
  and fed to the *baseline*, its minimum over ``baseline_window_s``. The minimum is re-probed: it
  ages out, so a slow period is forgotten; and when three decreases in a row did not bring
  TTFT down, the latency is the provider's new normal, not our queue, and becomes the
  baseline at once;
- first tokens scatter by themselves, so the excess over the baseline is taken less what
  chance explains (``_BASELINE_Z``, ``_NOISE_Z``): each baseline window counts as its smoothed
  level plus three standard errors of it, and the current window's mean as two standard
  errors less, at the provider's own scatter (``_rest``);
- ``Q`` is compared with the tolerance ``max(upstream_queue_min, upstream_queue_share x
  limit)``: above it the limit drops by the excess, from the concurrency the window actually
  used (down to where half the tolerance stays queued), if the queue is broad (above the
  tolerance still with the window's slowest quarter counted at the next one's level) or
  confirmed (the two windows before read over a quarter of the tolerance too: a provider's
  slow few come and go; unconfirmed, the window holds, slow start's growth too); below half
  of it, and while the limit is actually used (demand at least ``min_utilization`` of it),
  the limit grows; in between it holds;
- within the tolerance, the queue at the top of the limit: with holdback only critical
  bursts reach the top, and a limit a few calls past the knee queues them inside the
  provider while the window's mean stays within the tolerance. The first tokens of calls
  sent at the top (admission's ``DeploymentState.at_top``) are ranked against the others' of the same
  window (``_Window.top_wait``); when they stand out, in two windows in a row, and the wait
  they had is a queue above the tolerance, the limit drops by that queue (the slots past the
  knee), never below ``_TOP_FLOOR`` of where the rest of this logic left it; a top that keeps
  standing out at that floor is taken for calls slow by nature (one tenant's, sent in the
  class holdback lets through last) and left alone for ``_TOP_REST_S``;
- growth is a slow start until the first decrease, or hold by a queue within the tolerance,
  then additive (``increase_step`` per window). Slow start grows per call, only while the
  demand fills the limit: half a slot per first token that came on time
  (``_slow_start_step``), x1.5 a round trip, topped up to x1.5 per window. While it still
  grows (``exploring``) the limit has found no capacity yet, and admission does not shed for
  the requests that queue behind it. After a latency decrease, growth waits
  ``_PROBE_BACKOFF`` windows, twice as long after each probe that had to be taken back at
  once (up to ``_PROBE_BACKOFF_MAX``): at the knee every probe queues a request inside the
  provider, where priority means nothing, so probes there become rare; a probe the provider
  takes resets it.

Non-streamed calls have no first token: a window without any TTFT, or with far more
non-streamed successes than first tokens, falls back to the AIMD increase (one
``increase_step`` per window while used), and while no call has streamed slow start grows
per success that took no longer than 1.5x the quickest (a queue inside the provider shows
only as longer calls). ``ignore`` (client cancelled, 4xx)
leaves the limit alone.

The optional ``latency_brake`` (off by default) is the older, cruder latency signal: time to
first token per prompt size against its own slowly moving baseline; above ``latency_brake``
times it a success counts as overload.
"""

from __future__ import annotations

import bisect
import heapq
import math
from array import array
from collections import deque
from typing import Literal, NamedTuple, Protocol

from gateway.config import ConcurrencySettings

Outcome = Literal["success", "overload", "rate_limited", "timeout", "client_timeout", "ignore"]
"""How a call ended, as far as the limit cares: see the module docstring."""


class CallsInFlight(Protocol):
    """What the gateway knows of its calls to the deployment right now (admission's
    ``DeploymentState``): read once per decision window."""

    @property
    def in_flight(self) -> int:
        """Calls to the deployment in flight now."""
        ...

    def overdue(self, now: float, baseline_s: float, prefill_s: float) -> int:
        """Streamed calls in flight that have waited for their first token past
        ``OVERDUE_FACTOR`` times the no-load expectation (``baseline_s`` plus ``prefill_s``
        per thousand prompt tokens)."""
        ...


# A call waiting for its first token longer than this many times the no-load expectation is
# queued, not slow: tail latency of a provider at rest stays well within it.
OVERDUE_FACTOR = 3.0

# For the optional latency brake only: prompt sizes are normalised as
# (prompt_tokens + _PROMPT_UNIT) / _PROMPT_UNIT (prefill time grows with the prompt; the fixed
# part keeps tiny prompts from dividing by almost nothing). The queue signal and the deadline
# check use the prefill time per token learned instead (_PREFILL_MEMORY).
_PROMPT_UNIT = 1000.0
# Weight of the past in the learned prefill time per token, per decision window (about twenty
# windows of memory): long enough for a steady estimate, short enough to follow a provider
# that changes.
_PREFILL_MEMORY = 0.95
# Spread of prompt sizes (sum of squares about the means, thousands of tokens) below which
# a window says nothing of the prefill time: prompts all of one size.
_PREFILL_MIN_SPREAD = 0.01
# The largest prefill per thousand prompt tokens a window may report (1,000 tokens a second:
# slower than any hosted model reads a prompt).
_PREFILL_MAX_S = 1.0
# The slowest share of a window's first tokens (one at least) that the queue signal counts
# at the level of the slowest of the rest (_Window.outlier_s): at a tenth the knee of 4 slots
# (one queued request delays about a quarter of the calls) read one call too high.
_TRIM = 0.05
# A narrow queue (see _decide): within the tolerance once the window's slowest quarter counts
# at the next one's level; it cuts once this many windows in a row before it read over this
# share of the tolerance.
_TRIM_WIDE = 0.25
_CONFIRM_WINDOWS = 2
_CONFIRM_SHARE = 0.25
# Calls overdue for a first token that stop growth: at least this many (see _decide).
_OVERDUE_MIN = 2.0
# The least scatter of first tokens about the fitted line credited to a window (1 ms, squared):
# a simulated upstream without jitter would otherwise weigh infinitely.
_JITTER_FLOOR_S2 = 1e-6
# Decisions whose windows the baseline keeps however old they are: with calls that stream for
# minutes a window lasts long, and a baseline of one or two windows is no minimum at all.
_BASELINE_MIN_WINDOWS = 10
# First tokens a latency decision needs: fewer make the mean too noisy to act on.
_MIN_SAMPLES = 8
# Windows without growth after a latency decrease (probe rarely at the knee, see docstring);
# doubled after each probe that had to be taken back, up to the maximum.
_PROBE_BACKOFF = 5
_PROBE_BACKOFF_MAX = 40
# First tokens scatter (a provider's own jitter), and so do the windows' means. The baseline
# was the lowest of many of them, so it sat below the true no-load level by chance, and each
# window's mean above it by chance: against an upstream that never queued, the queue estimate
# grew with the square root of the rate, cut the limit, and the smaller limit's windows were
# noisier still (first tokens of 400 ms +-30 %, uniform, endless demand, 500 free: a limit of
# 35-137; +-50 %: 7-14). So each baseline window counts as its smoothed level plus
# _BASELINE_Z standard errors of it (the least of some thirty noisy levels lies about two
# below the true one), and a window's excess over the baseline is taken less _NOISE_Z
# standard errors of its mean, at the provider's own scatter (_rest). A real queue moves every
# call's first token, and the mean far beyond those errors. The price is a queue the noise
# hides: +-50 % at 64 slots of 1.2 s calls settles at 65-74 (three seeds; tests/unit/
# test_concurrency_limit.py).
_BASELINE_Z = 3.0
_NOISE_Z = 2.0
# The baseline windows' typical scatter counts for the provider's own up to this many times
# the resting window's, or the calmer half of the baseline windows' (_rest).
_SCATTER_TRUST = 3.0
# The queue at the top of the limit (_Window.top_wait): which calls were sent at the top, the
# part of the limit only the highest classes reach, is admission's to say
# (DeploymentState.at_top). Where the limit stands past the knee, those calls are the ones
# that wait inside the provider; the calls sent below it by the same chance do not.
# The top's first tokens must rank above the others' by this many standard deviations of the
# rank sum (one-sided, about 2 % by chance), from at least _TOP_MIN calls, before they count.
_TOP_Z = 2.0
_TOP_MIN = 3
# ... in this many windows in a row: by chance alone that is one window in 2,000, where one
# in 40 let the long tail of first tokens (lognormal sigma 0.8) walk the limit to a fraction of
# the knee over 20 minutes, each false decrease holding growth for several windows.
_TOP_WINDOWS = 2
# The top signal takes the limit down at most to this share of where the rest of the limit's
# logic left it (_top_anchor: the limit after any other decrease, raised by growth): calls
# that are slow by nature and happen to be the ones sent at the top (one tenant's, in the class
# holdback lets through last) look like a queue there, at any limit.
_TOP_FLOOR = 0.9
# ... and when the top still stands out in this many windows with the limit at that floor, it
# is taken to be slow by nature, and the top signal is off for _TOP_REST_S: otherwise every
# other decrease (errors, the window's mean) would give it another tenth, and every probe past
# the floor would be taken back, so a provider that gained slots was climbed once a minute.
_TOP_STUCK = 5
_TOP_REST_S = 120.0
# Latency decreases in a row after which TTFT that did not fall becomes the new baseline.
_REBASE_AFTER = 3
# TTFT this much above the last latency decrease's: the provider changed (see _REBASE_AFTER).
_CHANGED = 1.25
# Weight of a new window in the smoothed no-load level fed to the baseline minimum.
_LEVEL_WEIGHT = 0.5
# Slow start adds this to the limit per first token that came on time (x1.5 per round trip
# when every call of a round did), or per success while no call streams: growth per call, as
# TCP's slow start grows by one segment per acknowledgement, not once per decision window.
_SLOW_START_GAIN = 0.5
# Weight of a new call's duration in the mean that sets how long slow start may go without
# progress and still count as exploring (AdaptiveLimit.exploring).
_CALL_WEIGHT = 0.2
# A first token is on time, for slow start, within this multiple of the no-load expectation
# (the baseline plus the prompt's prefill) plus _ON_TIME_SLACK_S: a call that queued inside
# the provider for a slot waits a good part of a whole call on top (HyStart's delay check,
# per call). A success without a first token: within this multiple of the quickest one.
_ON_TIME_FACTOR = 1.5
_ON_TIME_SLACK_S = 0.01


def size_factor(prompt_tokens: int | None) -> float:
    """How much longer than a tiny prompt's this prompt's prefill is expected to take."""
    return (max(0, prompt_tokens or 0) + _PROMPT_UNIT) / _PROMPT_UNIT


def thousands(prompt_tokens: int | None) -> float:
    """A prompt's size in thousands of tokens: the unit the learned prefill time is per."""
    return max(0, prompt_tokens or 0) / 1000


class _Moments(NamedTuple):
    """A window's first tokens (s) and prompts (thousands of tokens), as sums of squares and
    products about their means: enough for their scatter at whatever prefill rate is learned
    later (a scatter fixed at the rate of its day would keep prompt-size spread the rate no
    longer explains)."""

    n: int
    sxx: float
    sxy: float
    syy: float

    def scatter_s(self, prefill_s: float) -> float:
        """The sample standard deviation of the first tokens, each less its prompt's
        prefill at ``prefill_s`` per thousand tokens."""
        if self.n < 2:
            return 0.0
        squares = self.syy - 2 * prefill_s * self.sxy + prefill_s * prefill_s * self.sxx
        return math.sqrt(max(0.0, squares / (self.n - 1)))

    def prefill_evidence(self) -> tuple[float, float] | None:
        """The window's estimate of the prefill time per thousand prompt tokens (the slope of
        first token on prompt size about the window's own means, so a queue that changed
        between windows does not enter it), and its weight, the inverse of its variance: a
        window whose first tokens scatter (a queue that grew or drained within it, and
        happened to meet large prompts) counts for little. None when its prompts were all of
        one size."""
        if self.n < 3 or self.sxx <= _PREFILL_MIN_SPREAD:
            return None
        slope = self.sxy / self.sxx
        residual = max(_JITTER_FLOOR_S2, (self.syy - slope * self.sxy) / (self.n - 2))
        return slope, self.sxx / residual

    @staticmethod
    def of_scatter(scatter_s: float, n: int) -> _Moments:
        """Moments of ``n`` first tokens scattered ``scatter_s`` whatever the prompts."""
        return _Moments(n, 0.0, 0.0, scatter_s * scatter_s * (n - 1))


class TopWait(NamedTuple):
    """The calls sent at the top of the limit in a window, against those sent below it."""

    n: int  # how many first tokens came for calls sent at the top
    z: float  # how far their ranks stand above chance, in standard deviations
    wait_s: float  # their median first token less the others' (s)


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])


class _Window:
    """What one decision window saw."""

    __slots__ = ("below", "busy_ok", "cross", "each_prompt", "each_ttft", "keep", "n", "ok",
                 "prompts", "prompts2", "start", "top", "ttfts", "ttfts2")

    def __init__(self, start: float, keep: bool = True) -> None:
        """``keep``: whether to keep each first token, for its slowest few (``outlier_s``):
        only ``vegas`` decides by them."""
        self.start = start
        self.keep = keep
        self.ok = 0  # successful calls that finished
        self.busy_ok = 0.0  # their call-seconds
        self.n = 0  # how many first tokens
        self.ttfts = 0.0  # sum of streamed first-token times (s)
        self.prompts = 0.0  # sum of their prompt sizes (thousands of tokens)
        self.prompts2 = 0.0  # sum of squared prompt sizes
        self.cross = 0.0  # sum of prompt size x first-token time
        self.ttfts2 = 0.0  # sum of squared first-token times
        # The levels (first token less its prompt's prefill) of the calls sent at the top of
        # the limit, and of those sent below it (only calls admission placed).
        self.top: list[float] = []
        self.below: list[float] = []
        # Each first token and prompt size, for its slowest few (outlier_s; vegas only).
        self.each_ttft = array("d")
        self.each_prompt = array("d")

    def add(self, ttft_s: float, prompt_k: float) -> None:
        if self.keep:
            self.each_ttft.append(ttft_s)
            self.each_prompt.append(prompt_k)
        self.n += 1
        self.ttfts += ttft_s
        self.ttfts2 += ttft_s * ttft_s
        self.prompts += prompt_k
        self.prompts2 += prompt_k * prompt_k
        self.cross += prompt_k * ttft_s

    def sent_at(self, level: float, top: bool) -> None:
        """A first token's level, and whether its call was sent at the top of the limit."""
        (self.top if top else self.below).append(level)

    def top_wait(self) -> TopWait:
        """How much longer the calls sent at the top of the limit waited for their first token
        than those sent below it, in the same window (the same provider, prompts and tenants).

        Ranks, not means: first tokens have long tails, and a few slow ones among a handful of
        top calls must not read as a queue. The rank sum of the top calls among all (ties
        count half) is compared with its spread under chance (Mann-Whitney); the wait is the
        difference of the two medians."""
        top, below = self.top, self.below
        n_top, n_below = len(top), len(below)
        if n_top < _TOP_MIN or n_below < 2:
            return TopWait(n_top, 0.0, 0.0)
        below.sort()
        top.sort()
        rank = 0.0
        for level in top:
            under = bisect.bisect_left(below, level)
            rank += under + 0.5 * (bisect.bisect_right(below, level) - under)
        spread = math.sqrt(n_top * n_below * (n_top + n_below + 1) / 12)
        z = (rank - n_top * n_below / 2) / spread
        return TopWait(n_top, z, _median(top) - _median(below))

    def outlier_s(self, prefill_s: float, share: float = _TRIM) -> float:
        """What counting the slowest ``share`` of the first tokens (one at least) at the level
        of the slowest of the rest (at ``prefill_s``) takes off the window's sum.

        A provider's slow few (2 % of first tokens 5x the rest, or 1 % at 10x: a cache miss,
        a busy replica) are no queue, and at small limits one of them in a window of ten
        calls raised its mean by a third: the limit read that as a queue and cut, and read
        the next one the same way at its smaller windows (64 slots, first tokens otherwise
        lognormal with sigma 0.2, eight seeds: 2 % at 5x averaged 5-8 of 64 in three and 42
        in one, 1 % at 10x 5-13 in all eight; tests/unit/test_concurrency_limit.py). Windows
        with more of them than it counts so still read them as a queue now and then (55-66
        of 64 on average, 45-65 at the least).
        A queue delays every call that meets it, and the rest of the window shows it all the
        same. Counted at the next slowest's level, not dropped: dropping the slowest tenth
        took with it the calls a partial queue delays, and a deterministic upstream's knee
        was lost (docs/architecture.md, "First tokens scatter by themselves"). The window's
        scatter (``moments``) stays the whole window's: the slow few are the provider's own,
        and widen what chance explains."""
        if not self.keep:  # a window begun under ``aimd`` (then a reload): its plain mean
            return 0.0
        n = self.n
        k = math.ceil(share * n)
        if n <= k:
            return 0.0
        top = heapq.nlargest(k + 1, (ttft - prefill_s * prompt
                                     for ttft, prompt in zip(self.each_ttft, self.each_prompt)))
        return sum(top[:k]) - k * top[k]

    def level(self, prefill_s: float, less_s: float = 0.0) -> float:
        """The window's mean first-token time with the prefill of its prompts taken off (at
        ``prefill_s`` per thousand prompt tokens): what an empty prompt would have seen, with
        ``less_s`` taken off the sum first (what ``outlier_s`` returned, or nothing)."""
        return max(0.0, (self.ttfts - less_s - prefill_s * self.prompts) / self.n)

    def excess_s(self, baseline: float, scatter_s: float, prefill_s: float,
                 less_s: float = 0.0) -> float:
        """Mean first-token time above the no-load ``baseline`` (of an empty prompt), less
        what the provider's own scatter of first tokens (``scatter_s``, one standard
        deviation) would put there by chance: ``_NOISE_Z`` standard errors of the mean.
        ``less_s`` as for ``level``."""
        allowance = _NOISE_Z * scatter_s / math.sqrt(self.n)
        return max(0.0, self.level(prefill_s, less_s) - baseline - allowance)

    def moments(self) -> _Moments:
        """The sums about the window's means that give its scatter at any prefill rate."""
        n = self.n
        return _Moments(n, self.prompts2 - self.prompts * self.prompts / n,
                        self.cross - self.prompts * self.ttfts / n,
                        self.ttfts2 - self.ttfts * self.ttfts / n)

    def rate(self, elapsed: float) -> float:
        """Calls going through per second, for Little's law: completions, or first tokens
        when they run ahead (in slow start the completions lag the calls sent)."""
        return max(self.ok, self.n) / elapsed


class AdaptiveLimit:
    """A concurrency limit within ``[min_limit, max_limit]``; see the module docstring."""

    def __init__(self, settings: ConcurrencySettings, now: float,
                 calls: CallsInFlight | None = None) -> None:
        """``calls``: the calls in flight now, for a queue too recent for Little's law and
        for the concurrency a decrease starts from (without it, decisions go by the calls
        that finished only)."""
        self._settings = settings
        self._calls = calls
        self._limit = float(settings.initial_limit)
        self._last_decrease = -math.inf
        self._last_increase = now
        self._brake = _LatencyBrake(settings.latency_brake) if settings.latency_brake else None
        self._window = _Window(now, settings.algorithm == "vegas")
        # The window's mean first token and mean prompt (thousands of tokens), smoothed over
        # about two windows; the baseline keeps them as they were, so that each is valued at
        # the prefill time learned by now.
        self._smoothed: tuple[float, float] | None = None
        # The windows' prefill estimates, weighted by their precision and decayed: the prefill
        # time per thousand prompt tokens is their weighted mean.
        self._prefill_weight = 0.0
        self._prefill_sum = 0.0
        # (when, ttft, prompt, moments, spread): the smoothed levels, each window's moments
        # (the provider's scatter, _rest) and the variance of the smoothed level in units of
        # one first token's (1/n for a window of n, less once smoothed): how far chance may
        # have put it below the true level
        self._baseline: deque[tuple[float, float, float, _Moments, float]] = deque()
        self._spread = 0.0  # that of the smoothed level now
        # The no-load level and the provider's scatter, as of the last decision (_rest).
        self._rest_at: tuple[float, float] | None = None
        # Windows in a row, up to the last decided, that read a queue over _CONFIRM_SHARE of
        # the tolerance since the last cut: a narrow one cuts only after a few (_decide).
        self._queue_run = 0
        self._held = False  # the last window held for want of that: no slow-start growth
        self._slow_start = True
        # Slow start no longer finding capacity: held by calls overdue for their first token
        # (_decide), or no progress for the horizon while the demand filled the limit
        # (_lapse). A queue of the gateway's own is overload again, until the limit grows.
        self._stalled = False
        # When slow start last made progress: grew, counted a first token toward the first
        # window's baseline (growth waits for it), or met a demand below the limit; and how
        # long successful calls take (EWMA, None before the first): progress must come
        # within about two calls (exploring).
        self._progress_at = now
        self._bound_since: float | None = None  # since when the demand fills the limit
        # The quickest success of this slow start (s): successes that took much longer were
        # queued, for growth without first tokens (_slow_start_step).
        self._quickest_call = math.inf
        # The first window is open: first tokens count as progress toward its baseline. A
        # window closed without one (mostly calls that do not stream) ends that.
        self._measuring = True
        self._call_s: float | None = None
        self._window_limit = self._limit  # the limit when the window began
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
        # Where the limit stood before the top signal took slots off it (_TOP_FLOOR): set by
        # every other decrease, raised by growth.
        self._top_anchor = self._limit
        # The queue the calls sent at the top of the limit met in the last window (requests
        # ahead of them: calls/s x their extra wait), when their ranks stood out (for status).
        self.top_queue: float | None = None
        # Windows in a row in which the queue at the top stood out (and the limit could act on
        # it); any other decrease starts the count again.
        self._top_seen = 0
        # Windows it stood out with the limit at its floor, since it was last quiet above it.
        self._top_stuck = 0
        self._top_off_until = -math.inf  # the top taken for slow by nature until then
        self._top_took_probes = False  # the top took back a probe since the window's mean

    @property
    def limit(self) -> int:
        """The current limit: how many calls may be in flight to the deployment at once."""
        return int(self._limit)

    @property
    def settings(self) -> ConcurrencySettings:
        return self._settings

    def exploring(self, now: float, binding: bool = True) -> bool:
        """In slow start and still growing: the limit has met no sign of the upstream's
        capacity yet (no error, no queue inside it), so requests queued for a slot wait for
        the limit to find it, not for an upstream that is full. Admission does not shed for
        that wait (ShedState.roll): a new gateway in front of an idle provider would answer
        503 "overloaded" to the first burst of calls to a slow model.

        Still growing means progress within the last two calls (or decision windows, if
        longer): growth per call, first tokens counted toward the first baseline, or calls
        that found the limit not in the way (the demand below it). A slow start that no
        longer grows while the demand fills the limit (late first tokens, calls overdue for
        theirs, only the additive step of a window) has found what it can, and a queue behind
        it is overload: from then on it stays so until the limit grows again (a few long calls
        ending must not stretch the horizon back over a stall). Time counts toward the horizon
        only while the limit binds (``binding``: the demand fills it), so an idle gap before a
        burst is no stall.

        ``binding``: whether the demand fills the limit now (admission's ``demand``)."""
        self._lapse(now, binding)
        return (self._slow_start and not self._stalled
                and self._limit < self._settings.max_limit)

    def _lapse(self, now: float, binding: bool) -> None:
        """Mark slow start stalled once the limit has bound for the horizon (two calls, or
        decision windows) without progress (``exploring``). Checked at every call's events as
        well as by admission, before a long call's end stretches the horizon."""
        if not self._slow_start or self._stalled:
            return
        if not binding:
            self._bound_since = None
            return
        if self._bound_since is None:
            self._bound_since = now
        if self._call_s is None:
            return  # no call has ended yet: the first round trip is still out
        horizon = 2 * max(self._settings.decision_window_s, self._call_s)
        if now - max(self._progress_at, self._bound_since) > horizon:
            self._stalled = True

    @property
    def baseline_s(self) -> float | None:
        """The no-load time to first token of an empty prompt (None before any is measured):
        the lowest level the provider surely reaches at rest, so a little above the least
        level seen where first tokens scatter (``_rest``)."""
        return self._rest_at[0] if self._rest_at is not None else None

    def _rest(self) -> tuple[float, float]:
        """The no-load level and the provider's own scatter of one first token (s), at the
        prefill learned by now; kept until the next decision (``_rest_at``: the baseline and
        the prefill change only then).

        The level is the least, over the baseline windows, of the smoothed level (prefill
        taken off) plus ``_BASELINE_Z`` standard errors of it. The scatter is that of the
        window at rest, the one the least came from: a queue adds scatter (some calls wait,
        others do not) but raises the level with it, so a queued window is not the one at
        rest. From a long tail (a first token's p99 several times its median) the window at
        rest is mostly one that by chance missed the slow few, and its scatter a fraction of
        the provider's; the baseline windows' typical scatter is nearer, but it counts only
        up to ``_SCATTER_TRUST`` times the resting window's, for a queue's scatter."""
        prefill = self.prefill_s
        windows = [(ttft - prefill * prompt, moments.scatter_s(prefill), spread)
                   for _, ttft, prompt, moments, spread in self._baseline]
        level, scatter = min((level + _BASELINE_Z * scatter * math.sqrt(spread), scatter)
                             for level, scatter, spread in windows)
        scatters = sorted(scatter for _, scatter, _ in windows)
        typical = scatters[len(scatters) // 2]
        trusted = scatter
        if len(windows) >= _BASELINE_MIN_WINDOWS:
            # The calmer half of the windows (the lower levels): a window at rest by chance
            # may be one that missed the slow few of a mixture (5 % of calls at 2x, first
            # tokens otherwise exact: its scatter nil, and the mixture read as a queue that
            # cut a 64-slot limit to 8-42), while a queue's scatter comes with a higher level.
            # Not before the baseline has a few windows: in slow start half of them queued.
            calmer = sorted(windows)[:(len(windows) + 1) // 2]
            trusted = max(trusted, math.sqrt(sum(sc * sc for _, sc, _ in calmer) / len(calmer)))
        self._rest_at = (max(0.0, level), max(scatter, min(typical, _SCATTER_TRUST * trusted)))
        return self._rest_at

    @property
    def prefill_s(self) -> float:
        """Learned first-token time per thousand prompt tokens (0 until prompts of different
        sizes have been seen, and never negative)."""
        if self._prefill_weight <= 0:
            return 0.0
        return max(0.0, self._prefill_sum / self._prefill_weight)

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
        to the first streamed token; None when not streamed, or when ``on_first_token``
        reported it already) and ``prompt_tokens`` feed the queueing signal; ``duration_s``
        (how long the call held its slot) the error decrease.
        """
        if outcome == "ignore":
            return
        self._lapse(now, in_flight >= self.limit)
        window = self._window
        if outcome == "success":
            window.ok += 1
            if duration_s is not None:
                window.busy_ok += max(0.0, duration_s)
                took = max(0.0, duration_s)
                self._call_s = took if self._call_s is None else (
                    self._call_s + _CALL_WEIGHT * (took - self._call_s))
            if ttft_s is not None and ttft_s >= 0:
                if self._first_token(now, ttft_s, prompt_tokens):
                    outcome = "overload"
                else:
                    self._slow_start_step(now, in_flight, ttft_s, prompt_tokens, duration_s)
            elif ttft_s is None:
                self._slow_start_step(now, in_flight, None, prompt_tokens, duration_s)
        if outcome == "timeout":
            if self._queue_reading(now) is False:
                return  # a stuck call, not a queue: cutting the limit would not help it
            outcome = "overload"
        if outcome == "client_timeout":
            # A client's own short deadline ran out (attempts._impatient): a queue only when
            # the first tokens show one. Read as an error, one tenant's X-Request-Timeout: 0.1
            # took the limit every tenant shares to its minimum wherever first tokens said
            # nothing (aimd, calls not streamed, before the baseline).
            if self._queue_reading(now) is not True:
                return
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
        self._maybe_decide(now, in_flight)

    def on_first_token(self, now: float, ttft_s: float, prompt_tokens: int | None,
                       demand: int, top: bool | None = None) -> None:
        """Feed the first streamed token of a call still in flight, as it arrives: the queue
        signal then lags the provider by one time to first token, not by a whole call (an
        answer streams for seconds to minutes, and a limit that learns of a queue only when
        the calls that met it end has long since grown past the knee). ``demand`` as for
        ``on_sample``; the call's ``on_sample`` then passes no ``ttft_s``. ``top``: whether
        the call was sent at the top of the limit (None: not known), for the queue at the top
        (``_decide``)."""
        if ttft_s < 0:
            return
        self._lapse(now, demand >= self.limit)
        if top is not None:
            self._window.sent_at(ttft_s - self.prefill_s * thousands(prompt_tokens), top)
        if self._first_token(now, ttft_s, prompt_tokens):
            self._decrease_on_error(now)
            return
        if self._settings.algorithm == "vegas":  # aimd counts the call once, at its end
            self._slow_start_step(now, demand, ttft_s, prompt_tokens)
        self._maybe_decide(now, demand)

    def _first_token(self, now: float, ttft_s: float, prompt_tokens: int | None) -> bool:
        """Count a first token in the window; whether the latency brake calls it overload."""
        self._window.add(ttft_s, thousands(prompt_tokens))
        if not self._baseline and self._measuring:
            self._progress_at = now  # toward the first baseline, which growth waits for
        return self._brake is not None and self._brake.slow(ttft_s, prompt_tokens or 0)

    def _slow_start_step(self, now: float, demand: int, ttft_s: float | None,
                         prompt_tokens: int | None, duration_s: float | None = None) -> None:
        """Slow start's growth per call: ``_SLOW_START_GAIN`` for a first token that came on
        time, or (no call streaming, or ``aimd``) for a success, while the demand fills the
        limit. Per window it took a cold start seconds per step against a slow model (first
        tokens of 5 s, or whole answers of 5 s not streamed: a window waits for them), while
        the requests beyond the limit queued in the gateway. The window still tops growth up
        to x1.5 (``_decide``), and ends slow start at the first queue it cuts for or holds
        within the tolerance; a window held for want of confirmation stops this growth until
        the next decision. Calls sent past the knee wait inside the provider and their first
        tokens come late, adding nothing; but a call that waited less than half a first token
        counts as on time, so where first tokens are a large part of a call (or calls are
        short) the overshoot can pass half the knee before the window's queue estimate cuts it
        back (about as far as x1.5 per window went). ``aimd`` counts each call once, at its
        end.

        A success counts only when the call took no longer than ``_ON_TIME_FACTOR`` times the
        quickest success of this slow start: without a first token, a call queued inside the
        provider shows only as a longer call. Answers of different lengths make many calls
        late, which only stalls growth (and exploring) sooner: the cautious side."""
        if not self._slow_start or self._held:  # (errors end it: a return to _recover_to is
            return  # never one; a window held for a narrow queue: see _decide)
        latency = self._settings.algorithm == "vegas"
        by_time = ttft_s is None or not latency  # judged by how long the call took
        if by_time and duration_s is not None:  # the quickest is best seen unloaded
            self._quickest_call = min(self._quickest_call, duration_s)
        if demand < self.limit:
            self._progress_at = now  # the limit holds nobody back: nothing to find yet
            return
        if ttft_s is not None and latency:
            if not self._on_time(now, ttft_s, prompt_tokens):
                return
        elif latency and (self._window.n or self._smoothed is not None):
            return  # streamed calls judge it by their first tokens
        elif (duration_s is None
              or duration_s > _ON_TIME_FACTOR * self._quickest_call + _ON_TIME_SLACK_S):
            return
        self._set(self._limit + _SLOW_START_GAIN)
        self._stalled = False
        self._progress_at = now

    def _on_time(self, now: float, ttft_s: float, prompt_tokens: int | None) -> bool:
        """A first token at the no-load speed: within ``_ON_TIME_FACTOR`` of the baseline
        plus the prompt's prefill, with no more calls overdue for theirs than stop growth at
        a window (``_decide``): those show a queue inside the provider before their first
        tokens do. None is on time before the first window has measured the baseline:
        growth inside it would queue the calls whose first tokens become the baseline (at 4
        slots the limit then settled at 5)."""
        if self._rest_at is None:
            return False
        prefill = self.prefill_s
        baseline = self._rest_at[0]
        expected = baseline + prefill * thousands(prompt_tokens)
        if ttft_s > _ON_TIME_FACTOR * expected + _ON_TIME_SLACK_S:
            return False
        overdue = self._calls.overdue(now, baseline, prefill) if self._calls is not None else 0
        return overdue < max(_OVERDUE_MIN, self._tolerance())

    def _maybe_decide(self, now: float, in_flight: int) -> None:
        """Close the window once it is long enough, and act on what it saw."""
        s = self._settings
        window = self._window
        if now - window.start < s.decision_window_s:
            return
        if s.algorithm == "vegas" and window.n >= _MIN_SAMPLES:
            self._measuring = False
            self._decide(now, in_flight)
        elif s.algorithm == "aimd" or window.n == 0 or window.ok - window.n >= _MIN_SAMPLES:
            self._measuring = False
            # No latency signal to go by (AIMD, nothing streamed, or mostly calls that are not
            # streamed): successes alone let the limit grow.
            self._new_window(now)
            if in_flight >= s.min_utilization * self.limit:
                self._grow(now, s.increase_step)
        # else: a few first tokens only; the window goes on until it has enough

    def restart_low(self, now: float) -> None:
        """Back to ``min_limit`` (after a breaker closes): probe a recovering upstream gently,
        growing in slow start again."""
        self._limit = self._top_anchor = float(self._settings.min_limit)
        self._recover_to, self._recovering = None, False
        self._last_increase = now
        self._new_window(now)
        self._slow_start, self._stalled, self._progress_at = True, False, now
        self._bound_since, self._quickest_call, self._measuring = None, math.inf, True
        self._backoff = self._cuts = self._top_seen = self._top_stuck = 0
        self._top_off_until, self._top_took_probes = -math.inf, False
        self._probe_backoff, self._probing = _PROBE_BACKOFF, 0
        self._next_cut = -math.inf
        self._queue_run, self._held = 0, False

    def reconfigure(self, settings: ConcurrencySettings) -> None:
        """New bounds from a policy reload; the current limit is kept within them."""
        self._settings = settings
        before = self._limit
        self._limit = min(float(settings.max_limit), max(float(settings.min_limit), self._limit))
        self._follow_anchor(before)
        self._window_limit = self._limit  # the window's top-up counts from here
        self._queue_run = 0  # a new tolerance: what the windows before read is not comparable
        self._held = False  # (a reload to aimd would never decide it again)
        if settings.latency_brake is None:
            self._brake = None
        elif self._brake is None:
            self._brake = _LatencyBrake(settings.latency_brake)
        else:
            self._brake.ratio = settings.latency_brake

    # -- internals ----------------------------------------------------------------------------

    def _new_window(self, now: float) -> None:
        self._window = _Window(now, self._settings.algorithm == "vegas")
        self._window_limit = self._limit

    def _queue_reading(self, now: float) -> bool | None:
        """Whether, by time to first token, the upstream is queueing now: False when it
        answers at its no-load speed (then a call that timed out was stuck, a hung request or
        a bad connection, not queued behind others, and no reason to lower the limit), True
        when it queues past the tolerance, None when first tokens say nothing. Vegas only,
        once a baseline is known: this window's first tokens if it has a few, else the last
        decision's."""
        s = self._settings
        if s.algorithm != "vegas" or self._rest_at is None:
            return None
        tolerance = self._tolerance()
        window = self._window
        if window.n >= _MIN_SAMPLES // 2:
            elapsed = max(now - window.start, s.decision_window_s / 10)
            prefill = self.prefill_s
            # Every first token counts here (no outlier_s): with four to seven of them a queue
            # that is starting shows in one, and counted at the next one's level it would
            # excuse the timeout it caused.
            excess_s = window.excess_s(*self._rest_at, prefill)
            return window.rate(elapsed) * excess_s > tolerance
        if now - self._decided_at > 2 * s.decision_window_s or self.upstream_queue is None:
            return None
        return self.upstream_queue > tolerance

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
        self._top_seen = 0
        # The window after a decrease shows how the smaller limit copes: no increase yet.
        self._last_increase = now
        self._new_window(now)
        self._slow_start = False

    def _decide(self, now: float, demand: int) -> None:
        s = self._settings
        window, window_limit = self._window, self._window_limit
        elapsed = max(now - window.start, 1e-9)
        # Whether the last decision opened this window (not an error's decrease, a window
        # without first tokens or a restart since).
        follows = window.start == self._decided_at
        self._new_window(now)
        self._decided_at = now
        self._held = False
        moments = window.moments()
        evidence = moments.prefill_evidence()
        if evidence is not None:
            slope, weight = evidence
            # Within what providers do, and no one window more than all the past together: a
            # single huge prompt has the leverage to set a window's slope by itself. (A tenant
            # who sends one every window still drags the estimate: bounded by its token limits,
            # and no worse than the fixed normalisation it replaced, which the same prompt
            # skewed as much.)
            slope = min(_PREFILL_MAX_S, max(0.0, slope))
            if self._prefill_weight > 0:
                weight = min(weight, self._prefill_weight)
            self._prefill_weight = _PREFILL_MEMORY * self._prefill_weight + weight
            self._prefill_sum = _PREFILL_MEMORY * self._prefill_sum + weight * slope
        prefill = self.prefill_s
        # The slowest few count at the next one's level (outlier_s): in the level, the
        # smoothed mean the baseline keeps, and the excess. (The baseline's windows were so
        # ranked at the prefill of their day; valued at today's, the difference is the
        # prefill change times the slow few's prompts less the next one's, over the window:
        # nil while the prefill is.)
        outlier = window.outlier_s(prefill)
        mean_ttft = (window.ttfts - outlier) / window.n
        level = window.level(prefill, outlier)
        mean_prompt = window.prompts / window.n
        first = self._smoothed is None
        if self._smoothed is None:
            self._smoothed, self._spread = (mean_ttft, mean_prompt), 1 / window.n
        else:
            ttft0, prompt0 = self._smoothed
            self._smoothed = (ttft0 + _LEVEL_WEIGHT * (mean_ttft - ttft0),
                              prompt0 + _LEVEL_WEIGHT * (mean_prompt - prompt0))
            self._spread = ((1 - _LEVEL_WEIGHT) ** 2 * self._spread
                            + _LEVEL_WEIGHT ** 2 / window.n)
        horizon = now - s.baseline_window_s
        while len(self._baseline) >= _BASELINE_MIN_WINDOWS and self._baseline[0][0] < horizon:
            self._baseline.popleft()
        self._baseline.append((now, *self._smoothed, moments, self._spread))
        baseline, noise = self._rest()
        excess_s = window.excess_s(baseline, noise, prefill, outlier)
        queue = window.rate(elapsed) * excess_s  # Little's law
        self.upstream_queue = queue
        if first:
            return  # nothing to compare the first window with
        tolerance = self._tolerance()
        run = self._queue_run if follows else 0
        self._queue_run = run + 1 if queue > _CONFIRM_SHARE * tolerance else 0
        # The queue at the top of the limit. With holdback the lower classes stop below the
        # limit and only bursts of critical calls reach its top: a limit a few calls past the
        # knee queues those inside the provider (where priority means nothing), while the
        # window's mean, over every call, stays within the tolerance (64 slots: the limit at
        # 65-69, the estimate 0.2-0.7 of a tolerance of 2). The calls sent at the top are
        # compared with those sent below it in the same window, so whatever slows calls at
        # random (scatter, a share of slow ones) is on both sides; a queue only on one.
        top = window.top_wait()
        self.top_queue = window.rate(elapsed) * max(0.0, top.wait_s) if top.z > _TOP_Z else 0.0
        floor = _TOP_FLOOR * self._top_anchor
        # Only past slow start (which its own checks end), and only where the floor leaves the
        # top a slot to take (a limit of 10 or more): below, the top signal does nothing.
        acting = (not self._slow_start and self._top_anchor - floor >= 1.0
                  and now >= self._top_off_until)
        stands_out = acting and self.top_queue > tolerance
        # A queue at the top the limit can still act on: at its floor the top's calls hold
        # nothing back (growth, a probe's success).
        at_top = stands_out and self._limit - 1 >= floor
        if top.n >= _TOP_MIN:  # (too few top calls to tell: the counts stand)
            self._top_seen = self._top_seen + 1 if at_top else 0
            if stands_out and not at_top and queue <= tolerance:
                self._top_stuck += 1  # (a queue the window's mean sees is no one's nature)
            elif not stands_out and self._limit - 1 >= floor:
                self._top_stuck = 0  # quiet above its floor: the top's queue went away
            if self._top_stuck >= _TOP_STUCK:
                self._top_off_until = now + _TOP_REST_S
                self._top_stuck = self._top_seen = 0
                if self._top_took_probes:
                    # The probes it took back were no queue's: probe freely again (a wait
                    # that the window's mean set stays).
                    self._probe_backoff = _PROBE_BACKOFF
                    self._backoff = min(self._backoff, _PROBE_BACKOFF)
                    self._top_took_probes = False
        # A queue of ours delays most calls that meet it; a provider's slow few are a handful
        # of calls far out. A window with more of them than ``outlier_s`` counts apart read
        # as a queue and cut, and as the limit fell its smaller windows met the next ones
        # sooner: 5 % of first tokens at 10x the rest held a 64-slot limit at 4 (its mean
        # from 120 s 8 of 64 over eight seeds), 3 % at 10x and 10 % at 5x at about 31. Such
        # a queue is narrow: within the tolerance once the window's slowest quarter counts
        # at the next one's level. A narrow queue cuts only when the windows before showed a
        # queue too, ``_CONFIRM_WINDOWS`` in a row (a queue of ours stands until a cut drains
        # it, while the slow few come and go: more of them than a window counts apart is a
        # chance of a fifth to a half at that share, one window after the other much less),
        # or when it is surely ours: the calls at the top waited more than the rest (ranks:
        # the slow few fall on both sides) or the limit is on its x1.5 return after errors.
        # A window that follows no decision (after an error's decrease, a restart, windows
        # without first tokens) has none before it: it starts the count. Unconfirmed, the
        # window holds, and slow start's growth per call with it (else it would go on x1.5
        # a round trip while the queue waits for confirmation). A broad queue cuts at once:
        # at 16 slots the window's mean finds the knee as a 3x load arrives, and a window's
        # delay let critical calls queue inside the provider (a cut confirmed by the window
        # before cost that target).
        if queue > tolerance:
            self._top_seen = 0  # the mean's cut (or hold) decides
            confirmed = run >= _CONFIRM_WINDOWS or self._recovering or stands_out
            if not confirmed:
                wide = window.excess_s(baseline, noise, prefill,
                                       window.outlier_s(prefill, _TRIM_WIDE))
                confirmed = window.rate(elapsed) * wide > tolerance
            self._held = not confirmed
            if confirmed and now >= self._next_cut:
                # The effect of a decrease shows once the provider's queue has drained and
                # calls sent after it have their first token: not before ~ wait + TTFT.
                self._next_cut = now + s.decision_window_s + excess_s + mean_ttft
                # What is actually in flight (else Little's law on the calls that finished,
                # which lags by a whole call): a limit above it binds nobody, and cutting
                # only the headroom would change nothing the provider sees.
                used = window.busy_ok / elapsed if window.busy_ok > 0 else self._limit
                if self._calls is not None:
                    used = max(used, float(self._calls.in_flight))
                self._decrease_on_queue(now, queue, tolerance, level, (mean_ttft, mean_prompt),
                                        _Moments.of_scatter(noise, window.n),
                                        min(self._limit, used))
            return
        if (at_top and self._top_seen >= _TOP_WINDOWS and not self._slow_start
                and now >= self._next_cut):
            self._top_seen = 0
            # The calls at the top wait about a slot's turn more for every slot past the knee,
            # and a slot's turn is one over the rate calls go through: the queue they met is
            # about the slots past it. Down by that (less half the tolerance, as a cut), at
            # least one slot, given time to show as a cut is. One slot at a time took a limit
            # that grew past the knee while no call used its top (the lower classes stop at
            # their share) most of a 15 s burst of critical calls to come back. Nothing else
            # changes: a return after errors goes on, and an error right after is still one.
            self._next_cut = now + s.decision_window_s + top.wait_s + mean_ttft
            self._queue_run = 0  # a cut starts the count again
            step = max(1.0, self.top_queue - 0.5 * tolerance)
            self._set(max(floor, self._limit - step), top=True)
            if self._probing:  # our own probe, taken back at once: probe half as often
                self._probe_backoff = min(2 * self._probe_backoff, _PROBE_BACKOFF_MAX)
                self._backoff = self._probe_backoff
                self._top_took_probes = True
            self._probing = 0
            return
        self._cuts = 0
        # Calls still waiting for a first token long past the no-load time are queued inside
        # the provider now; Little's law sees them only once their first token comes, a whole
        # call later when calls stream for minutes. They stop growth (never cut: a first token
        # can be late for other reasons).
        # Two at least, and a whole tolerance: one stream stuck behind a huge prompt, or held
        # back by its tenant, must not freeze the limit for everyone.
        overdue = self._calls.overdue(now, baseline, prefill) if self._calls is not None else 0
        quiet = queue < 0.5 * tolerance
        calm = quiet and not at_top and overdue < max(_OVERDUE_MIN, tolerance)
        if self._probing and calm:
            self._probing -= 1
            if not self._probing:  # the provider took the probe: probe freely again
                self._probe_backoff = _PROBE_BACKOFF
        if self._backoff > 0:
            self._backoff -= 1
            return
        if calm and demand >= s.min_utilization * self.limit:
            self._probing = 0 if self._slow_start else 2
            # Slow start multiplies only a limit the demand fills (as TCP grows its window
            # only while the window limits it, RFC 7661): headroom no load has tried says
            # nothing of the knee, and x1.5 on x1.5 of it lets the next burst find the knee by
            # overflowing the provider's queue (64 slots, 400 ms first tokens: the limit went
            # 45 -> 102 -> 153 -> 223 with 54-84 in flight, then 429s from the full queue).
            filled = self._slow_start and demand >= self.limit
            step = s.increase_step
            if filled:  # x1.5 over the window, counting what on-time first tokens added
                step = max(step, 0.5 * window_limit) - (self._limit - window_limit)
            before = self._limit
            if step > 0:
                self._grow(now, step)
            if filled and self._limit > before:  # a slow-start step (additive ones are not)
                self._progress_at, self._stalled = now, False
            return
        if not quiet:
            self._slow_start = False  # near the knee: slow start is over (overdue calls only
            # hold it: they may be one tenant's)
        elif self._slow_start and demand >= self.limit:
            self._stalled = True  # held by overdue calls: no longer finding capacity

    def _decrease_on_queue(self, now: float, queue: float, tolerance: float, level: float,
                           means: tuple[float, float], moments: _Moments,
                           used: float) -> None:
        s = self._settings
        # Decreases in a row, each given time to show, and TTFT did not come down after any
        # of them: the provider got slower for everyone (or our limit is at its floor). The
        # latency is its new normal, not a queue of ours. TTFT that rose a lot since the last
        # decrease starts the count again: the provider changed (it may have lost capacity,
        # and a queue of ours then grows until the decreases catch up with it).
        self._queue_run = 0  # a cut (or a new baseline) starts the count again
        steady = 0.95 * self._cut_from <= level <= _CHANGED * self._cut_from
        self._cuts = self._cuts + 1 if self._cuts and steady else 1
        self._cut_from = level
        if self._cuts >= _REBASE_AFTER or self._limit <= s.min_limit:
            # The provider's scatter as it was at rest goes with the new level (``moments``):
            # the queued window's own scatter is its waits', and taken for the provider's it
            # would hide the next queue.
            self._baseline.clear()
            self._smoothed, self._spread = means, 1 / moments.n
            self._baseline.append((now, *means, moments, self._spread))
            self._rest()
            self._cuts = 0
            # Where the knee is now is unknown: probe for it at once, and freely. A queue was
            # seen all the same: slow start is over (at the floor the knee is at or below it).
            self._backoff, self._probe_backoff = 0, _PROBE_BACKOFF
            self._slow_start = False
            return
        # Down by the excess queued, from the concurrency the window actually used (with
        # holdback the lower classes stop below the limit, so a limit past the knee can sit
        # above what is in flight), never below half of it at once.
        self._set(max(0.5 * used, used - (queue - 0.5 * tolerance)))
        # the provider queues here: the old limit was past its knee
        self._recover_to, self._recovering = None, False
        self._top_took_probes = False  # the wait set below is the window's mean's
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

    def _set(self, value: float, top: bool = False) -> None:
        """``top``: a decrease for the queue at the top of the limit, which the anchor
        (_TOP_FLOOR) ignores. Any other decrease takes the anchor down in proportion, so the
        slots the top took stay taken but are not taken again (set to the new limit, each
        error or cut would give the top another tenth below it); growth raises it once the
        limit passes it."""
        s = self._settings
        before = self._limit
        self._limit = min(float(s.max_limit), max(float(s.min_limit), value))
        if not top:
            self._follow_anchor(before)

    def _follow_anchor(self, before: float) -> None:
        """The top's anchor after the limit moved from ``before`` by anything but the top:
        down in proportion, up once the limit passes it (_TOP_FLOOR)."""
        if self._limit < before:
            self._top_anchor *= self._limit / before
        self._top_anchor = min(float(self._settings.max_limit),
                               max(self._top_anchor, self._limit))


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
