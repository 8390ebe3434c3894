"""Serving it: runner and connection guard, lifecycle and drain, reload, worker processes, heap."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .lifecycle import ServeOptions, run
from .reload import file_signature, watched_files
from .runner import GatewayRunner
from .workers import memory_backend_warning, supervise, tag_worker_logs

__all__ = [
    "GatewayRunner",
    "ServeOptions",
    "file_signature",
    "memory_backend_warning",
    "run",
    "supervise",
    "tag_worker_logs",
    "watched_files",
]
