"""Partial overrides: a nested section of the policy given in part keeps the defaults of the
keys it leaves out, in every nested section (config_base.StrictModel)."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.config import model as c
from gateway.config.admission import AdmissionPolicy, ClassesSettings, ConcurrencySettings
from gateway.config.deferred import DeferredPolicy
from gateway.request.auth import hash_key

PROVIDER = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
MODEL = {"deployments": [{"provider": "p", "model": "m"}]}
TENANT = {"api_keys": [hash_key("sk-tenant")]}
# Owners with required keys of their own get them here.
BASE: dict[type[BaseModel], dict[str, Any]] = {
    c.GatewayConfig: {"providers": {"p": PROVIDER}, "models": {"m": MODEL},
                      "tenants": {"t": TENANT}},
    c.Provider: PROVIDER,
    c.Model: MODEL,
    c.Tenant: TENANT,
}

# One case per nested section, "Owner.field": (key set, its new value).
CASES: dict[str, tuple[str, Any]] = {
    "GatewayConfig.server": ("port", 9090),
    "GatewayConfig.state": ("timeout_s", 0.5),
    "State.degraded": ("action", "fail_open"),
    "GatewayConfig.admission": ("shadow", True),
    "AdmissionPolicy.classes": ("critical", {"default_deadline_s": 5.0}),
    "ClassesSettings.critical": ("default_deadline_s", 5.0),
    "ClassesSettings.high": ("max_queue", 10),
    "ClassesSettings.normal": ("queue_target_ms", 700.0),
    "ClassesSettings.low": ("holdback_share", 0.5),
    "AdmissionPolicy.concurrency": ("max_limit", 64),
    "AdmissionPolicy.self_protection": ("max_open_streams", 100),
    "GatewayConfig.breaker": ("min_calls", 7),
    "GatewayConfig.retries": ("max_attempts", 2),
    "GatewayConfig.deferred": ("workers", 3),
    "DeferredPolicy.defaults": ("ttl_s", 60),
    "GatewayConfig.admin": ("api_keys", [hash_key("sk-admin")]),
    "Provider.timeouts": ("connect_s", 1.5),
    "Model.price": ("input_per_million", 2.5),
    "Tenant.limits": ("requests_per_minute", 60),
    "Tenant.budget": ("daily_tokens", 1000),
    "Tenant.loop_guard": ("max_repeats", 5),
    "Tenant.agent_loop": ("max_repeats", 7),
    "Tenant.run_budget": ("max_steps", 40),
    "Server.auth_failures": ("window_s", 30.0),
}


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def sections() -> dict[str, tuple[type[BaseModel], str]]:
    """Every field of the policy (reachable from GatewayConfig) whose default is a model."""
    found: dict[str, tuple[type[BaseModel], str]] = {}
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if isinstance(field.default, BaseModel):
                found[f"{model.__name__}.{name}"] = (model, name)
            for sub in _models(field.annotation):
                walk(sub)

    walk(c.GatewayConfig)
    return found


def test_every_nested_section_has_a_partial_override_case() -> None:
    assert set(sections()) == set(CASES), "add a case for each new nested section to CASES"


@pytest.mark.parametrize("path", sorted(CASES))
def test_a_section_given_in_part_keeps_the_other_defaults(path: str) -> None:
    owner, name = sections()[path]
    key, value = CASES[path]
    default = owner.model_fields[name].default
    assert isinstance(default, BaseModel)
    assert getattr(default, key) != value  # the case changes something
    loaded = owner.model_validate(BASE.get(owner, {}) | {name: {key: value}})
    section = getattr(loaded, name)
    for field in type(default).model_fields:
        got, was = getattr(section, field), getattr(default, field)
        if field != key:
            assert got == was, (path, field)
        elif isinstance(value, dict):  # a section inside: its own keys overlaid in turn
            assert all(getattr(got, k) == v for k, v in value.items())
            assert got != was
        else:
            assert got == value


def test_the_issue_example_a_class_deadline_alone() -> None:
    policy = AdmissionPolicy.model_validate({"classes": {"critical": {"default_deadline_s": 5}}})
    critical = policy.classes.critical
    assert critical.default_deadline_s == 5
    shipped = ClassesSettings().critical
    assert (critical.queue_target_ms, critical.max_queue, critical.holdback_share) == (
        shipped.queue_target_ms, shipped.max_queue, shipped.holdback_share)
    assert policy.classes.low == ClassesSettings().low


def test_partial_overrides_are_still_validated() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        AdmissionPolicy.model_validate({"classes": {"critical": {"deadline": 5}}})
    with pytest.raises(ValidationError, match="must not grow"):  # low's share above normal's
        AdmissionPolicy.model_validate({"classes": {"low": {"holdback_share": 0.99}}})
    with pytest.raises(ValidationError, match="min_limit <= initial_limit"):
        AdmissionPolicy.model_validate({"concurrency": {"min_limit": 50, "initial_limit": 10}})
    with pytest.raises(ValidationError, match="deployments.p/m: need min_limit"):
        AdmissionPolicy.model_validate({"deployments": {"p/m": {"min_limit": 9,
                                                                 "max_limit": 2}}})


def _bounds(settings: ConcurrencySettings) -> tuple[int, int, int]:
    return settings.min_limit, settings.initial_limit, settings.max_limit


@pytest.mark.parametrize(("given", "bounds"), [
    ({"max_limit": 2}, (2, 2, 2)),  # a two-slot server: the default floor and start of 4 fit
    ({"min_limit": 50}, (50, 50, 500)),
    ({"initial_limit": 2}, (2, 2, 500)),
    ({"initial_limit": 600}, (4, 600, 600)),
    ({"max_limit": 64}, (4, 4, 64)),  # defaults that fit stay as they are
])
def test_limit_bounds_left_out_follow_the_bounds_given(
        given: dict[str, int], bounds: tuple[int, int, int]) -> None:
    """docs/operations.md tells an operator who knows the server's concurrency to set
    max_limit; below the default floor of 4 that refused the whole policy."""
    assert _bounds(AdmissionPolicy.model_validate({"concurrency": given}).concurrency) == bounds
    assert _bounds(AdmissionPolicy.model_validate(
        {"deployments": {"p/m": given}}).concurrency_for("p/m")) == bounds
    assert _bounds(ConcurrencySettings.model_validate(given)) == bounds


def test_a_bad_bound_is_named_alone() -> None:
    """A bound out of range is not copied into the bounds left out, which would name three
    keys the operator never wrote."""
    with pytest.raises(ValidationError) as err:
        AdmissionPolicy.model_validate({"concurrency": {"max_limit": 0}})
    assert [e["loc"] for e in err.value.errors()] == [("concurrency", "max_limit")]


def test_a_deployment_override_fits_the_shared_bounds_it_leaves_out() -> None:
    policy = AdmissionPolicy.model_validate({"concurrency": {"min_limit": 8},
                                             "deployments": {"small/m": {"max_limit": 2}}})
    assert _bounds(policy.concurrency_for("small/m")) == (2, 2, 2)
    assert _bounds(policy.concurrency_for("other/m")) == (8, 8, 500)


def test_deferred_tenant_overrides_still_count_only_the_keys_given() -> None:
    """The overlay fills sections from their defaults; per-tenant maps are not sections, so a
    tenant's override still names only its own keys (DeferredPolicy.for_tenant)."""
    policy = DeferredPolicy.model_validate({"defaults": {"ttl_s": 60},
                                            "tenants": {"acme": {"max_queued": 5}}})
    acme = policy.for_tenant("acme")
    assert (acme.ttl_s, acme.max_queued) == (60, 5)


def test_editors_accept_what_the_loader_accepts() -> None:
    """The JSON Schema requires no key of a section that has defaults."""
    schema = c.json_schema()
    for owner, name in sections().values():
        title = type(owner.model_fields[name].default).__name__
        assert "required" not in schema["$defs"][title], title
