"""Prometheus metrics, OpenTelemetry tracing, JSON logs, the workers' merged scrape."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .logs import ACCESS_LOGGER, RefusalLog
from .metrics import GatewayMetrics, metrics_handler
from .tracing import Tracing
from .worker_group import WORKER_GROUP, WorkerGroup, worker_group_from

__all__ = [
    "ACCESS_LOGGER",
    "WORKER_GROUP",
    "GatewayMetrics",
    "RefusalLog",
    "Tracing",
    "WorkerGroup",
    "metrics_handler",
    "worker_group_from",
]
