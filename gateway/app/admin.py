"""``GET /admin/status``: what an operator needs in one look, behind a separate admin key.

Tenant keys never open admin endpoints and admin keys never pass the proxy routes: the two
sets are disjoint by construction (validated in config). The status is built from in-process
snapshots only — no Redis call — so it answers even while the shared store is down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError
from gateway.request import AuthenticationFailed

if TYPE_CHECKING:
    from gateway.config import RateLimits

    from .runtime import Gateway


def check_admin(headers: Mapping[str, str], admin_digests: list[bytes]) -> None:
    """401 unless the request carries one of the admin keys; 404-like 403 when none exist."""
    if not admin_digests:
        raise GatewayError(403, "The admin API is disabled: no admin keys are configured.",
                           type="permission_error", code="admin_disabled")
    auth = headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    # compare_digest against every configured key: the time taken does not depend on which
    # key (if any) matched, nor on how many leading bytes did.
    matched = False
    for stored in admin_digests:
        matched |= hmac.compare_digest(stored, digest)
    if not key or not matched:
        raise AuthenticationFailed("An admin key is required.", code="invalid_admin_key")


def status(gateway: Gateway) -> dict[str, Any]:
    policy = gateway.policy
    config = policy.config
    svc = gateway.services
    tenants: dict[str, Any] = {}
    budgets = gateway.inflight.budgets
    runs = gateway.inflight.runs.snapshot(
        lambda t: config.tenants[t].run_budget.idle_ttl_s if t in config.tenants else 0.0)
    for name, tenant in config.tenants.items():
        limits = tenant.limits
        tenants[name] = {
            "max_priority": tenant.max_priority,
            "limits": {
                "requests_per_minute": limits.requests_per_minute,
                "tokens_per_minute": limits.tokens_per_minute,
                "max_concurrent": limits.max_concurrent,
                "shadow": limits.shadow,
                **({"per_session": _rates(limits.per_session)} if limits.per_session else {}),
            },
            "budget": {k: v for k, v in tenant.budget.model_dump().items() if v is not None},
            "budget_remaining": budgets.get(name, {}),
            "run_budget": {k: v for k, v in tenant.run_budget.model_dump(
                exclude={"per_model"}).items() if v is not None},
            "runs": runs.get(name, []),
            # this replica since it started: tokens by billed dimension, cost in micro-units
            "usage": _usage(gateway.metrics.usage_by_tenant.get(name, {})),
        }
    degraded = gateway.degraded
    return {
        "replica": gateway.replica_id,
        "ready": gateway.ready,
        "state": {
            "backend": gateway.state.name,
            "limits_mode": "degraded" if degraded.active else "global",
            "degraded_action": degraded.policy.action,
            "degraded_reason": degraded.reason or None,
            "usage_journal": degraded.journal_size,
            "journal_lost": degraded.journal_lost,
            "replicas": degraded.replicas,
        },
        "tenants": tenants,
        "admission": svc.admission.snapshot(),
        "self_protection": svc.self_protection.snapshot(),
        "breakers": {k: dataclasses.asdict(v) for k, v in svc.breakers.snapshot().items()},
        "retry_budget": svc.retry_budget.snapshot(),
    }


def _rates(limits: RateLimits) -> dict[str, Any]:
    return {"requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "max_concurrent": limits.max_concurrent}


def _usage(totals: Mapping[str, int]) -> dict[str, Any]:
    micros = totals.get("cost_micros", 0)
    return {"tokens": {k: v for k, v in totals.items() if k != "cost_micros"},
            "cost": micros / 1e6, "cost_micros": micros}


def render_table(data: Mapping[str, Any]) -> str:
    """A terminal view of ``status()`` for ``gateway status``."""
    lines = [f"replica {data.get('replica')}  ready={data.get('ready')}"]
    workers = data.get("workers")
    if workers:  # --workers N: the figures below are the whole process group's
        answered = sum(1 for w in workers if w.get("answered"))
        lines[0] += f"  workers {answered}/{len(workers)} answering"
    state = data.get("state", {})
    # --workers N: one process group, N workers (the replica count is the fleet's, which
    # only a shared store knows)
    processes = f"workers {len(workers)}" if workers else f"replicas {state.get('replicas')}"
    if workers and state.get("backend") != "memory":
        processes += f"  replicas {state.get('replicas')}"
    lines.append(f"state: {state.get('backend')}  limits {state.get('limits_mode')}  "
                 f"journal {state.get('usage_journal')}  {processes}")
    lines.append("")
    lines.append(f"{'tenant':<16} {'rpm':>8} {'tpm':>10} {'conc':>6} {'cost':>12}  "
                 "budget left of limit (used)")
    for name, t in data.get("tenants", {}).items():
        lim = t.get("limits", {})
        remaining = ", ".join(_budget(k, v) for k, v in t.get("budget_remaining", {}).items())
        lines.append(f"{name:<16} {_n(lim.get('requests_per_minute')):>8} "
                     f"{_n(lim.get('tokens_per_minute')):>10} {_n(lim.get('max_concurrent')):>6}"
                     f" {t.get('usage', {}).get('cost', 0):>12.6f}  {remaining or '-'}")
        session = lim.get("per_session")
        if session:
            lines.append(f"{'  per session':<16} {_n(session.get('requests_per_minute')):>8} "
                         f"{_n(session.get('tokens_per_minute')):>10} "
                         f"{_n(session.get('max_concurrent')):>6}")
    runs = [(name, r) for name, t in data.get("tenants", {}).items() for r in t.get("runs", [])]
    if runs:
        lines.append("")
        lines.append(f"{'tenant':<16} {'run':<17} {'tokens':>9} {'cost':>10} {'steps':>6} "
                     f"{'age':>9} {'loops':>6}  stopped by")
        for name, r in runs:
            lines.append(f"{name:<16} {r.get('run', ''):<17} {r.get('tokens', 0):>9} "
                         f"{r.get('cost', 0.0):>10.4f} {r.get('steps', 0):>6} "
                         f"{r.get('age_s', 0.0):>8.0f}s {r.get('loop_warnings', 0):>6}  "
                         f"{r.get('stopped_by') or '-'}")
    lines.append("")
    lines.append(f"{'class':<10} {'in flight':>10} {'queued':>8} {'oldest wait':>12}  drop")
    for name, c in data.get("admission", {}).get("classes", {}).items():
        lines.append(f"{name:<10} {c.get('in_flight', 0):>10} {c.get('queued', 0):>8} "
                     f"{c.get('oldest_wait_s', 0.0):>11.3f}s  {c.get('drop_mode')}")
    lines.append("")
    lines.append(f"{'deployment':<36} {'limit':>6} {'in flight':>10} {'breaker':>10}")
    deployments = data.get("admission", {}).get("deployments", {})
    breakers = data.get("breakers", {})
    for label in sorted(set(deployments) | set(breakers)):
        d = deployments.get(label, {})
        b = breakers.get(label, {})
        lines.append(f"{label:<36} {_n(d.get('limit')):>6} {d.get('in_flight', 0):>10} "
                     f"{b.get('state', '-'):>10}")
    return "\n".join(lines)


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _budget(kind: str, figure: Mapping[str, Any]) -> str:
    """``daily_tokens 499,996,998/500,000,000 (0.0% used)``: whole tokens with separators,
    a cost to the micro-unit."""
    left, limit = float(figure.get("remaining", 0)), float(figure.get("limit", 0))
    used = f" ({1 - left / limit:.1%} used)" if limit else ""
    if kind.endswith("_cost"):
        return f"{kind} {_money(left)}/{_money(limit)}{used}"
    return f"{kind} {round(left):,}/{round(limit):,}{used}"


def _money(value: float) -> str:
    return f"{value:,.6f}".rstrip("0").rstrip(".")
