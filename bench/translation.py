"""Translation cost in-process, next to the work a same-dialect relay does anyway.

Per request: the OpenAI chat body of bench/overhead.py translated to the Messages API, and the
mock's Anthropic answer translated back (what bench/overhead.py (d) adds end to end). Per stream
event: each direction's translator on the corpus transcripts (tests/data/translation/),
against ``SseRelay.feed`` on the same events (the accounting every stream pays). Figures are
medians of ``--rounds`` timings of ``--n`` iterations, in microseconds of CPU
(``time.process_time``).

    .venv/bin/python bench/translation.py [--n 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from gateway import translate
from gateway.upstream.sse import SseRelay

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are a concise assistant."},
                     {"role": "user", "content": "Reply with five words."}],
        "max_tokens": 16}
ANSWER = orjson.dumps({
    "id": "msg_mock1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "tok tok tok tok tok "}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5}})


def _us(fn: Callable[[], object], n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    def whole() -> object:
        plan = translate.plan("openai", "anthropic", dict(BODY), default_max_tokens=1024,
                              include_usage=False)
        return plan.answer(ANSWER)

    def account() -> object:  # what the same-dialect relay parses of a whole answer anyway
        return orjson.loads(ANSWER)

    print(f"translation cost, {args.rounds} rounds x {args.n} iterations, CPU microseconds")
    print(f"  whole request (body out + answer back): {_us(whole, args.n, args.rounds):7.2f} us"
          f"   (parsing the answer once, which every relay does: "
          f"{_us(account, args.n, args.rounds):.2f} us)")
    for name in ("openai_client_tools", "anthropic_client_tools"):
        case = json.loads((ROOT / "tests/data/translation" / f"{name}.json").read_text())
        events = [e.encode() + b"\n\n" for e in case["stream"]]
        plan = translate.plan(case["client"], case["upstream"], case["request"],
                              default_max_tokens=1024, include_usage=True)

        def translated() -> None:
            relay = SseRelay(case["upstream"], strip_usage_chunk=False)
            stream = plan.stream()
            for event in events:
                stream.feed(relay.feed(event))

        def relayed() -> None:
            relay = SseRelay(case["upstream"], strip_usage_chunk=False)
            for event in events:
                relay.feed(event)

        n = max(1, args.n // len(events))
        t = _us(translated, n, args.rounds) / len(events)
        r = _us(relayed, n, args.rounds) / len(events)
        print(f"  stream {case['upstream']:>9} -> {case['client']:<9} per event: relay "
              f"{r:5.2f} us, relay + translation {t:5.2f} us (+{t - r:.2f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
