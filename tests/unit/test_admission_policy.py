"""The admission section of the policy: defaults from the architecture, strict validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config.admission import AdmissionPolicy
from gateway.config.model import Priority


def test_defaults_follow_the_architecture() -> None:
    policy = AdmissionPolicy()
    targets = {p.name: policy.classes.of(p).queue_target_ms for p in Priority}
    shares = {p.name: policy.classes.of(p).holdback_share for p in Priority}
    assert targets == {"critical": 1000, "high": 300, "normal": 500, "low": 500}
    assert shares == {"critical": 1.0, "high": 0.95, "normal": 0.85, "low": 0.70}
    assert policy.classes.low.max_queue < policy.classes.normal.max_queue  # "small queue"
    assert policy.cohort_buckets == 128
    assert policy.retry_after_max_s <= 60
    assert policy.shadow is False


def test_per_deployment_overrides_merge_onto_the_shared_bounds() -> None:
    policy = AdmissionPolicy.model_validate({
        "concurrency": {"min_limit": 2, "initial_limit": 10, "max_limit": 50},
        "deployments": {"local/llama": {"max_limit": 12}},
    })
    merged = policy.concurrency_for("local/llama")
    assert (merged.min_limit, merged.initial_limit, merged.max_limit) == (2, 10, 12)
    assert policy.concurrency_for("openai/gpt-4o") is policy.concurrency


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"concurrency": {"min_limit": 10, "initial_limit": 5}}, "min_limit <= initial_limit"),
        ({"deployments": {"a/b": {"initial_limit": 5, "max_limit": 3}}},
         "deployments.a/b: .*initial_limit"),
        ({"classes": {"low": {"queue_target_ms": 1, "max_queue": 1, "holdback_share": 0.99,
                              "default_deadline_s": 1}}}, "must not grow"),
        ({"classes": {"critical": {"queue_target_ms": 1, "max_queue": 1, "holdback_share": 0.9,
                                   "default_deadline_s": 1}}}, "critical.holdback_share"),
        ({"retry_after_max_s": 120}, "less than or equal to 60"),
        ({"retry_after_min_s": 10, "retry_after_max_s": 5}, "retry_after_min_s"),
        ({"concurrency": {"decrease_factor": 1.0}}, "less than 1"),
        ({"concurrency": {"latency_brake": 0.5}}, "greater than 1"),
        ({"shadow": "yes"}, "valid boolean"),
        ({"codel_interval": 100}, "Extra inputs"),
    ],
)
def test_invalid_policies_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AdmissionPolicy.model_validate(data)


def test_policy_is_frozen() -> None:
    policy = AdmissionPolicy()
    with pytest.raises(ValidationError):
        policy.shadow = True  # type: ignore[misc]  # the refused assignment is the test
