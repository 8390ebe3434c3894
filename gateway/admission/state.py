"""Admission's data: the request, the permit, the observer hooks, per-deployment state.

The controller (admission/controller.py) decides with these; other modules import the public names
from ``gateway.admission``.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.config import AdmissionPolicy, Priority

from .concurrency import OVERDUE_FACTOR, AdaptiveLimit, Outcome, size_factor, thousands
from .pacing import ProviderPace
from .queue import FairQueue
from .shed import DecayingRate, ShedReason, ShedState

DeadlineStage = Literal["admission", "queue"]
_TTFT_WEIGHT = 0.2  # EWMA weight of a new first-byte time
# The deadline check's optimistic estimate: this low percentile of the last _RECENT_TTFT first
# bytes, each less the prefill of its prompt, plus the prefill of the request's own prompt at
# the rate the limit learned (AdaptiveLimit.prefill_s; none until prompts of different sizes
# showed one). Low, not the minimum: one lucky answer must not let every request in.
_RECENT_TTFT = 64
_OPTIMISTIC_RANK = 0.1
# A class's share of the limit that falls between whole slots (0.95 x 4 = 3.8) is a slot it may
# fill that fraction of the time. Time more than one slot above the share adds at most this
# many seconds of repayment to what it owes (DeploymentState.settle).
_LEND_MEMORY_S = 10.0
_PAID = 1e-9  # slot-seconds owed that count as none (float sums do not return to 0 exactly)
# A slot lent to a class is lent only while the classes above would wait at most this long for
# it, whatever their queue targets: critical's target (1 s) is long so that its bursts queue
# instead of being shed, not so that a lent slot may keep it waiting that long.
_LEND_WAIT_MAX_S = 0.5
# The top of the limit is at least its last this many slots (DeploymentState.at_top).
_TOP_SLOTS = 2


def _effective(shares: tuple[float, ...], present: list[bool]) -> tuple[float, ...]:
    """Each class's holdback share, or the whole limit when no class above it is present."""
    out: list[float] = []
    above = False
    for share, here in zip(shares, present, strict=True):
        out.append(share if above else 1.0)
        above = above or here
    return tuple(out)


def _held_share(shares: tuple[float, ...], present: list[bool]) -> float | None:
    """The largest holdback share below a whole limit among the classes present (None: each
    may fill it): above it only the classes with the whole limit go, the top
    (DeploymentState.at_top)."""
    held = [share for share, here in zip(shares, present, strict=True) if here and share < 1.0]
    return max(held) if held else None


def _lend_waits(policy: AdmissionPolicy) -> tuple[float, ...]:
    """Per class, the shortest queue target (seconds) of the classes above it, at most
    ``_LEND_WAIT_MAX_S``: how long a request of theirs may wait for a slot that this class was
    lent (see ``cap``)."""
    targets = [policy.classes.of(p).queue_target_ms / 1000 for p in Priority]
    return tuple(min([*targets[:p], _LEND_WAIT_MAX_S]) if p else math.inf
                 for p in range(len(targets)))


def is_client_retry(headers: Mapping[str, str]) -> bool:
    """Whether the SDK marks this as a retry (``x-stainless-retry-count`` > 0)."""
    value = headers.get("x-stainless-retry-count", "0").strip()
    return value.isascii() and value.isdigit() and int(value) > 0  # "²".isdigit() is True


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What admission needs to know about one request. Times are on the controller's clock."""

    priority: Priority
    tenant: str
    tokens: int  # estimated prompt + max output tokens: the request's cost in fair queueing
    deadline: float  # absolute (``Deadline.at``)
    arrived: float  # when it reached the gateway; earlier wins ties in fair queueing
    agent_session: str | None = None  # X-Agent-Session: the shedding cohort
    is_retry: bool = False  # x-stainless-retry-count > 0: shed before first attempts
    prompt_tokens: int | None = None  # for the limiter's latency brake (defaults to ``tokens``)
    streamed: bool = False  # asks for a stream: its first token is awaited (the queue signal)
    # a model call, a step of its run: only those mark a session as a run in progress (a token
    # count is no step, and must not buy a session the exemption from cohort shedding)
    step: bool = True

    @property
    def prompt_size(self) -> int:
        """Prompt tokens for latency estimates (``tokens`` when the prompt alone is unknown)."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.tokens


class AdmissionObserver:
    """Metrics hooks, all no-ops here: override what you need. Called synchronously on the hot
    path, so keep them cheap and never raise. ``deployment`` is None for door (self-protection)
    sheds."""

    def on_shed(
        self, deployment: str | None, priority: Priority, reason: ShedReason, shadow: bool
    ) -> None:
        """A request refused (or, in shadow mode, that would have been)."""

    def on_queue_delay(self, deployment: str, priority: Priority, delay_s: float) -> None:
        """A request admitted after ``delay_s`` in the queue (0 when admitted at once)."""

    def on_deadline(self, deployment: str, priority: Priority, stage: DeadlineStage) -> None:
        """A request refused with 504 because its deadline could not be met."""

    def on_limit(self, deployment: str, limit: int) -> None:
        """The deployment's concurrency limit changed."""


# The controller's bookkeeping when a permit is released:
# (state, priority, outcome, ttft_s, prompt tokens, granted_at, pace sequence number).
ReleaseHook = Callable[
    ["DeploymentState", Priority, Outcome, "float | None", int, float, int], None]
# ... and when its answer's headers arrive: (state, pace sequence number, headers, was a 429).
RateHook = Callable[["DeploymentState", int, Mapping[str, str], bool], None]
# (deployment, seconds from sending to the first streamed token, prompt tokens, whether the
# call was sent at the top of the limit)
FirstTokenHook = Callable[["DeploymentState", float, int | None, bool], None]


class Permit:
    """A slot under a deployment's limit. ``release`` exactly once; later calls do nothing."""

    __slots__ = ("_at_top", "_awaiting", "_on_first_token", "_on_rate", "_on_release",
                 "_pace_seq", "_prompt_tokens", "_released", "_state", "_ttft_reported",
                 "deployment", "granted_at", "priority", "queued_s")

    def __init__(self, state: DeploymentState, req: AdmissionRequest, granted_at: float,
                 queued_s: float, on_release: ReleaseHook, on_rate: RateHook,
                 on_first_token: FirstTokenHook, pace_seq: int = -1) -> None:
        self.deployment = state.label
        self.priority = req.priority
        self.granted_at = granted_at
        self.queued_s = queued_s  # time spent in the admission queue
        self._state = state
        self._on_release = on_release
        self._on_rate = on_rate
        self._on_first_token = on_first_token
        self._ttft_reported = False
        self._pace_seq = pace_seq
        # Whether this call took a slot at the top of the limit: the limit compares the first
        # tokens of calls sent there with the others' (AdaptiveLimit._decide).
        self._at_top = state.at_top()
        self._prompt_tokens = req.prompt_tokens if req.prompt_tokens is not None else req.tokens
        # Its key among the calls awaiting a first token (-1: not streamed, not awaited).
        self._awaiting = state.await_first_token(granted_at, self._prompt_tokens) if (
            req.streamed) else -1
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def observe_rate(self, headers: Mapping[str, str], status: int) -> None:
        """The upstream answered (any status): the request quota its headers report, if any,
        paces the deployment's next requests (admission/pacing.py). Call before ``release``."""
        if not self._released:
            self._on_rate(self._state, self._pace_seq, headers, status == 429)

    def first_token(self, ttft_s: float) -> None:
        """The first streamed token came, ``ttft_s`` after sending: it feeds the limit's queue
        signal now, while the answer still streams (once; ``release`` then skips it)."""
        if not self._released and not self._ttft_reported:
            self._ttft_reported = True
            self._state.awaiting.pop(self._awaiting, None)
            self._on_first_token(self._state, ttft_s, self._prompt_tokens, self._at_top)

    def no_first_token(self) -> None:
        """The answer will not stream (a whole body, or an error): its first token is not
        awaited, and the call is not overdue for one."""
        self._state.awaiting.pop(self._awaiting, None)

    def release(self, outcome: Outcome, ttft_s: float | None = None) -> None:
        """Give the slot back and feed the limit.

        ``outcome``: ``success``; ``overload`` for a provider 429, 5xx/529, connect error or
        first-byte timeout; ``client_timeout`` for a client's own short deadline that ran out
        (a queue only where first tokens show one); ``ignore`` for a client cancel or a 4xx.
        ``ttft_s``: seconds from sending to the upstream's first streamed byte. Pass None for
        non-streamed calls (their first byte is the whole answer and would inflate the
        estimate that deadline checks use) and when no byte came.
        """
        if self._released:
            return
        self._released = True
        self._state.awaiting.pop(self._awaiting, None)
        if self._ttft_reported:
            ttft_s = None  # counted when it came
        self._on_release(self._state, self.priority, outcome, ttft_s, self._prompt_tokens,
                         self.granted_at, self._pace_seq)


@dataclass(eq=False, slots=True)
class QueueEntry:
    """A waiting request: resolved with a ``Permit`` or a 504, or cancelled by its waiter."""

    req: AdmissionRequest
    enqueued_at: float
    future: asyncio.Future[Permit]
    timer: asyncio.TimerHandle | None = None  # fires when the deadline becomes infeasible
    # A plain client (no X-Agent-Session) that cohort shedding would have refused: it waits
    # in its class queue until then (its queue target) before 503 overloaded.
    shed_at: float | None = None

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def tenant(self) -> str:
        return self.req.tenant

    @property
    def cost(self) -> int:
        return self.req.tokens

    @property
    def arrived(self) -> float:
        return self.req.arrived


def _discard(ordered: list[float], value: float) -> None:
    """Take ``value`` out of the sorted list (it was put in computed the same way)."""
    del ordered[bisect.bisect_left(ordered, value)]


class DeploymentState:
    """Admission state of one deployment on this replica."""

    def __init__(self, label: str, policy: AdmissionPolicy, now: float) -> None:
        self.label = label
        self.limiter = AdaptiveLimit(policy.concurrency_for(label), now, self)
        # Streamed calls in flight that have not had their first token: key -> (granted at,
        # prompt tokens).
        self.awaiting: dict[int, tuple[float, int]] = {}
        self._next_key = 0
        self.in_flight = 0
        self.in_flight_by_class = [0] * len(Priority)
        self.queues: list[FairQueue[QueueEntry]] = [FairQueue() for _ in Priority]
        self.shed = ShedState(policy, now)
        self.ttft = policy.ttft_prior_s  # EWMA of first bytes: what status reports
        # Recent first bytes (seconds) and their prompts (tokens), and the same kept sorted two
        # ways (fastest_ttft), updated per first byte by insertion rather than sorted afresh
        # (this runs for every call): less each prompt's prefill at the rate _net_prefill, and
        # per size_factor, the fixed scaling.
        self._recent: deque[tuple[float, int | None]] = deque()
        self._net: list[float] = []
        self._net_prefill = 0.0
        self._scaled: list[float] = []
        self._prior = policy.ttft_prior_s
        self.drain = DecayingRate(policy.drain_window_s)
        self.pace = ProviderPace()  # the provider's request quota, from its answers' headers
        self.pacing = policy.concurrency_for(label).pace_by_rate_headers
        # Dispatch again when the quota has refilled or a class's share is repaid (controller).
        self.wake_timer: asyncio.TimerHandle | None = None
        # When a request last found its class's slots full (it queued or was shed): the limit
        # was what held it back, whatever the count of requests in flight says (see demand).
        self.slots_full_at = -math.inf
        # Per class, until when the provider's quota (as paced) holds its requests back: a
        # queue then is not the limit's to excuse (exploring).
        self.quota_held_until = [-math.inf] * len(Priority)
        # The policy's holdback shares (the quota's reserves go by them as they are:
        # quota_allows); per class, until when it is present (arrived); and the slot shares in
        # force (read on every admission): a class's own, or the whole limit while no class
        # above it is present, until _shares_until.
        self.policy_shares = policy.classes.holdback_shares()
        self._memory_s = policy.holdback_memory_s
        self._present_until = [-math.inf] * len(Priority)
        self.shares = _effective(self.policy_shares, self._present(now))
        self._held_share: float | None = None
        self._shares_until = math.inf
        self._lend_wait_s = _lend_waits(policy)
        # Per class: slot-seconds over its share the deployment has run since the class last
        # was within it (see cap); settled whenever the count in flight, the limit or the
        # shares change.
        self._owed = [0.0] * len(Priority)
        self._settled_at = now

    def reconfigure(self, policy: AdmissionPolicy, now: float) -> None:
        settings = policy.concurrency_for(self.label)
        self.settle(now)  # the time so far at the old limit and shares
        self.policy_shares = policy.classes.holdback_shares()
        if policy.holdback_memory_s != self._memory_s:  # presence counts from the last request
            self._present_until = [until - self._memory_s + policy.holdback_memory_s
                                   for until in self._present_until]
            self._memory_s = policy.holdback_memory_s
        self._refresh_shares(now, force=True)
        self._lend_wait_s = _lend_waits(policy)
        self.limiter.reconfigure(settings)
        if settings.pace_by_rate_headers and not self.pacing:
            self.pace = ProviderPace()  # nothing was counted while off: start afresh
        self.pacing = settings.pace_by_rate_headers

    def _present(self, now: float) -> list[bool]:
        return [now < until for until in self._present_until]

    def arrived(self, priority: Priority, now: float) -> None:
        """A request of ``priority`` was granted a slot or queued for one at the deployment
        (the controller's call): the class is present for ``holdback_memory_s``, and the
        classes below hold their reserve for it.

        Holdback keeps slots free for the classes above, so their bursts find one at once;
        kept for a class that sends nothing, that reserve is capacity nobody uses. Most
        users send one class (a tenant's ``default_priority``, ``normal``): its 0.85 share
        held 15 % of the provider for critical calls that never came, or (with the adaptive
        limit, which grew until normal's share found the knee) put the reserve past the knee
        for the critical calls that did."""
        was = self._present_until[priority]
        self._present_until[priority] = now + self._memory_s
        if was <= now:
            self._refresh_shares(now, force=True)

    def _refresh_shares(self, now: float, force: bool = False) -> None:
        """The shares in force after a class arrived or its presence lapsed (settled first:
        what a class owes was run up at the shares before)."""
        if not force and now < self._shares_until:
            return
        present = self._present(now)
        shares = _effective(self.policy_shares, present)
        if shares != self.shares:
            self.settle(now)
            self.shares = shares
        self._held_share = _held_share(shares, present)
        self._shares_until = min((until for until in self._present_until if until > now),
                                 default=math.inf)

    def hold_for_quota(self, priority: Priority, until: float) -> None:
        """The quota holds ``priority`` back until ``until``; the classes below keep larger
        reserves of it, so they are held at least as long."""
        held = self.quota_held_until
        for p in range(priority, len(held)):
            held[p] = max(held[p], until)

    def quota_allows(self, priority: Priority, now: float) -> bool:
        """Whether the provider's quota, as paced, lets the class send now. The quota's
        reserves stay whoever is present: with replicas that share a quota, the reserve is also
        the room each leaves for what the others spend between two reports (a class alone
        spending all of it at two replicas drew 11-12 of the quota's 429s in 4 s, none with
        it), and it costs no throughput (docs/architecture.md, "Reserves")."""
        return not self.pacing or self.pace.allows(self.policy_shares[priority], now)

    def take(self, priority: Priority, now: float) -> int:
        """A slot taken; the request's sequence number in the paced quota (-1: not paced).
        (Every grant asked ``cap`` first, at the same ``now``: the shares, and the top that
        ``at_top`` reads, are fresh.)"""
        self.settle(now)
        self.in_flight += 1
        self.in_flight_by_class[priority] += 1
        return self.pace.take(now) if self.pacing else -1

    def at_top(self) -> bool:
        """Whether the calls in flight now (the one just taken counted) reach the top of the
        limit: above the holdback share of every class present and held below the limit,
        where only the classes above them go (critical's reserve: 65-68 of a limit of 68 at
        the default 0.95 for high), or into its last ``_TOP_SLOTS`` slots where the shares
        reserve fewer (or none is held: one class alone fills the limit). Past the knee by
        a few calls, those are the calls that wait inside the provider. The last two slots
        alone were too narrow: critical bursts at 64 slots filled 65-66 of 68 and waited
        there, and hardly a call was sent into the last two."""
        limit = self.limiter.limit
        below = limit - _TOP_SLOTS
        if self._held_share is not None:
            below = min(below, math.floor(self._held_share * limit + 1e-9))
        return self.in_flight > below

    def await_first_token(self, granted_at: float, prompt_tokens: int) -> int:
        """A streamed call sent: its first token is awaited. The key to forget it by."""
        key = self._next_key
        self._next_key += 1
        self.awaiting[key] = (granted_at, prompt_tokens)
        return key

    def overdue(self, now: float, baseline_s: float, prefill_s: float) -> int:
        """Streamed calls waiting for their first token past ``OVERDUE_FACTOR`` times the
        no-load expectation for their prompt: queued inside the provider (``CallsInFlight``
        for the limiter; read once per decision window, so a scan of the calls is cheap)."""
        return sum(1 for granted, prompt in self.awaiting.values()
                   if now - granted > OVERDUE_FACTOR * (baseline_s + prefill_s * prompt / 1000))

    def demand(self, now: float) -> int:
        """Demand for slots, as the limit judges whether it is used: requests in flight plus
        those waiting for a slot (not those waiting for the provider's quota, or a quota-bound
        deployment would grow its limit to max_limit while slots sit idle). A request waiting
        for a slot now, or a class refused one within the last decision window (queued or
        shed), counts as the whole limit: with holdback the lower classes are refused below
        the limit, and requests shed at once never show as queued."""
        waiting = self.queued_for_slots(now)
        demand = self.in_flight + waiting
        if waiting or now - self.slots_full_at <= self.limiter.settings.decision_window_s:
            demand = max(demand, self.limiter.limit)
        return demand

    def give_back(self, priority: Priority, now: float) -> None:
        self.settle(now)
        self.in_flight -= 1
        self.in_flight_by_class[priority] -= 1

    def fastest_ttft(self, prompt_tokens: int | None) -> float:
        """An optimistic time to first byte for a prompt of this size: a low percentile of the
        deployment's recent first bytes with their prompts' prefill taken off, plus this
        prompt's prefill at the learned rate; ``ttft_prior_s`` before any is measured.

        The prefill is what the limit learned from first tokens, not assumed: a fixed
        ``(prompt + 1000) / 1000`` scaling put a 19k-token prompt at 10x the first byte of a
        1k one, and refused it with 3 s left from a provider whose first byte does not grow
        with the prompt at all.

        The learned rate is shared by every tenant of the deployment, and a few slow, huge
        prompts can push it to its cap (1 s per thousand tokens), which would put another
        tenant's 100k-token request at 100 s. So the fixed scaling's estimate is kept as a
        second opinion, and the lower of the two counts: a request is refused only when both
        say it cannot fit, and moving the fixed one takes most of the recent traffic."""
        if not self._recent:
            return self._prior
        rank = int(_OPTIMISTIC_RANK * (len(self._recent) - 1))
        return min(self._net[rank] + self._net_prefill * thousands(prompt_tokens),
                   self._scaled[rank] * size_factor(prompt_tokens))

    def feasible(self, deadline: float, now: float, prompt_tokens: int | None = None) -> bool:
        """Whether a request with this deadline can still get its first byte in time, even
        optimistically: refusing work that would have succeeded is worse than trying."""
        return deadline - now >= self.fastest_ttft(prompt_tokens)

    def observe_ttft(self, ttft_s: float, prompt_tokens: int | None = None) -> None:
        """A measured time to first byte (from sending) feeds the estimates."""
        if ttft_s >= 0:
            self.ttft += _TTFT_WEIGHT * (ttft_s - self.ttft)
            prefill = self.limiter.prefill_s

            def net(ttft: float, prompt: int | None) -> float:
                return max(0.0, ttft - prefill * thousands(prompt))

            same = prefill == self._net_prefill
            if len(self._recent) == _RECENT_TTFT:
                old, old_prompt = self._recent.popleft()
                _discard(self._scaled, old / size_factor(old_prompt))
                if same:
                    _discard(self._net, net(old, old_prompt))
            self._recent.append((ttft_s, prompt_tokens))
            bisect.insort(self._scaled, ttft_s / size_factor(prompt_tokens))
            if same:
                bisect.insort(self._net, net(ttft_s, prompt_tokens))
            else:  # the learned rate moved (at most once a decision window): sort afresh
                self._net = sorted(net(t, p) for t, p in self._recent)
                self._net_prefill = prefill

    def queued_for_slots(self, now: float) -> int:
        """Waiting requests of the classes the provider's quota (as paced) lets go now: the
        others wait for the quota, not for a slot."""
        return sum(len(q) for priority, q in zip(Priority, self.queues, strict=True)
                   if q and self.quota_allows(priority, now))

    def queued(self, up_to: Priority = Priority.low) -> int:
        """Waiting requests of classes ``critical`` .. ``up_to``."""
        return sum(len(q) for q in self.queues[: up_to + 1])

    def cap(self, priority: Priority, now: float) -> int:
        """Slots the class may fill now: its holdback share of the limit, at least one so every
        class progresses at tiny limits.

        A share that falls between whole slots is honoured over time, not rounded down, while
        calls are short: high's 0.95 of a limit of 4 is 3.8 slots, so high may fill the fourth
        slot 80 % of the time. Rounding down held a whole slot, a quarter of a 4-slot upstream,
        for critical requests that might come (bench/overload.py --slots 4: 83-87 % of capacity
        used at 2x and 3x). The class takes that slot only when it owes nothing: the deployment
        ran above the share no longer, in proportion, than the share allows (``settle``).

        A lent slot is held to the end of its call, so a request of a class above that then
        finds every slot busy waits for the next call to end. The slot is lent only while that
        wait (one over the rate calls end) is within the queue target of every class above:
        with calls of a minute at a small limit, the whole slot stays held for them.
        """
        self._refresh_shares(now)
        if self.shares[priority] >= 1.0:
            return self.limiter.limit
        whole, fraction = self._slots(priority)
        if fraction > 0.0 and self._lendable(priority, now):
            self.settle(now)
            if self._owed[priority] <= _PAID:
                whole += 1
        return max(1, whole)

    def _lendable(self, priority: Priority, now: float) -> bool:
        """Calls end often enough that a class above, finding every slot busy, waits for the
        next one no longer than its queue target."""
        ending = self.drain.rate(now)
        return ending > 0.0 and 1.0 / ending <= self._lend_wait_s[priority]

    def _slots(self, priority: Priority) -> tuple[int, float]:
        """The class's share of the limit as whole slots and the fraction of one more."""
        slots = self.shares[priority] * self.limiter.limit
        whole = math.floor(slots + 1e-9)
        fraction = slots - whole
        return whole, (fraction if fraction > 1e-9 else 0.0)

    def owed_s(self, priority: Priority, now: float) -> float | None:
        """Seconds until the class may take its share's last, partial slot again, when owing
        time is all that holds it now (None otherwise): a waiting request of the class should
        not wait for a release that may come much later."""
        whole, fraction = self._slots(priority)
        if (whole < 1 or fraction == 0.0 or self.in_flight != whole
                or not self._lendable(priority, now)):
            return None
        self.settle(now)
        owed = self._owed[priority]
        return owed / fraction if owed > _PAID else None

    def settle(self, now: float) -> None:
        """Bring each class's debt up to ``now`` (call before the count in flight, the limit
        or the shares change): time with more calls in flight than the class's whole slots (3
        of 3.8) adds ``1 - fraction`` per second, time within them pays back ``fraction``, so
        a class that takes the extra slot only when it owes nothing has it, in the long run,
        that fraction of the time, however long its calls (whoever fills the partial slot:
        a critical call there uses the reserve as much as a lent one). Idle time earns no
        credit. Time more than one slot above (a limit cut with every slot full) adds only up
        to ``_LEND_MEMORY_S`` of repayment: it is not the class's borrowing, and must not bar
        it for minutes."""
        elapsed = now - self._settled_at
        if elapsed <= 0.0:
            return
        self._settled_at = now
        for priority in Priority:
            whole, fraction = self._slots(priority)
            if fraction == 0.0:  # whole slots (critical's whole limit among them): nothing owed
                self._owed[priority] = 0.0
                continue
            owed = self._owed[priority]
            if self.in_flight <= whole:
                owed = max(0.0, owed - fraction * elapsed)
            elif self.in_flight == whole + 1:
                owed += (1.0 - fraction) * elapsed
            else:
                owed = max(owed, min(owed + (1.0 - fraction) * elapsed,
                                     fraction * _LEND_MEMORY_S))
            self._owed[priority] = owed

    def exploring(self, now: float, interval_s: float) -> list[bool]:
        """Per class, whether its queue waits for a slot under a limit still finding the
        upstream's capacity (``AdaptiveLimit.exploring``): CoDel does not count that wait as
        overload. Never for a class the provider's quota held back within the last CoDel
        interval (``interval_s``) or holds now: a class may wait for the quota and then for a
        slot in the same interval, and that wait is the provider's."""
        if not self.limit_exploring(now):
            return []
        return [now > held + interval_s for held in self.quota_held_until]

    def limit_exploring(self, now: float) -> bool:
        """``AdaptiveLimit.exploring`` with whether the demand fills the limit now."""
        return self.limiter.exploring(now, self.demand(now) >= self.limiter.limit)

    def oldest_waits(self, now: float) -> list[float | None]:
        waits: list[float | None] = []
        for q in self.queues:
            oldest = q.oldest_enqueued()
            waits.append(None if oldest is None else now - oldest)
        return waits
