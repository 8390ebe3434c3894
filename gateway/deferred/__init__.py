"""Deferred requests (Prefer: respond-async): service, runner, hold, store and its backends."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .service import FINAL, DeferredService, create_store, unavailable, valid_id
from .store import Fields

__all__ = [
    "FINAL",
    "DeferredService",
    "Fields",
    "create_store",
    "unavailable",
    "valid_id",
]
