"""Cost of the prompt estimate on a typical 4 KB chat body, against ``orjson.loads`` of the
same body (the parse every request pays anyway) measured in the same run.

    .venv/bin/python bench/prompt_estimate.py
"""

from __future__ import annotations

import timeit

import orjson

from gateway.request.classifier import estimate_prompt_tokens


def main() -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 10}]
    for i in range(10):
        messages.append({"role": "user",
                         "content": f"Question {i}: " + "please explain this in detail " * 5})
        messages.append({"role": "assistant",
                         "content": "Sure, here is the explanation: " + "lorem ipsum dolor " * 6})
    body = {"model": "gpt-4o", "messages": messages, "temperature": 0.2, "max_tokens": 256}
    raw = orjson.dumps(body)
    n = 20_000
    estimate = min(timeit.repeat(lambda: estimate_prompt_tokens(body), number=n, repeat=5)) / n
    parse = min(timeit.repeat(lambda: orjson.loads(raw), number=n, repeat=5)) / n
    print(f"body {len(raw)} bytes, estimate {estimate_prompt_tokens(body)} tokens")
    print(f"estimate_prompt_tokens {estimate * 1e6:.2f} us, orjson.loads {parse * 1e6:.2f} us, "
          f"ratio {estimate / parse:.2f}")


if __name__ == "__main__":
    main()
