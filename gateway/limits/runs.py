"""Agent runs (``X-Agent-Session``): per-run budget checks and the board of live runs.

A run's caps (``tenant.run_budget``, limits_policy.RunBudget) become checks of the same
``AdmitPlan`` as the tenant's limits (gateway/state/plan.py), so they are evaluated in the same
atomic admission (lua/admit.lua, or LocalLimits) and settled by the same settlement:

- tokens, cost, steps: ``Counter(idle=True)`` keys ``rl:{t:<tenant>}:r:<sid>:run-tok``
  (built in gateway/state/keys.py),
  ``...:run-cost`` (integer micro-units), ``...:run-steps``. Admission adds the request's
  reservation (prompt estimate + output cap, its price, 1 step), so requests in flight count
  against the cap; settlement replaces the reservation with the real usage (a step stays 1).
- age: ``Since`` key ``...:run-t0``, the first admission's time in ms.

Every admission renews the run's keys to ``idle_ttl_s``; a run idle longer is forgotten.
``<sid>`` is a hash of the session id: a client's string never becomes a key or a label.

``RunBoard`` keeps, per replica, the runs it has seen (their totals as the store last reported
them, or as this replica observed them when the run has no caps), for /admin/status and the
access log. Bounded: at most ``MAX_RUNS_PER_TENANT`` runs per tenant, idle ones dropped first.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import RunBudget
from gateway.state import AdmitPlan, AdmitResult, Check, Counter, Kind, Scope, Since, keys

MAX_RUNS_PER_TENANT = 200
# The cap a run check enforces, as its bounded metric label.
RUN_CAPS = {Kind.run_tokens: "tokens", Kind.run_cost: "cost", Kind.run_steps: "steps",
            Kind.run_age: "age"}
CAP_FIELDS = {"tokens": "max_tokens", "cost": "max_cost", "steps": "max_steps",
              "age": "max_age_s"}


def session_id(session: str) -> str:
    """The hashed id a run's keys and the board use (never the client's string)."""
    return hashlib.sha256(session.encode()).hexdigest()[:16]


def run_checks(tenant: str, session: str, model: str, budget: RunBudget, tokens: int,
               cost_units: int, add: Callable[[Check, str], None]) -> None:
    """The run's cap checks for a request reserving ``tokens`` and ``cost_units``."""
    caps = budget.caps_for(model)
    if caps.is_empty():
        return
    sid = session_id(session)
    ttl = int(budget.idle_ttl_s * 1000)
    scope = "this agent run"
    if caps.max_tokens is not None:
        add(Counter(keys.run(tenant, sid, Kind.run_tokens), caps.max_tokens, tokens, ttl, 0,
                    "run tokens cap", budget.shadow, idle=True, kind=Kind.run_tokens,
                    scope=Scope.run), scope)
    if caps.max_cost is not None:
        add(Counter(keys.run(tenant, sid, Kind.run_cost), math.floor(caps.max_cost * 1_000_000),
                    cost_units, ttl, 0, "run cost cap", budget.shadow, idle=True,
                    kind=Kind.run_cost, scope=Scope.run), scope)
    if caps.max_steps is not None:
        add(Counter(keys.run(tenant, sid, Kind.run_steps), caps.max_steps, 1, ttl, 0,
                    "run steps cap", budget.shadow, idle=True, kind=Kind.run_steps,
                    scope=Scope.run), scope)
    if caps.max_age_s is not None:
        add(Since(keys.run(tenant, sid, Kind.run_age), math.floor(caps.max_age_s * 1000), ttl,
                  "run age cap", budget.shadow, Kind.run_age, Scope.run), scope)


def is_run_check(check: Check) -> bool:
    return isinstance(check, Since) or (isinstance(check, Counter) and check.idle)


def run_cap(check: Check) -> str:
    """``tokens`` | ``cost`` | ``steps`` | ``age``: the cap a run check enforces (a bounded
    metric label)."""
    return RUN_CAPS.get(check.kind, "tokens")


def usage_after(plan: AdmitPlan, result: AdmitResult) -> dict[str, float]:
    """The run's totals the store reported with this admission (reservations included):
    ``tokens``, ``cost`` (currency), ``steps``, ``age_s``; only for the capped ones."""
    out: dict[str, float] = {}
    for check, res in zip(plan.checks, result.results):
        if isinstance(check, Counter) and check.idle:
            # Admitted: remaining is after this reservation; refused: before it.
            used = check.limit - res.remaining
            cap = run_cap(check)
            out[cap] = used / 1_000_000 if cap == "cost" else float(used)
        elif isinstance(check, Since):
            out["age_s"] = max(0, check.max_ms - res.remaining) / 1000 if res.allowed \
                else check.max_ms / 1000
    return out


def warning(plan: AdmitPlan, result: AdmitResult, soft_ratio: float) -> str | None:
    """``x-gateway-run-budget-warning``: each cap past ``soft_ratio``, e.g.
    ``tokens 85% used or reserved, age 90% used`` (tokens and cost count what requests in
    flight reserved, this one's whole output cap included, until they settle)."""
    parts = []
    for check, res in zip(plan.checks, result.results):
        if not res.allowed:
            continue
        if isinstance(check, Since):
            limit = check.max_ms
        elif isinstance(check, Counter) and check.idle:
            limit = check.limit
        else:
            continue
        used = 1 - res.remaining / limit if limit else 0.0
        if used >= soft_ratio:
            cap = run_cap(check)
            held = " or reserved" if cap in ("tokens", "cost") else ""
            parts.append(f"{cap} {math.floor(used * 100)}% used{held}")
    return ", ".join(parts) or None


@dataclass(slots=True)
class RunEntry:
    """One run as this replica last saw it."""

    tokens: int = 0
    cost: float = 0.0
    steps: int = 0
    first_seen: float = 0.0  # wall clock, seconds
    last_seen: float = 0.0
    loop_warnings: int = 0
    stopped_by: str | None = None  # the cap that refused it last

    def view(self, now: float) -> dict[str, Any]:
        return {"tokens": self.tokens, "cost": round(self.cost, 6), "steps": self.steps,
                "age_s": round(max(0.0, now - self.first_seen), 3),
                "idle_s": round(max(0.0, now - self.last_seen), 3),
                "loop_warnings": self.loop_warnings, "stopped_by": self.stopped_by}


class RunBoard:
    """The live runs this replica has seen, per tenant (bounded; forgotten after their idle
    TTL). Keyed by the hashed session id."""

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._clock = wall_clock
        self._runs: dict[str, dict[str, RunEntry]] = {}

    def entry(self, tenant: str, sid: str) -> RunEntry:
        now = self._clock()
        runs = self._runs.setdefault(tenant, {})
        run = runs.get(sid)
        if run is None:
            if len(runs) >= MAX_RUNS_PER_TENANT:
                del runs[min(runs, key=lambda k: runs[k].last_seen)]
            run = runs[sid] = RunEntry(first_seen=now, last_seen=now)
        run.last_seen = now
        return run

    def admitted(self, tenant: str, sid: str, store: dict[str, float]) -> RunEntry:
        """A request of the run was admitted; ``store``: its fleet-wide totals, if capped."""
        run = self.entry(tenant, sid)
        run.steps = max(run.steps + 1, int(store.get("steps", 0)))
        run.tokens = max(run.tokens, int(store.get("tokens", 0)))
        run.cost = max(run.cost, store.get("cost", 0.0))
        if "age_s" in store:
            run.first_seen = min(run.first_seen, self._clock() - store["age_s"])
        return run

    def settled(self, tenant: str, sid: str, reserved_tokens: int, tokens: int,
                reserved_cost: float, cost: float, capped: bool, no_step: bool = False) -> None:
        """Real usage replaces the reservation (capped runs: the store's totals included it),
        or adds to this replica's own view (uncapped runs)."""
        run = self._runs.get(tenant, {}).get(sid)
        if run is None:
            return
        if no_step:
            run.steps = max(0, run.steps - 1)
        if capped:
            run.tokens = max(0, run.tokens + tokens - reserved_tokens)
            run.cost = max(0.0, run.cost + cost - reserved_cost)
        else:
            run.tokens += tokens
            run.cost += cost

    def snapshot(self, idle_ttl_s: Callable[[str], float], top: int = 10) -> dict[
        str, list[dict[str, Any]]
    ]:
        """The biggest live runs per tenant (by cost, then tokens), idle ones dropped."""
        now = self._clock()
        out: dict[str, list[dict[str, Any]]] = {}
        for tenant, runs in list(self._runs.items()):
            ttl = idle_ttl_s(tenant)
            for sid in [s for s, r in runs.items() if now - r.last_seen > ttl]:
                del runs[sid]
            if not runs:
                del self._runs[tenant]
                continue
            biggest = sorted(runs.items(), key=lambda kv: (kv[1].cost, kv[1].tokens),
                             reverse=True)[:top]
            out[tenant] = [{"run": sid, **run.view(now)} for sid, run in biggest]
        return out
