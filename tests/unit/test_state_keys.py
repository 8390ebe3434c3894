"""The one hash-tag rule of gateway/state/keys.py: a name cannot move a key to another Cluster
slot or share a key with another name, and plain names keep the keys they always had."""

from __future__ import annotations

import itertools

import pytest
from redis.crc import key_slot

from gateway.state import keys
from gateway.state.plan import Kind

# Names an operator (tenants, models, deployments) or a client (request ids) could choose to
# break out of a hash tag, or to land on another tenant's keys.
TRICKY = ["acme", "a", "a}", "{a", "a{b}c", "a}:m:b", "a:b", "a%7D", "a%", "}", "{", "",
          "t:a", "a}x{t:b}"]


def tag_of(key: str) -> str:
    """Redis Cluster's rule: the text between the first '{' and the first '}' after it."""
    start = key.find("{")
    end = key.find("}", start + 1)
    assert start >= 0 and end > start + 1, f"{key!r} has no hash tag"
    return key[start + 1:end]


def tenant_keys(tenant: str, model: str, sid: str) -> list[str]:
    """Every key one tenant's admission plan can touch (one atomic script: one slot)."""
    rate = [p + s for p in (keys.limits(tenant), keys.model_limits(tenant, model),
                            keys.session_limits(tenant, sid))
            for s in keys.RATE_SUFFIXES.values()]
    return [*rate,
            keys.budget(tenant, Kind.budget_tokens, "d:20261206"),
            keys.budget(tenant, Kind.budget_cost, "m:202612"),
            keys.loop(tenant, "f1"), keys.loop(tenant, "f1", sid),
            *(keys.run(tenant, sid, k) for k in keys.RUN_SUFFIXES),
            keys.hold(tenant, model), keys.done(tenant, model)]


@pytest.mark.parametrize("tenant", TRICKY)
def test_a_tenants_keys_share_one_slot_whatever_its_names(tenant: str) -> None:
    for model in TRICKY:
        found = {tag_of(k) for k in tenant_keys(tenant, model, sid=model)}
        assert found == {"t:" + keys.escape(tenant)}
        slots = {key_slot(k.encode()) for k in tenant_keys(tenant, model, sid=model)}
        assert len(slots) == 1


def test_different_names_never_share_a_key_or_a_tag() -> None:
    seen: dict[str, tuple[str, str]] = {}
    for tenant, model in itertools.product(TRICKY, TRICKY):
        for key in tenant_keys(tenant, model, sid="s"):
            owner = seen.setdefault(key, (tenant, model))
            assert owner[0] == tenant, f"{key!r}: tenants {owner[0]!r} and {tenant!r}"
    tags = {tag_of(keys.limits(t)) for t in TRICKY}
    assert len(tags) == len(TRICKY)  # the escape is one-to-one
    deployments = {tag_of(keys.breaker(d, "open")) for d in TRICKY if d}
    assert len(deployments) == len([d for d in TRICKY if d])


def test_other_families_keep_their_slot_per_name() -> None:
    for name in TRICKY:
        assert tag_of(keys.quota(name, Kind.requests)) == tag_of(keys.quota(name, Kind.tokens)) \
            == tag_of(keys.quota_lease(name, "r1:7")) == "q:" + keys.escape(name)
        if name:  # a deployment's label is never empty: "<provider>/<model>"
            assert tag_of(keys.breaker(name, "open")) == tag_of(keys.breaker(name, "probe:0"))
        assert tag_of(keys.deferred_stream("gw:", name)) == \
            tag_of(keys.deferred_entry("gw:", name, "e1")) == \
            tag_of(keys.deferred_bytes("gw:", name)) == "t:" + keys.escape(name)


def test_plain_names_keep_the_keys_they_always_had() -> None:
    # The store's existing keys (and any replica of the previous version) use these.
    assert keys.limits("acme") + "req" == "rl:{t:acme}:req"
    assert keys.model_limits("acme", "gpt-4o") + "tok" == "rl:{t:acme}:m:gpt-4o:tok"
    assert keys.session_limits("acme", "abc") + "conc" == "rl:{t:acme}:s:abc:conc"
    assert keys.budget("acme", Kind.budget_cost, "d:20261206") == "rl:{t:acme}:b:cost:d:20261206"
    assert keys.loop("acme", "f", "abc") == "rl:{t:acme}:s:abc:loop:f"
    assert keys.run("acme", "abc", Kind.run_age) == "rl:{t:acme}:r:abc:run-t0"
    assert keys.hold("acme", "r1") == "rl:{t:acme}:hold:r1"
    assert keys.done("acme", "r1") == "rl:{t:acme}:done:r1"
    assert keys.quota("openai/gpt-4o", Kind.requests) == "q:{q:openai/gpt-4o}:req"
    assert keys.breaker("openai/gpt-4o", "cool") == "cb:{openai/gpt-4o}:cool"
    assert keys.deferred_entry("gw:", "acme", "e1") == "gw:dq:{t:acme}:e:e1"
    assert keys.deferred_bytes("gw:", "acme") == "gw:dq:{t:acme}:b"
    assert keys.FLEET_EPOCH == "rl:{fleet}:epoch"
    assert keys.fleet_heartbeat("r1") == "rl:{fleet}:hb:r1"


def test_counter_kinds_read_back_from_keys_of_older_entries() -> None:
    for kind in keys.RUN_SUFFIXES:
        if kind is not Kind.run_age:
            assert keys.counter_kind(keys.run("a:b:cost:", "s", kind)) is kind
    assert keys.counter_kind(keys.budget("t", Kind.budget_cost, "d:1")) is Kind.budget_cost
    assert keys.counter_kind(keys.budget("t", Kind.budget_tokens, "d:1")) is Kind.budget_tokens


def test_a_deferred_hold_stored_without_kinds_settles_as_before() -> None:
    # Holds stored by replicas before counter kinds were recorded: the kinds come from keys.
    import orjson

    from gateway.deferred.hold import hold_from_json, hold_to_json, run_hold
    from gateway.limits.limiter import Hold
    from gateway.state.plan import SettlePlan

    counters = ((keys.budget("a", Kind.budget_tokens, "d:1"), 5, 5, 1),
                (keys.budget("a", Kind.budget_cost, "d:1"), 9, 9, 1),
                (keys.run("a", "s", Kind.run_steps), 1, 1, 1))
    kinds = (Kind.budget_tokens, Kind.budget_cost, Kind.run_steps)
    plan = SettlePlan("e1", keys.done("a", "e1"), keys.hold("a", "e1"), 1, (), counters, ())
    hold = Hold("e1", "global", 5, 9, plan, counter_kinds=kinds)
    assert hold_from_json(hold_to_json(hold)).counter_kinds == kinds
    old = orjson.loads(hold_to_json(hold))
    del old["plan"]["counter_kinds"]
    assert hold_from_json(orjson.dumps(old)).counter_kinds == kinds
    run = run_hold(hold, 2)
    assert run.settle_plan is not None and run.counter_kinds == kinds
    assert run.settle_plan.hold_key == keys.hold("a", "e1.r2")
    assert run.settle_plan.done_key == keys.done("a", "e1.r2")
