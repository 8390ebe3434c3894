"""Shared helpers for tests that run a real gateway in front of the mock upstream."""

from __future__ import annotations

import copy
import logging
from typing import Any

from gateway.config.model import GatewayConfig, parse_config
from gateway.request.auth import hash_key

ACME_KEY = "sk-test-acme"
UMBRELLA_KEY = "sk-test-umbrella"


# For ``admission=``: no shedding for event-loop lag. These tests run the gateway, its upstream
# and their clients on one loop of a shared CI machine, where a stall of a few hundred ms (a
# full garbage collection of a test process late in the suite, a busy neighbour) is the
# machine's, not the gateway's. ``policy`` applies it unless a test sets its own threshold;
# the self-protection tests (tests/unit/test_selfprotect.py) set theirs.
NO_LAG_SHEDDING = {"self_protection": {"max_loop_lag_ms": 600_000}}


def policy_dict(upstream: str, **overrides: Any) -> dict[str, Any]:
    """A small policy as a plain dict; ``upstream`` is the mock's http://host:port."""
    data: dict[str, Any] = {
        "providers": {
            "main": {"kind": "openai", "base_url": f"{upstream}/v1",
                     "forward_headers": ["x-mock-*"],
                     "timeouts": {"connect_s": 2, "first_byte_s": 5, "idle_s": 2, "total_s": 20}},
            "claude": {"kind": "anthropic", "base_url": upstream, "forward_headers": ["x-mock-*"],
                       "timeouts": {"connect_s": 2, "first_byte_s": 5, "idle_s": 2,
                                    "total_s": 20}},
        },
        "models": {
            "gpt-test": {"deployments": [{"provider": "main", "model": "upstream-gpt"}],
                         "price": {"input_per_million": 1.0, "output_per_million": 2.0}},
            "embed-test": {"deployments": [{"provider": "main", "model": "upstream-embed"}]},
            "claude-test": {"deployments": [{"provider": "claude", "model": "upstream-claude"}]},
        },
        "tenants": {
            "acme": {"api_keys": [hash_key(ACME_KEY)], "models": ["*"],
                     "default_priority": "normal", "max_priority": "high"},
            "umbrella": {"api_keys": [hash_key(UMBRELLA_KEY)], "models": ["gpt-test"],
                         "default_priority": "low", "max_priority": "normal"},
        },
        "admission": copy.deepcopy(NO_LAG_SHEDDING),
    }
    return _merge(data, overrides)


def policy(upstream: str, **overrides: Any) -> GatewayConfig:
    return parse_config(policy_dict(upstream, **overrides))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a gateway log record (``extra={"fields": {...}}``, see observability/logs.py)."""
    fields: dict[str, Any] = vars(record)["fields"]
    return fields


def auth(key: str = ACME_KEY, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def chat(model: str = "gpt-test", text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


class FakeClock:
    """Seconds that move only when the test says so: the one fake clock of the tests, for
    monotonic and wall clocks alike (set ``now`` or call ``advance``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
