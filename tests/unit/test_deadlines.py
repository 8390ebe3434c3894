"""Deadlines: parsing the timeout headers, defaults and caps, feasibility, the upstream budget."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.admission.deadlines import Deadline, parse_timeout, request_deadline
from gateway.config.admission import AdmissionPolicy
from gateway.config.model import Priority
from gateway.errors import GatewayError

POLICY = AdmissionPolicy.model_validate(
    {"max_deadline_s": 900.0, "tenant_max_deadline_s": {"batchy": 120.0}}
)
NOW = 5000.0


def deadline(headers: dict[str, str], priority: Priority = Priority.normal,
             tenant: str = "acme") -> Deadline:
    return request_deadline(CIMultiDict(headers), priority, tenant, NOW, POLICY)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30.0), ("2.5", 2.5), (" 7 ", 7.0), (".5", 0.5), ("600.0", 600.0)]
)
def test_parse_timeout_accepts_plain_seconds(text: str, seconds: float) -> None:
    assert parse_timeout("X-Request-Timeout", text) == seconds


@pytest.mark.parametrize("text", ["0", "0.0", "-1", "abc", "nan", "inf", "1e3", "", "1_000", "5s"])
def test_parse_timeout_rejects_anything_else_with_400(text: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_timeout("X-Request-Timeout", text)
    assert err.value.status == 400
    assert err.value.param == "X-Request-Timeout"


def test_header_sdk_read_timeout_and_class_default() -> None:
    assert deadline({"x-request-timeout": "12"}) == Deadline(NOW + 12, "x-request-timeout")
    assert deadline({"X-Stainless-Read-Timeout": "45.0"}) == Deadline(
        NOW + 45, "x-stainless-read-timeout"
    )
    # the client gives up after either: the tighter one is the deadline
    assert deadline({"X-Request-Timeout": "50", "x-stainless-read-timeout": "20"}).at == NOW + 20
    assert deadline({"X-Request-Timeout": "10", "x-stainless-read-timeout": "20"}).at == NOW + 10
    assert deadline({}, Priority.critical) == Deadline(NOW + 60, "default")
    assert deadline({}, Priority.low).at == NOW + 600


def test_invalid_sdk_read_timeout_is_a_400_naming_the_header() -> None:
    with pytest.raises(GatewayError) as err:
        deadline({"x-stainless-read-timeout": "-3"})
    assert (err.value.status, err.value.param) == (400, "x-stainless-read-timeout")


def test_deadlines_are_capped_per_tenant_and_globally() -> None:
    assert deadline({"x-stainless-read-timeout": "600"}).at == NOW + 600
    assert deadline({"X-Request-Timeout": "5000"}).at == NOW + 900
    assert deadline({"X-Request-Timeout": "5000"}, tenant="batchy").at == NOW + 120
    assert deadline({}, Priority.low, tenant="batchy").at == NOW + 120
    assert POLICY.deadline_cap_s("batchy") == 120.0


def test_feasibility_and_check() -> None:
    d = Deadline(NOW + 10, "x-request-timeout")
    assert d.remaining(NOW + 4) == 6
    assert d.feasible(NOW + 4, expected_ttft=6.0)
    assert not d.feasible(NOW + 4, expected_ttft=6.5)
    d.check(NOW, expected_ttft=1.0)
    with pytest.raises(GatewayError) as err:
        d.check(NOW + 9.5, expected_ttft=1.0)
    assert (err.value.status, err.value.code) == (504, "deadline_exceeded")
    assert err.value.headers == {"x-should-retry": "false"}


def test_budget_bounds_upstream_timeouts_and_travels_upstream() -> None:
    d = Deadline(NOW + 10, "default")
    assert d.bound(NOW + 4, timeout_s=60.0) == 6.0
    assert d.bound(NOW + 4, timeout_s=5.0) == 5.0
    assert d.bound(NOW + 11, timeout_s=5.0) == 0.0
    assert d.upstream_headers(NOW + 2.5) == {"x-request-timeout": "7.500"}
    assert d.upstream_headers(NOW + 20) == {"x-request-timeout": "0.001"}
    # what we send is what a gateway behind us would read
    assert parse_timeout("X-Request-Timeout", d.upstream_headers(NOW)["x-request-timeout"]) == 10
