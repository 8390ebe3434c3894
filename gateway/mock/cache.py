"""The mock upstream's prompt cache: which prompt prefixes it has seen, so usage can report
cache reads and writes the way the providers do.

A prompt is a list of units: the request's preamble (``tools``, ``system``,
``instructions``) and then each message / input item. A request whose first k units equal
the first k units of an earlier request to the same model "reads" those units from cache:

- OpenAI (automatic caching): ``cached_tokens`` = the tokens of the longest seen prefix;
- Anthropic (opt-in): only when the request marks a ``cache_control`` breakpoint; reads are
  counted as above up to the last breakpoint, and the rest of that marked prefix is written
  (``ttl: "1h"`` anywhere in the request makes it a 1-hour write, otherwise 5-minute).

``x-mock-cached-share: s`` replaces the prefix arithmetic on a repeat: ``floor(s * prompt)``
tokens are read (none on the first request of a prefix). Tokens are the mock's estimate,
UTF-8 bytes / 4 (``estimate_prompt_tokens``), so the counts are deterministic.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

MAX_PREFIXES = 20_000  # bounded: the oldest prefixes are forgotten first


@dataclass(frozen=True, slots=True)
class CacheUse:
    read: int = 0
    write: int = 0
    write_1h: bool = False


class PromptCache:
    def __init__(self, max_prefixes: int = MAX_PREFIXES) -> None:
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._max = max_prefixes

    def use(self, body: dict[str, Any], prompt_tokens: int, anthropic: bool,
            share: float | None, text_bytes: Any) -> CacheUse:
        """How much of this request's prompt is read from / written to cache; remembers its
        prefixes for the requests that follow."""
        units = _units(body)
        marked = [b'"cache_control"' in orjson.dumps(u) for u in units] if anthropic else []
        if anthropic and not any(marked):
            return CacheUse()  # Anthropic caches only what the request marks
        digest = hashlib.blake2b(str(body.get("model")).encode(), digest_size=16)
        seen_units = 0
        cum_bytes = [0]
        keys = []
        for unit in units:
            digest.update(orjson.dumps(unit, option=orjson.OPT_SORT_KEYS))
            key = digest.copy().digest()
            keys.append(key)
            if key in self._seen and seen_units == len(keys) - 1:
                seen_units = len(keys)
            cum_bytes.append(cum_bytes[-1] + text_bytes(unit))
        for key in keys:
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        if share is not None:
            read = int(share * prompt_tokens) if seen_units else 0
        else:
            read = min(prompt_tokens, cum_bytes[seen_units] // 4)
        if not anthropic:
            return CacheUse(read)
        # Anthropic reads and writes only up to the last breakpoint; the rest is plain input.
        last_mark = max(i + 1 for i, m in enumerate(marked) if m)
        marked_tokens = min(prompt_tokens, cum_bytes[last_mark] // 4)
        read = min(read, marked_tokens)
        write = marked_tokens - read
        return CacheUse(read, write, b'"ttl":"1h"' in orjson.dumps(body))


def _units(body: dict[str, Any]) -> list[Any]:
    preamble = [body.get(k) for k in ("tools", "system", "instructions") if body.get(k)]
    units: list[Any] = [preamble] if preamble else []
    for field in ("messages", "input", "prompt"):
        value = body.get(field)
        if isinstance(value, list):
            units.extend(value)
        elif value is not None:
            units.append(value)
    return units
