"""Tenant rate limits, budgets and run budgets, provider quotas, degraded mode and its journal."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .degraded import DegradedMode
from .journal import JournalFile
from .limiter import DONE_TTL_MS, LEASE_TTL_MS, Counting, Hold, InFlight, Limiter
from .quota import ProviderQuotas

__all__ = [
    "DONE_TTL_MS",
    "LEASE_TTL_MS",
    "Counting",
    "DegradedMode",
    "Hold",
    "InFlight",
    "JournalFile",
    "Limiter",
    "ProviderQuotas",
]
