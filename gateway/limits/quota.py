"""Step 8: each deployment's provider quota (RPM/TPM), enforced for the whole fleet.

Hitting the fleet-wide key on every request would make one Redis key the hottest in the
system, so each replica *leases chunks*: it takes a chunk of requests and tokens from the
deployment's fleet-wide GCRA buckets in one atomic call and spends it locally. A chunk not
spent within ``CHUNK_LIFETIME_S`` is dropped.

Over-admission bound: GCRA charges a chunk when it is taken, so the fleet never takes more
than the rate; but a chunk taken near the end of one window can be spent in the next, so in
any window the fleet admits at most ``rate x window + burst + replicas x chunk``. Chunks are
1% of the per-minute quota (at least 1 request, and at least the request's own tokens), so
with 10 replicas the bound is about 10% of a minute's quota over any one minute, and usually
far less. Unspent chunks make the fleet slightly *under*-use its quota, never over-use it
beyond that bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from gateway.config import Deployment
from gateway.state import AdmitPlan, Gcra, Kind, Scope, StateBackend, StateUnavailable, keys

CHUNK_LIFETIME_S = 1.0
CHUNK_SHARE = 0.01


@dataclass(slots=True)
class _Allowance:
    requests: int = 0
    tokens: int = 0
    expires: float = 0.0


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    allowed: bool
    retry_after_s: float = 0.0


class ProviderQuotas:
    """Per-deployment RPM/TPM for the fleet, via chunk leases on the state backend."""

    def __init__(self, state: StateBackend, clock: Callable[[], float], replica_id: str) -> None:
        self._state = state
        self._clock = clock
        self._replica = replica_id
        self._local: dict[str, _Allowance] = {}
        self._lease_no = 0

    async def take(self, deployment: Deployment, tokens: int) -> QuotaVerdict:
        """Spend one request and ``tokens`` of the deployment's quota, leasing when needed.

        With the store unreachable the quota is not enforced (the provider's own 429s and
        the breaker's cooldown still protect it); tenant limits carry the degraded policy.
        """
        rpm, tpm = deployment.requests_per_minute, deployment.tokens_per_minute
        if not rpm and not tpm:
            return QuotaVerdict(True)
        label = deployment.label
        now = self._clock()
        local = self._local.setdefault(label, _Allowance())
        if local.expires <= now:
            local.requests = local.tokens = 0
        need_req = 1 if rpm else 0
        need_tok = tokens if tpm else 0
        if local.requests >= need_req and local.tokens >= need_tok:
            local.requests -= need_req
            local.tokens -= need_tok
            return QuotaVerdict(True)
        chunk_req = max(need_req, math.ceil((rpm or 0) * CHUNK_SHARE)) if rpm else 0
        chunk_tok = max(need_tok, math.ceil((tpm or 0) * CHUNK_SHARE)) if tpm else 0
        checks = []
        if rpm:
            checks.append(Gcra(keys.quota(label, Kind.requests), Fraction(60_000, rpm),
                               max(chunk_req, rpm // 10), chunk_req, "requests",
                               kind=Kind.requests, scope=Scope.deployment))
        if tpm:
            checks.append(Gcra(keys.quota(label, Kind.tokens), Fraction(60_000, tpm),
                               max(chunk_tok, tpm // 10), chunk_tok, "tokens",
                               kind=Kind.tokens, scope=Scope.deployment))
        self._lease_no += 1
        lease_id = f"{self._replica}:{self._lease_no}"
        plan = AdmitPlan(lease_id, tuple(checks), keys.quota_lease(label, lease_id), 1000)
        try:
            result = await self._state.admit(plan)
        except StateUnavailable:
            return QuotaVerdict(True)
        if not result.allowed:
            return QuotaVerdict(False, result.results[result.failed].retry_after_ms / 1000)
        local.requests = chunk_req - need_req
        local.tokens = chunk_tok - need_tok
        local.expires = now + CHUNK_LIFETIME_S
        return QuotaVerdict(True)
