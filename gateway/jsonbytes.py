"""JSON for bytes the gateway keeps beyond the moment it made them, and how deep a body it
reads may nest so that it can be written again.

orjson 3.12 and later returns a ``bytes`` whose allocation is the buffer it grew while
encoding, at least 4 KiB and a power of two past that: a 70-byte error body holds 4 KiB, a
4.3 KB chat request 64 KiB (``sys.getsizeof`` shows the length, tracemalloc the allocation).
Written at once (a response, a log line) that is a short peak. Kept while a call runs (the
upstream request body: seconds, minutes for a stream) or stored (deferred entries in process
memory), it multiplies the memory each request holds and fragments the heap. A copy is
right-sized and costs ~0.7 us for 4 KB, paid only where bytes are kept.
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps_kept(obj: Any) -> bytes:
    """``orjson.dumps(obj)`` in an allocation of its own length, for bytes that are kept."""
    return bytes(memoryview(orjson.dumps(obj)))


# orjson reads JSON nested up to 1024 levels but writes at most 254 (TypeError "Recursion
# limit reached" past that, 3.13). The gateway writes every body it reads again: to the
# upstream (with the model replaced), translated (a few levels deeper), stored as a deferred
# entry, fingerprinted for a run. A body nested 300 deep read fine and failed on its way
# out, a 500 after admission. What clients send nests a dozen levels at most (tool schemas
# the deepest); what nests deeper is refused with a 400 when it is read.
MAX_DEPTH = 64
WRITE_DEPTH = 254  # the deepest orjson writes


def deeper_than(value: Any, depth: int = MAX_DEPTH) -> bool:
    """Whether lists and objects in ``value`` nest more than ``depth`` levels (``value``
    itself, if one, is the first). Iterative: Python's own recursion limit is 1000."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if item.__class__ is dict:
            children: Any = item.values()
        elif item.__class__ is list:
            children = item
        else:
            continue
        if level > depth:
            return True
        for child in children:
            if child.__class__ is dict or child.__class__ is list:
                stack.append((child, level + 1))
    return False


def json_values(raw: bytes, enough: int) -> int:
    """How many values a JSON text holds, weighed by what each costs to parse (a list or
    object as ``CONTAINER`` values, a key ``KEY`` more): no more than ``enough`` (exactly, or 0
    for a text too short to hold more) when it holds no more, else a count above it.
    Counted in C without parsing, so that a body can be refused before orjson builds millions
    of objects from it: 10 MB of ``[],`` is 3.4 million lists, nearly a second to parse and
    seconds more to walk, on the event loop every tenant shares.

    The count is of commas, colons and opening brackets outside strings (each value but a
    container's first follows a comma, each key a colon; each list and object opens with a
    bracket). Punctuation inside strings (prose, code, JSON pasted as text) is not counted:
    escaped backslashes and quotes are dropped, then every other piece between quotes is
    outside a string. The split costs ~0.1 us a piece, so it is made only when the plain count
    is over ``enough``, and not when the strings alone are (each string is a value)."""
    if len(raw) * _MOST_PER_BYTE <= enough:
        return 0  # (no JSON text this short can hold more: an ordinary body is not counted)
    return _counted(raw, enough)


def _counted(raw: bytes, enough: int) -> int:
    """``json_values``, counted whatever the text's length."""
    plain = _weigh(raw)
    if plain <= enough:
        return plain
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = unescaped.count(b'"') // 2
    if strings > enough:
        return strings
    return _weigh(b"".join(unescaped.split(b'"')[::2]))


def _weigh(text: bytes) -> int:
    # Weighed by what each costs to parse and walk, a number or string being 1 (~0.18 us): a
    # list or object ~6, an object's key ~3 more than its value (a new string, hashed:
    # 416,666 distinct keys took 155 ms). A body at the default bound costs <= ~90 ms.
    return text.count(b",") + KEY * text.count(b":") + CONTAINER * (text.count(b"[")
                                                                    + text.count(b"{"))


# What a request's strings may hold together, parsed (~15-60 ms), for each reader of them:
# the loop detector and translation have an allowance each.
PARSED_VALUES = 100_000


class ParseAllowance:
    """JSON values a request may still have parsed out of its strings: a tool call's
    ``arguments`` is JSON inside a string, which the body's own count (``json_values``) does
    not look into. The loop detector and translation parse them: one 3.9 MB arguments string
    of empty lists took a second of the event loop, past the body's bound."""

    def __init__(self, values: int = PARSED_VALUES) -> None:
        self.left = values
        self.exhausted = False  # a string was refused: what was not parsed must not be kept

    def loads(self, text: str) -> Any:
        """``orjson.loads(text)``; ``Exhausted`` (nothing parsed) when it holds more values
        than are left; ``orjson.JSONDecodeError`` as orjson raises it."""
        raw = text.encode("utf-8", "surrogatepass")
        values = _counted(raw, self.left)  # (each string counts, however short)
        if values > self.left:
            self.exhausted = True
            raise Exhausted(values)
        self.left -= values
        return orjson.loads(raw)


class Exhausted(Exception):
    """A string held more JSON values than a ``ParseAllowance`` had left."""


CONTAINER = 6  # a list or object costs about six numbers or strings to build and walk
KEY = 3  # and an object's key about three more than the value it names
# The most a byte of JSON text weighs: ``[]`` is two bytes and a container (a key needs
# ``"":`` and a value, a value a byte and a comma).
_MOST_PER_BYTE = CONTAINER // 2
