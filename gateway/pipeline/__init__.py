"""The request path: handle_proxy (steps 0-12), the attempt loop, Policy and Services."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .attempts import CallContext, attempt_loop
from .handler import handle_proxy, models_listing
from .services import PolicyVersion, Services

__all__ = [
    "CallContext",
    "PolicyVersion",
    "Services",
    "attempt_loop",
    "handle_proxy",
    "models_listing",
]
