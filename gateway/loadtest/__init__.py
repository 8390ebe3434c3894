"""``gateway loadtest``: synthetic, bursty agent traffic for auditing backpressure.

Modules: ``scenario`` (the YAML format), ``arrivals`` (open-loop processes), ``traffic``
(synthetic prompts, headers, mock knobs), ``client`` (one HTTP attempt, SDK-like retries),
``engine`` (phases, runs, requests), ``stats`` / ``hist`` (counts and HDR histograms),
``monitor`` (is the generator the bottleneck?), ``hooks`` (phase shell hooks), ``live``
(progress display), ``report`` (JSON, tables, compare), ``plots`` (PNG, optional matplotlib),
``cli`` (the command). Importing this package imports none of them.
"""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .cli import main

__all__ = [
    "main",
]
