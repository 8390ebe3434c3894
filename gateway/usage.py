"""Usage by the dimensions providers bill, and its price in integer micro-units.

One ``Usage`` per request, filled from whatever the upstream reported (docs/architecture.md,
"Accounting", lists where each dimension comes from in each dialect):

- ``input_tokens``: every prompt token, cached or not (OpenAI's ``prompt_tokens`` /
  ``input_tokens``; Anthropic's ``input_tokens`` + both cache fields, because Anthropic's
  ``input_tokens`` counts only the tokens after the last cache breakpoint);
- of which ``cache_read_tokens`` (read from the provider's prompt cache) and
  ``cache_write_5m_tokens`` / ``cache_write_1h_tokens`` (written to it, by TTL; a write whose
  TTL is not reported counts as 5-minute, the providers' default);
- ``output_tokens``: every generated token, of which ``reasoning_tokens`` and the
  predicted-output tokens (``accepted_prediction_tokens``, ``rejected_prediction_tokens``);
  these sub-counts are billed as output and never added again;
- ``tool_calls``: calls of the tools the provider runs and bills per call (``SERVER_TOOLS``):
  Responses output items (``web_search_call``, ``file_search_call``...), Anthropic
  ``usage.server_tool_use`` (``web_search_requests``, ``web_fetch_requests``).

Unknown fields are ignored; a negative, fractional or non-numeric count reads as absent, and
a detail larger than its total is clamped to it, so no upstream answer makes a cost negative.

``Rates`` is a model's price table in integer micro-units (of the operator's currency) per
million tokens; ``cost_micros`` sums the dimensions and rounds up once, so every replica, the
journal and the Lua scripts agree on the same integer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MICROS = 1_000_000  # micro-units per unit of currency; also tokens per "million"
#: Tools the provider runs and bills per call (``Price.per_thousand_calls``), by the name each
#: is counted under: the ``tool`` label of gateway_billed_tool_calls_total.
SERVER_TOOLS = ("web_search", "web_fetch", "file_search", "code_interpreter",
                "image_generation")
# A Responses output item of each (one item, one call; its stream events are
# ``response.<item type>.*``), and Anthropic's server_tool_use counts (its server tools by
# those names: ``ANTHROPIC_CALLED``).
RESPONSES_CALLS = {"web_search_call": "web_search", "file_search_call": "file_search",
                   "code_interpreter_call": "code_interpreter",
                   "image_generation_call": "image_generation"}
_ANTHROPIC_CALLS = {"web_search_requests": "web_search", "web_fetch_requests": "web_fetch"}
ANTHROPIC_CALLED = tuple(_ANTHROPIC_CALLS.values())
#: ``Usage.dimensions()`` keys, the ``dimension`` label of gateway_billed_tokens_total.
DIMENSIONS = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output", "reasoning",
              "accepted_prediction", "rejected_prediction")


@dataclass(slots=True)
class Usage:
    """Token counts as the upstream reported them (or as counted from a cut stream)."""

    input_tokens: int = 0  # all prompt tokens: uncached + cache reads + cache writes
    output_tokens: int = 0  # all generated tokens, reasoning included
    reported: bool = False  # False: no usage from the upstream; the counts are estimates
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # Which sides a usage object reported as a count (``reported`` alone: an object was
    # found). A side missing, negative, fractional or not a number, and an input of 0, read
    # as absent and are estimated (``fill_in``): ``{}`` once made a request free.
    input_seen: bool = False
    output_seen: bool = False
    # What of the Responses API answer this usage came with a later request may refer to by
    # id, when the provider stores it (``store`` not false), with the tokens each holds as
    # reported: the answer (``previous_response_id``: its input + output) and its reasoning
    # items (passed back by id: the answer's reasoning tokens at most). limits/responses.py.
    stored: tuple[tuple[str, int], ...] = ()
    # Calls of tools the provider ran and bills per call, by ``SERVER_TOOLS`` name.
    tool_calls: dict[str, int] = field(default_factory=dict)

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cache_read_tokens - self.cache_write_tokens)

    def dimensions(self) -> dict[str, int]:
        """Tokens per billed dimension (the metric label values; bounded by construction)."""
        return {
            "input": self.uncached_input_tokens,
            "cache_read": self.cache_read_tokens,
            "cache_write_5m": self.cache_write_5m_tokens,
            "cache_write_1h": self.cache_write_1h_tokens,
            "output": self.output_tokens,
            "reasoning": self.reasoning_tokens,
            "accepted_prediction": self.accepted_prediction_tokens,
            "rejected_prediction": self.rejected_prediction_tokens,
        }

    def limit_tokens(self, count_cache_reads: bool) -> int:
        """Tokens a TPM limit or token budget counts: input (with or without cache reads)
        plus output."""
        counted = self.input_tokens if count_cache_reads else \
            self.input_tokens - self.cache_read_tokens
        return counted + self.output_tokens

    def fill_in(self, input_estimate: int, output_estimate: int) -> None:
        """The sides the upstream did not report, as the gateway estimated them."""
        if not self.input_seen:
            self.input_tokens = max(self.input_tokens, input_estimate)
        if not self.output_seen:
            self.output_tokens = max(self.output_tokens, output_estimate)

    def merge(self, data: Any) -> bool:
        """Take the usage object out of any of the dialects' shapes, if present: a chat /
        completions / embeddings body or chunk, a Responses ``response`` (or an event carrying
        one), an Anthropic message, ``message_start`` or ``message_delta``. True when a usage
        object was found."""
        if not isinstance(data, dict):
            return False
        usage = data.get("usage")
        for outer in ("response", "message"):
            inner = data.get(outer)
            if usage is None and isinstance(inner, dict):
                usage = inner.get("usage")
        if not isinstance(usage, dict):
            return False
        if data.get("type") in _ANTHROPIC_TYPES or any(k in usage for k in _ANTHROPIC_ONLY):
            self._merge_anthropic(usage)
        else:
            self._merge_openai(usage)
        self.reported = True
        self.input_seen = self.input_seen or self.input_tokens > 0
        # A Responses body, or an event carrying one (response.completed / .incomplete): as
        # reported, before any estimate is added for other attempts
        answer = data if data.get("object") == "response" else data.get("response")
        if isinstance(answer, dict) and answer.get("object") == "response":
            output = answer.get("output")
            items = [i for i in output if isinstance(i, dict)] if isinstance(output, list) \
                else []
            calls: dict[str, int] = {}
            for item in items:
                kind = item.get("type")
                tool = RESPONSES_CALLS.get(kind) if isinstance(kind, str) else None
                if tool is not None:
                    calls[tool] = calls.get(tool, 0) + 1
            self.tool_calls = calls  # the whole answer's, each time it is reported
            self.stored = self._stored(answer, items)
        return True

    def _stored(self, answer: dict[str, Any], items: list[dict[str, Any]]
                ) -> tuple[tuple[str, int], ...]:
        ident = answer.get("id")
        if answer.get("store") is False or not isinstance(ident, str) \
                or len(ident) > MAX_RESPONSE_ID or not self.output_seen:
            return ()  # nothing to refer to, or its size not reported: followers reserve
        # An image the provider generated (image_generation tool) is read back by a follow-up
        # but billed apart from this usage: such an answer's size is not known.
        found = [(ident, self.input_tokens + self.output_tokens)] \
            if self.input_seen and "image_generation" not in self.tool_calls else []
        reasoning = self.reasoning_tokens or self.output_tokens
        found += [(item["id"], reasoning) for item in items if item.get("type") == "reasoning"
                  and isinstance(item.get("id"), str) and len(item["id"]) <= MAX_RESPONSE_ID]
        return tuple(found[:MAX_STORED])

    def _merge_openai(self, usage: dict[str, Any]) -> None:
        # Chat/completions/embeddings: prompt_tokens + prompt_tokens_details; Responses:
        # input_tokens + input_tokens_details. Both totals include the cached tokens.
        inp = _count(usage, "prompt_tokens", "input_tokens")
        if inp is not None:
            details = _dict(usage, "prompt_tokens_details", "input_tokens_details")
            self.input_tokens = inp
            self.cache_read_tokens = min(inp, _count(details, "cached_tokens") or 0)
            self.cache_write_5m_tokens = min(inp - self.cache_read_tokens,
                                             _count(details, "cache_write_tokens") or 0)
            self.cache_write_1h_tokens = 0
        out = _count(usage, "completion_tokens", "output_tokens")
        if out is not None:
            self.output_seen = True
            self._set_output(out, _dict(usage, "completion_tokens_details",
                                        "output_tokens_details"))

    def _merge_anthropic(self, usage: dict[str, Any]) -> None:
        # message_start carries the input side; message_delta the cumulative output and, on
        # current API versions, the input side again: a field present replaces what was there.
        uncached = _count(usage, "input_tokens")
        if uncached is None:
            uncached = self.uncached_input_tokens
        read = _count(usage, "cache_read_input_tokens")
        if read is not None:
            self.cache_read_tokens = read
        written = _count(usage, "cache_creation_input_tokens")
        if written is not None:
            # The split by TTL comes in message_start (and whole bodies); message_delta
            # repeats only the total, so an absent split keeps the one already known.
            by_ttl = _count(_dict(usage, "cache_creation"), "ephemeral_1h_input_tokens")
            one_hour = min(written, self.cache_write_1h_tokens if by_ttl is None else by_ttl)
            self.cache_write_1h_tokens = one_hour
            self.cache_write_5m_tokens = written - one_hour
        self.input_tokens = uncached + self.cache_read_tokens + self.cache_write_tokens
        server = _dict(usage, "server_tool_use")  # cumulative: message_delta repeats it
        for name, tool in _ANTHROPIC_CALLS.items():
            calls = _count(server, name)
            if calls is not None:
                self.tool_calls[tool] = calls
        out = _count(usage, "output_tokens")
        if out is not None:
            self.output_seen = True
            details = _dict(usage, "output_tokens_details")
            self.output_tokens = out
            if "thinking_tokens" in details:
                self.reasoning_tokens = min(out, _count(details, "thinking_tokens") or 0)

    def _set_output(self, out: int, details: dict[str, Any]) -> None:
        self.output_tokens = out
        self.reasoning_tokens = min(out, _count(details, "reasoning_tokens") or 0)
        self.accepted_prediction_tokens = min(out, _count(details, "accepted_prediction_tokens")
                                              or 0)
        self.rejected_prediction_tokens = min(out, _count(details, "rejected_prediction_tokens")
                                              or 0)


# Longer ids are not remembered (no provider's is near it; the memory's entries stay small).
MAX_RESPONSE_ID = 256
# What is remembered of one answer: itself and its first reasoning items.
MAX_STORED = 64

# Anthropic's objects (a message body, the stream events that carry usage) and the fields only
# its usage object has: either decides which arithmetic applies.
_ANTHROPIC_TYPES = ("message", "message_start", "message_delta")
_ANTHROPIC_ONLY = ("cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation")


def _count(obj: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` that holds a non-negative integer; None when none does."""
    for name in names:
        value = obj.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _dict(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    for name in names:
        value = obj.get(name)
        if isinstance(value, dict):
            return value
    return {}


@dataclass(frozen=True, slots=True)
class Rates:
    """A model's prices in integer micro-units per million tokens, one per billed dimension
    (reasoning and prediction tokens are output and priced as output)."""

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    # Micro-units per thousand calls of a tool the provider bills per call (SERVER_TOOLS).
    per_thousand_calls: tuple[tuple[str, int], ...] = ()

    def calls_micros_scaled(self, calls: dict[str, int]) -> int:
        """The calls' price in micro-units x MICROS (``cost_micros``' scale: per call is a
        thousandth of the price per thousand, and MICROS / 1000 = 1000)."""
        return sum(calls.get(tool, 0) * rate * 1000 for tool, rate in self.per_thousand_calls)


def micros(price_per_million: float) -> int:
    """A configured price (currency per million tokens) in integer micro-units, rounded at the
    sixth decimal as written (``Decimal(repr(x))``: 0.3 is 300000, never 299999)."""
    exact = Decimal(repr(price_per_million)) * MICROS
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cost_micros(usage: Usage, rates: Rates) -> int:
    """The price of ``usage`` in micro-units: integer sum over the dimensions, rounded up once."""
    total = (usage.uncached_input_tokens * rates.input
             + usage.cache_read_tokens * rates.cache_read
             + usage.cache_write_5m_tokens * rates.cache_write_5m
             + usage.cache_write_1h_tokens * rates.cache_write_1h
             + usage.output_tokens * rates.output
             + rates.calls_micros_scaled(usage.tool_calls))
    return -(-total // MICROS)


def reservation_cost_micros(prompt_tokens: int, max_output_tokens: int, rates: Rates,
                            calls: dict[str, int] | None = None) -> int:
    """The cost reserved at admission: the prompt estimate at the uncached input price plus
    every allowed output token, and the calls of tools the provider bills per call that it
    may make (``ProxyCall.tool_calls``). (A cache write priced above input can settle a
    little higher; settlement charges the difference.)"""
    return -(-(prompt_tokens * rates.input + max_output_tokens * rates.output
               + rates.calls_micros_scaled(calls or {})) // MICROS)
