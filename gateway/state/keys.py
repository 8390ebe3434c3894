"""Every key the gateway keeps in the shared store, built here under one hash-tag rule.

Redis Cluster puts a key in the slot of its *hash tag*, the text between the first ``{`` and
the first ``}`` after it; the atomic scripts (lua/) touch several keys at once, which must all
be in one slot. So every key a script touches has exactly one hash tag, made by ``hash_tag``
from the one name whose keys go together:

- ``rl:{t:<tenant>}:...``: a tenant's limits, budgets, loop guard, agent runs, hold and done
  markers (one admission plan, one slot);
- ``q:{q:<provider>/<model>}:...``: a deployment's provider quota;
- ``cb:{<provider>/<model>}:...``: a deployment's circuit breaker;
- ``dq:{t:<tenant>}:...``: a tenant's deferred-request stream, entries and the bytes its
  unfinished entries hold;
- ``rl:{fleet}:...``: the fleet's replicas and epoch;
- ``rs:<digest>``, without a tag: a stored Responses answer's size (read and written alone,
  so the keys spread over every node instead of filling the tenant's slot).

The rule: inside a tag, ``%``, ``{`` and ``}`` of a name are written ``%25``, ``%7B``, ``%7D``.
A name (tenant, deployment) then cannot end the tag early, so no client- or operator-chosen
name moves a key to another slot, and the escape is one-to-one, so two names never share a key.
Names without those three characters keep the keys they always had.

The state backend prefixes every key with ``state.key_prefix`` (``gw:``, no braces allowed).
"""

from __future__ import annotations

from .plan import Kind

_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def escape(name: str) -> str:
    """``name`` safe inside a hash tag (see the module's rule)."""
    return name.translate(_ESCAPES)


def hash_tag(name: str) -> str:
    """``{name}``, escaped: the one hash tag of a key."""
    return "{" + escape(name) + "}"


def tenant_tag(tenant: str) -> str:
    return hash_tag("t:" + tenant)


# --- tenant limits (gateway/limits/limiter.py, gateway/limits/runs.py) -------------------------------------

RATE_SUFFIXES = {Kind.requests: "req", Kind.tokens: "tok", Kind.concurrency: "conc"}
RUN_SUFFIXES = {Kind.run_tokens: "run-tok", Kind.run_cost: "run-cost",
                Kind.run_steps: "run-steps", Kind.run_age: "run-t0"}


def limits(tenant: str) -> str:
    """The prefix of the tenant-wide rate keys (``+ RATE_SUFFIXES[kind]``)."""
    return f"rl:{tenant_tag(tenant)}:"


def model_limits(tenant: str, model: str) -> str:
    """The prefix of the tenant's rate keys on one model (``limits.per_model``)."""
    return f"{limits(tenant)}m:{model}:"


def session_limits(tenant: str, sid: str) -> str:
    """The prefix of an agent session's rate keys; ``sid``: the hashed session id."""
    return f"{limits(tenant)}s:{sid}:"


def budget(tenant: str, kind: Kind, period_part: str) -> str:
    """A period's budget counter; ``period_part``: ``d:YYYYMMDD`` | ``m:YYYYMM``."""
    unit = "cost" if kind is Kind.budget_cost else "tokens"
    return f"{limits(tenant)}b:{unit}:{period_part}"


def loop(tenant: str, fingerprint: str, sid: str | None = None) -> str:
    """The loop guard's repeat counter, tenant-wide or per session."""
    scope = limits(tenant) if sid is None else session_limits(tenant, sid)
    return f"{scope}loop:{fingerprint}"


def run(tenant: str, sid: str, kind: Kind) -> str:
    """One cap of an agent run (``sid``: the hashed session id)."""
    return f"{limits(tenant)}r:{sid}:{RUN_SUFFIXES[kind]}"


def hold(tenant: str, request_id: str) -> str:
    """The marker an admission leaves for its settlement."""
    return f"{limits(tenant)}hold:{request_id}"


def done(tenant: str, request_id: str) -> str:
    """The marker that makes a settlement idempotent."""
    return f"{limits(tenant)}done:{request_id}"


def for_request(key: str, request_id: str, other_id: str) -> str:
    """A hold or done marker ``key`` of ``request_id``, for ``other_id`` of the same tenant
    (a deferred entry's runs, gateway/deferred/hold.py): the id is the key's last part."""
    return key.removesuffix(request_id) + other_id


def counter_kind(key: str) -> Kind:
    """What a counter key counts, read back from the key itself: only for reservations stored
    by replicas that did not record the kinds (deferred holds, gateway/deferred/hold.py)."""
    last = key.rsplit(":", 1)[-1]
    for kind, suffix in RUN_SUFFIXES.items():
        if last == suffix:
            return kind
    return Kind.budget_cost if ":b:cost:" in key else Kind.budget_tokens


def response_size(key: str) -> str:
    """A stored Responses answer's size (gateway/limits/responses.py); ``key`` names the
    tenant and the answer, unrelated to the tenant's slot."""
    return f"rs:{key}"


# --- provider quotas (gateway/limits/quota.py) -----------------------------------------------------

def quota(label: str, kind: Kind) -> str:
    """A deployment's provider quota bucket (requests or tokens per minute)."""
    return f"q:{hash_tag('q:' + label)}:{RATE_SUFFIXES[kind]}"


def quota_lease(label: str, lease_id: str) -> str:
    """The hold marker of one quota chunk."""
    return f"q:{hash_tag('q:' + label)}:lease:{lease_id}"


# --- circuit breakers (gateway/breaker/fleet.py) --------------------------------------------

def breaker(deployment: str, suffix: str) -> str:
    """One of a deployment's breaker keys (``open``, ``cool``, ``ok``, ``probe:<n>``)."""
    return f"cb:{hash_tag(deployment)}:{suffix}"


# --- deferred requests (gateway/deferred/store_redis.py) ------------------------------------

def deferred_stream(prefix: str, tenant: str) -> str:
    """A tenant's deferred-request stream, with the backend's ``prefix`` (its scripts are
    called with full keys)."""
    return f"{prefix}dq:{tenant_tag(tenant)}:s"


def deferred_entry(prefix: str, tenant: str, entry_id: str) -> str:
    return f"{prefix}dq:{tenant_tag(tenant)}:e:{entry_id}"


def deferred_bytes(prefix: str, tenant: str) -> str:
    """The request bytes of a tenant's unfinished deferred entries (one counter)."""
    return f"{prefix}dq:{tenant_tag(tenant)}:b"


# --- the fleet (gateway/limits/degraded.py) --------------------------------------------------------

FLEET_TAG = hash_tag("fleet")
FLEET_REPLICAS = f"rl:{FLEET_TAG}:replicas"  # heartbeat leases of the live replicas
FLEET_EPOCH = f"rl:{FLEET_TAG}:epoch"  # detects a store that came back empty


def fleet_heartbeat(replica_id: str) -> str:
    return f"rl:{FLEET_TAG}:hb:{replica_id}"


def fleet_left(replica_id: str) -> str:
    """Marks a replica's clean leave settled (the settle script's done marker)."""
    return f"rl:{FLEET_TAG}:left:{replica_id}"
