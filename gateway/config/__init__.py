"""The policy file: pydantic models of every section, loading, schema and reference doc."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .admission import AdmissionPolicy, ConcurrencySettings
from .base import PositiveFloat, Priority, PriorityName, StrictModel
from .breaker import BreakerPolicy
from .deferred import DeferredPolicy
from .doc import example_documents, render
from .limits import CacheReads, Degraded, RateLimits, RunBudget
from .model import (
    AuthFailureLimit,
    ConfigError,
    Deployment,
    GatewayConfig,
    Model,
    Provider,
    Tenant,
    json_schema,
    load_config,
    resolve_api_key,
)
from .retry import RetryPolicy

__all__ = [
    "AdmissionPolicy",
    "AuthFailureLimit",
    "BreakerPolicy",
    "CacheReads",
    "ConcurrencySettings",
    "ConfigError",
    "DeferredPolicy",
    "Degraded",
    "Deployment",
    "GatewayConfig",
    "Model",
    "PositiveFloat",
    "Priority",
    "PriorityName",
    "Provider",
    "RateLimits",
    "RetryPolicy",
    "RunBudget",
    "StrictModel",
    "Tenant",
    "example_documents",
    "json_schema",
    "load_config",
    "render",
    "resolve_api_key",
]
