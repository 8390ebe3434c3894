"""The mock upstream (gateway mock-upstream): OpenAI/Anthropic answers, SSE, capacity, knobs."""

from __future__ import annotations

# --- public face: what other packages import (restructure.py --faces) ---
from .capacity import Capacity
from .upstream import create_mock_app

__all__ = [
    "Capacity",
    "create_mock_app",
]
