"""Who goes now: self-protection, deadlines, the adaptive per-deployment limit, priority
queues, shedding."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .controller import AdmissionController
from .deadlines import Deadline, deadline_exceeded, request_deadline
from .selfprotect import BodyHold, SelfProtection
from .shed import cohort_key
from .state import AdmissionObserver, AdmissionRequest, Permit, is_client_retry

__all__ = [
    "AdmissionController",
    "AdmissionObserver",
    "AdmissionRequest",
    "BodyHold",
    "Deadline",
    "Permit",
    "SelfProtection",
    "cohort_key",
    "deadline_exceeded",
    "is_client_retry",
    "request_deadline",
]
