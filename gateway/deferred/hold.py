"""The reservation a deferred entry holds, and how it is refunded and charged.

The hold is made once at submit and stored with the entry (as JSON), so whichever replica
finishes, cancels or expires the entry can settle it. It is kept apart from the service and
its runs because every path that ends an entry (a run, a cancel, the sweeper) settles through
these functions, by the rules below.

Accounting (the tenant is charged once per upstream call actually made):
- the reservation made at submit is refunded exactly once, when the entry reaches a final
  state (succeeded, failed, cancelled, expired): settle of the submit hold with zero usage;
- each run that reached the upstream is charged its real usage under its own request id
  (``<id>.r<run>``; settlement is idempotent per id);
- a run lost with its replica (its usage unknown) is charged its reservation, an upper bound
  of what it can have cost (max_tokens is always set), by whoever accounts it first.
So the charge is at most one reservation per lost run above the real usage of the runs that
finished; a run cut off before it sent anything (a replica killed in the few milliseconds
between starting a run and sending it, or stopped while it ran) is charged like a lost one.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import orjson

from gateway.jsonbytes import dumps_kept
from gateway.limits import DONE_TTL_MS, Counting, Hold, Limiter
from gateway.state import Kind, SettlePlan, exact_interval, keys
from gateway.usage import Usage


def hold_to_json(hold: Hold) -> bytes:
    plan = hold.settle_plan
    return dumps_kept({
        "request_id": hold.request_id, "mode": hold.mode, "tokens": hold.reserved_tokens,
        "cost": hold.reserved_cost, "rate_tokens": hold.rate_tokens,
        "counting": [hold.counting.rate_cache_reads, hold.counting.budget_cache_reads],
        "plan": None if plan is None else {
            "done_key": plan.done_key, "hold_key": plan.hold_key,
            # Intervals as floats, which replicas of every version read, and exactly
            # ("60000/7") beside them, which replicas before exact GCRA ignore.
            "gcra": [(k, float(i), r, a) for k, i, r, a in plan.gcra],
            "gcra_intervals": [str(i) for _, i, _, _ in plan.gcra],
            "counters": plan.counters,
            "counter_kinds": [kind.value for kind in hold.counter_kinds],
        },
    })


def hold_from_json(raw: bytes) -> Hold:
    data = orjson.loads(raw)
    plan = data["plan"]
    settle = None if plan is None else SettlePlan(
        data["request_id"], plan["done_key"], plan["hold_key"], DONE_TTL_MS, _gcra(plan),
        tuple((k, int(r), int(a), int(t)) for k, r, a, t in plan["counters"]), ())
    counting = Counting(*(bool(c) for c in data.get("counting", (True, True))))
    rate_tokens = data.get("rate_tokens")  # (absent from entries of older replicas)
    return Hold(data["request_id"], data["mode"], int(data["tokens"]), int(data["cost"]), settle,
                counting=counting, counter_kinds=_counter_kinds(plan),
                rate_tokens=None if rate_tokens is None else int(rate_tokens))


def _counter_kinds(plan: dict[str, Any] | None) -> tuple[Kind, ...]:
    # Entries written before holds recorded what each counter counts: read from the keys.
    if plan is None:
        return ()
    if "counter_kinds" in plan:
        return tuple(Kind(k) for k in plan["counter_kinds"])
    return tuple(keys.counter_kind(str(c[0])) for c in plan["counters"])


def _gcra(plan: dict[str, Any]) -> tuple[tuple[str, Fraction, int, int], ...]:
    # Entries written before GCRA was exact have no "gcra_intervals": their floats are read
    # back as the fractions they were computed from.
    exact = plan.get("gcra_intervals") or [i for _, i, _, _ in plan["gcra"]]
    return tuple((k, exact_interval(e), int(r), int(a))
                 for (k, _, r, a), e in zip(plan["gcra"], exact, strict=True))


def run_hold(hold: Hold, run: int) -> Hold:
    """The hold's plan under run ``run``'s own request id and without a hold marker, so a
    settlement charges the whole amount once (the submit hold stays for the refund)."""
    plan = hold.settle_plan
    rid = f"{hold.request_id}.r{run}"
    charge = None if plan is None else SettlePlan(
        rid, keys.for_request(plan.done_key, hold.request_id, rid),
        keys.for_request(plan.hold_key, hold.request_id, rid), DONE_TTL_MS, plan.gcra,
        plan.counters, ())
    return Hold(rid, hold.mode, hold.reserved_tokens, hold.reserved_cost, charge,
                counting=hold.counting, counter_kinds=hold.counter_kinds, reserved=False,
                rate_tokens=hold.rate_tokens)


async def refund(limiter: Limiter, hold: Hold) -> None:
    """Give the submit reservation back (idempotent: settled once per request id), its
    agent-run step included: each run is charged as a step of its own."""
    hold.no_step = True
    await limiter.settle(hold, Usage(), 0)


async def charge(limiter: Limiter, hold: Hold, run: int, usage: Usage, cost_units: int) -> None:
    """Charge one run ``usage`` and ``cost_units`` (idempotent per run)."""
    await limiter.settle(run_hold(hold, run), usage, cost_units)


def reserved_usage(hold: Hold) -> Usage:
    """The usage a lost run is charged: its whole reservation (nothing of it a cache read)."""
    return Usage(input_tokens=hold.reserved_tokens)
