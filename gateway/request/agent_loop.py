"""The loop detector that reads the conversation (step 3b, after classify).

An agent resends its whole history on every step, so a looping agent's requests are never
byte-identical (the loop guard's fingerprint in limits/limiter.py does not see them), but its history
shows the loop: the same tool called with the same arguments again and again, or the last
steps repeating a cycle. ``find_loop`` reads the tool calls the assistant made in the body's
history, in every dialect:

- chat completions: ``messages[*].tool_calls[*].function.{name, arguments}`` of assistant
  messages (one message = one step);
- Responses: ``input[*]`` items of ``type: function_call`` (``name``, ``arguments``);
  consecutive ones are one step (parallel calls);
- Anthropic Messages: ``messages[*].content[*]`` blocks of ``type: tool_use`` (``name``,
  ``input``) of assistant messages.

A call without a string name is not a call and is skipped. Arguments are compared as
canonical JSON (keys sorted, no whitespace), so ``{"a":1,"b":2}``
and ``{ "b": 2, "a": 1 }`` are the same call; arguments that are not JSON are compared as sent.
Cost: one pass over the message list, touching only tool calls; the messages themselves are
never serialised again. A call's arguments are parsed and dumped once per process: an agent
resends its whole history every step, so a ``CanonicalCache`` (one per process, bounded)
remembers the canonical form of argument strings already seen, and each step canonicalises
only its new calls.

The finding is reported per tenant policy (``tenant.agent_loop``, limits_policy.AgentLoop):
``warn`` adds ``x-gateway-agent-loop`` to the answer, ``refuse`` answers 429
``agent_loop_detected`` (``x-should-retry: false``), ``shadow`` only counts and logs it.
The tool's name is reduced to ``[A-Za-z0-9_.-]``, at most 64 characters, before it reaches a
header or a log; arguments never leave this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.jsonbytes import Exhausted, ParseAllowance, deeper_than

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_SAFE = re.compile(r"[A-Za-z0-9_.\-]+")
Call = tuple[str, bytes]  # (tool name, canonical arguments)


@dataclass(frozen=True, slots=True)
class LoopFinding:
    """What the detector found: ``kind`` ``repeat`` (one call ``count`` times) or ``cycle``
    (the last ``count`` steps are repeats of a ``period``-step pattern)."""

    kind: str
    tool: str  # the repeated tool, or the first tool of the cycle (sanitised)
    count: int
    period: int = 1

    def describe(self) -> str:
        if self.kind == "repeat":
            return f"tool {self.tool} called {self.count} times with the same arguments"
        return (f"the last {self.count} steps repeat a cycle of {self.period} "
                f"(starting with tool {self.tool})")

    def header(self) -> str:
        if self.kind == "repeat":
            return f"repeat; tool={self.tool}; count={self.count}"
        return f"cycle; tool={self.tool}; steps={self.count}; period={self.period}"


class CanonicalCache:
    """Canonical JSON of argument strings already seen. Bounded: strings longer than
    ``max_len`` are not kept, and the whole cache is dropped when it holds ``max_entries``
    (at most ~``max_entries x 2 x max_len`` bytes; 20 MB with the defaults)."""

    def __init__(self, max_entries: int = 10_000, max_len: int = 1024) -> None:
        self._values: dict[str, bytes] = {}
        self._max_entries, self._max_len = max_entries, max_len

    def get(self, arguments: Any, allowance: ParseAllowance) -> bytes:
        if arguments.__class__ is not str:
            return _canonical(arguments, allowance)
        found = self._values.get(arguments)
        if found is None:
            found = _canonical(arguments, allowance)
            # (Not one compared as sent for want of allowance: the cache is every tenant's.)
            if len(arguments) <= self._max_len and not allowance.exhausted:
                if len(self._values) >= self._max_entries:
                    self._values.clear()
                self._values[arguments] = found
        return found


def _canonical(arguments: Any, allowance: ParseAllowance) -> bytes:
    text = arguments if isinstance(arguments, str) else None
    if text is not None:
        try:
            arguments = allowance.loads(text)
        except (orjson.JSONDecodeError, Exhausted):  # not JSON, or more than a request may
            return text.encode("utf-8", "replace")  # have parsed: compared as sent
        if deeper_than(arguments):  # a string the body's bound never looked inside: orjson
            return text.encode("utf-8", "replace")  # reads 1,024 levels, writes 254
    try:
        canonical: bytes = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
        return canonical
    except TypeError:  # an integer too large: compare what was sent
        return text.encode("utf-8", "replace") if text is not None else repr(arguments).encode()


def _name(value: str) -> str:
    if len(value) <= 64 and _SAFE.fullmatch(value):
        return value
    return _UNSAFE.sub("_", value)[:64]


def tool_steps(body: dict[str, Any], cache: CanonicalCache | None = None) -> list[
    tuple[Call, ...]
]:
    """The assistant's tool calls in the history, one tuple per step, in order."""
    allowance = ParseAllowance()  # what this body's argument strings may cost to parse
    cached = (cache or CanonicalCache(0, 0)).get

    def canonical(arguments: Any) -> bytes:
        return cached(arguments, allowance)

    steps: list[tuple[Call, ...]] = []
    for field in ("messages", "input"):
        items = body.get(field)
        if items.__class__ is not list:
            continue
        pending: list[Call] = []  # Responses: consecutive function_call items
        for item in items:
            if item.__class__ is not dict:
                continue
            role = item.get("role")
            if role is None and item.get("type") == "function_call":
                name = item.get("name")
                if name.__class__ is str:
                    pending.append((name, canonical(item.get("arguments"))))
                continue
            if pending:
                steps.append(tuple(pending))
                pending = []
            if role != "assistant":
                continue
            step = _assistant_calls(item, canonical)
            if step:
                steps.append(step)
        if pending:
            steps.append(tuple(pending))
    return steps


def _assistant_calls(message: dict[str, Any],
                     canonical: Callable[[Any], bytes]) -> tuple[Call, ...]:
    """The tool calls of one assistant message: chat ``tool_calls`` or Anthropic
    ``tool_use`` blocks."""
    out: list[Call] = []
    calls = message.get("tool_calls")
    if calls.__class__ is list:
        for call in calls:
            fn = call.get("function") if call.__class__ is dict else None
            if fn.__class__ is dict:
                name = fn.get("name")
                if name.__class__ is str:
                    out.append((name, canonical(fn.get("arguments"))))
        return tuple(out)
    content = message.get("content")
    if content.__class__ is list:
        for block in content:
            if block.__class__ is dict and block.get("type") == "tool_use":
                name = block.get("name")
                if name.__class__ is str:
                    out.append((name, canonical(block.get("input"))))
    return tuple(out)


def find_loop(body: dict[str, Any], max_repeats: int, cycle_steps: int,
              cache: CanonicalCache | None = None) -> LoopFinding | None:
    """A repeat (one call at least ``max_repeats`` times in the history) or a cycle (the last
    ``cycle_steps`` steps are one pattern of 2 .. cycle_steps // 2 steps repeated), else None.
    ``cycle_steps`` 0: no cycle detection."""
    steps = tool_steps(body, cache)
    if not steps:
        return None
    counts: dict[Call, int] = {}
    worst: Call | None = None
    for step in steps:
        # parallel identical calls in one step count once
        for call in step if len(step) == 1 else set(step):
            n = counts[call] = counts.get(call, 0) + 1
            if n >= max_repeats and (worst is None or n > counts[worst]):
                worst = call
    if worst is not None:
        return LoopFinding("repeat", _name(worst[0]), counts[worst])
    if cycle_steps >= 4 and len(steps) >= cycle_steps:
        tail = steps[-cycle_steps:]
        for period in range(2, cycle_steps // 2 + 1):
            if all(tail[i] == tail[i - period] for i in range(period, cycle_steps)) and \
                    len(set(tail[:period])) > 1:
                return LoopFinding("cycle", _name(tail[0][0][0]), cycle_steps, period)
    return None
