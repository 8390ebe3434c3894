"""Per-deployment circuit breakers (pybreaker), escalation and fleet-wide sync."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .board import BreakerBoard, Trial

__all__ = [
    "BreakerBoard",
    "Trial",
]
