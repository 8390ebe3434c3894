"""Deferred requests (Prefer: respond-async): service, runner, hold, store and its backends."""

from __future__ import annotations

# --- public face: what other packages import (restructure.py --faces) ---
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
