"""Per-deployment circuit breakers (pybreaker), escalation and fleet-wide sync."""

from __future__ import annotations

# --- public face: what other packages import (restructure.py --faces) ---
from .board import BreakerBoard, Trial

__all__ = [
    "BreakerBoard",
    "Trial",
]
