"""The mock upstream (gateway mock-upstream): OpenAI/Anthropic answers, SSE, capacity, knobs."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .capacity import Capacity
from .upstream import create_mock_app

__all__ = [
    "Capacity",
    "create_mock_app",
]
