"""The aiohttp application: routes and error boundary, the Gateway object, admin and deferred endpoints."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .admin import render_table
from .server import GATEWAY, RECORD, create_app

__all__ = [
    "GATEWAY",
    "RECORD",
    "create_app",
    "render_table",
]
