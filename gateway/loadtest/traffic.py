"""What each request carries: synthetic prompts, bodies, headers and the mock's knobs.

Prompts are synthetic only: slices of a pseudo-random text made of invented words, about four
bytes per token (the gateway and the mock both estimate tokens that way), prefixed with the run
and step so no two requests repeat (the gateway's loop guard refuses exact repeats).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from .scenario import Dist, Phase, Scenario, Upstream, Workload

__all__ = ["PhaseKnobs", "SyntheticText", "WorkloadPlan", "plan_workloads"]

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "qu", "ze", "po", "an", "el", "or")


class SyntheticText:
    """A fixed pseudo-random text to cut prompts from (cheap: one slice per request)."""

    def __init__(self, rng: random.Random, size: int = 1 << 17) -> None:
        vocabulary = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(512)]
        # ~4.5 bytes per word with its space: enough words to fill ``size``.
        self._text = " ".join(rng.choices(vocabulary, k=size // 4))[:size]

    def prompt(self, tokens: int, rng: random.Random) -> str:
        """About ``tokens`` tokens (4 bytes each) of text."""
        wanted = max(4, tokens * 4)
        text = self._text
        if wanted >= len(text):
            return (text * (wanted // len(text) + 1))[:wanted]
        start = rng.randrange(len(text) - wanted)
        return text[start:start + wanted]


@dataclass(slots=True)
class WorkloadPlan:
    """A workload with its samplers and fixed headers prepared once."""

    spec: Workload
    klass: str
    headers: dict[str, str]
    draw_prompt: Callable[[], float]
    draw_max_tokens: Callable[[], float]
    draw_output: Callable[[], float] | None
    draw_think_s: Callable[[], float]

    def body(self, run_id: int, step: int, text: SyntheticText, rng: random.Random,
             stream: bool) -> tuple[bytes, int]:
        """The request body and the number of answer tokens to ask the mock for."""
        prompt_tokens = int(self.draw_prompt())
        max_tokens = max(1, int(self.draw_max_tokens()))
        output = max_tokens if self.draw_output is None else max(0, int(self.draw_output()))
        content = f"run {run_id} step {step}: " + text.prompt(prompt_tokens, rng)
        messages: list[dict[str, object]] = [
            {"role": "system", "content": "You are a synthetic load-test agent."},
            {"role": "user", "content": content},
        ]
        if self.spec.tool_calls != "none":
            messages += _tool_history(run_id, step, self.spec.tool_calls == "loop")
        body: dict[str, object] = {
            "model": self.spec.model,
            "messages": messages,
            "max_tokens": max_tokens,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body), output

    def think_s(self) -> float:
        return self.draw_think_s() / 1000.0


def _tool_history(run_id: int, step: int, loop: bool) -> list[dict[str, object]]:
    """The assistant's tool calls of steps 1 .. step-1 and their results: the same call each
    time (``loop``: polling a job that never finishes) or a new one each time."""
    out: list[dict[str, object]] = []
    for earlier in range(1, step):
        args = {"job": f"report-{run_id}"} if loop else {"job": f"report-{run_id}",
                                                          "page": earlier}
        call_id = f"call_{run_id}_{earlier}"
        out.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "fetch_report", "arguments": orjson.dumps(args).decode()}}]})
        out.append({"role": "tool", "tool_call_id": call_id,
                    "content": _PENDING if loop else f"page {earlier}: " + _ROWS})
    return out


# Tool results of about 50 tokens each (200 bytes), as a status or data API answers: the
# history, and so each step's prompt, grows by that much per step.
_PENDING = ('{"status": "pending", "progress": null, "message": "The report is being prepared; '
            'poll again later.", "retry_hint_s": 30, "queue": "reports-default", "eta": null}')
_ROWS = ('{"rows": [["north", 1200, 800, 31], ["south", 980, 700, 27], ["east", 1430, 910, '
         '35], ["west", 1105, 760, 29]], "columns": ["region", "revenue", "cost", "heads"]}')


def plan_workloads(scenario: Scenario, keys: dict[str, str],
                   rng: random.Random) -> list[WorkloadPlan]:
    """One plan per workload; ``keys`` maps tenant names to API keys."""
    plans = []
    for w in scenario.workloads:
        headers = {"Authorization": f"Bearer {keys[w.tenant]}",
                   "Content-Type": "application/json"}
        if w.priority is not None:
            headers["X-Priority"] = w.priority
        if w.deadline_s is not None:
            headers["X-Request-Timeout"] = f"{w.deadline_s:g}"
        plans.append(WorkloadPlan(
            spec=w, klass=w.priority or "default", headers=headers,
            draw_prompt=w.prompt_tokens.sampler(rng),
            draw_max_tokens=w.max_tokens.sampler(rng),
            draw_output=w.output_tokens.sampler(rng) if w.output_tokens else None,
            draw_think_s=w.think_ms.sampler(rng),
        ))
    return plans


class PhaseKnobs:
    """The x-mock-* headers of one phase, with its outage windows; a first-token delay given
    as a distribution is drawn per request from ``rng``."""

    def __init__(self, phase: Phase, rng: random.Random) -> None:
        up = phase.upstream
        self._base = _knob_headers(up)
        self._outages = [(o.at_s, o.at_s + o.duration_s, _outage_headers(o.status, o.fail))
                         for o in up.outages]
        self._draw_ttft = up.ttft_ms.sampler(rng) if isinstance(up.ttft_ms, Dist) else None

    def headers(self, since_phase_start: float) -> dict[str, str]:
        base = self._base
        if self._draw_ttft is not None:
            base = {**base, "x-mock-ttft-ms": f"{self._draw_ttft():.1f}"}
        for start, end, extra in self._outages:
            if start <= since_phase_start < end:
                return {**base, **extra}
        return base


def _knob_headers(up: Upstream) -> dict[str, str]:
    out: dict[str, str] = {}
    ttft = up.ttft_ms if not isinstance(up.ttft_ms, Dist) else None  # else drawn per request
    for name, value in (("x-mock-latency-ms", up.latency_ms), ("x-mock-ttft-ms", ttft),
                        ("x-mock-chunk-gap-ms", up.chunk_gap_ms),
                        ("x-mock-fail-rate", up.fail_rate), ("x-mock-status", up.status),
                        ("x-mock-retry-after", up.retry_after_s)):
        if value is not None:
            out[name] = f"{value:g}"
    if up.fail is not None:
        out["x-mock-fail"] = up.fail
    out.update(up.headers)
    return out


def _outage_headers(status: int, fail: str | None) -> dict[str, str]:
    out = {"x-mock-status": str(status), "x-mock-fail-rate": "1"}
    if fail is not None:
        out["x-mock-fail"] = fail
    return out
