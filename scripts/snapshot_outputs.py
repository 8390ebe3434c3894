#!/usr/bin/env python3
"""Record what a refactoring must not change: `gateway schema` and a /metrics scrape.

Run with the venv's python from the root of each tree (two worktrees, before and after) and
diff:

    .venv/bin/python scripts/snapshot_outputs.py /tmp/before.txt      # on the old commit
    .venv/bin/python scripts/snapshot_outputs.py /tmp/after.txt       # on the new one
    diff /tmp/before.txt /tmp/after.txt && echo identical

Layout-independent: it drives only the CLI (`python -m gateway.cli`, which the move keeps) and
HTTP, so the same script runs on both trees. The scrape is of a gateway started from a fixed
policy in front of the mock upstream, after a fixed set of requests (an answer, a stream, a
401, a 404, an Anthropic call), so request, token, attempt and error series exist. Sample
values that depend on timing or the machine (durations, sizes, process_*, loop lag, uptime) are
replaced by "<v>"; every metric name, label set, HELP and TYPE line is kept byte for byte, and
counters of requests and tokens keep their values.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY = "sk-snapshot"
POLICY = """\
providers:
  main:
    kind: openai
    base_url: http://127.0.0.1:{mock}/v1
  claude:
    kind: anthropic
    base_url: http://127.0.0.1:{mock}
models:
  gpt-test:
    deployments: [{{provider: main, model: upstream-gpt}}]
    price: {{input_per_million: 1.0, output_per_million: 2.0}}
  claude-test:
    deployments: [{{provider: claude, model: upstream-claude}}]
tenants:
  acme:
    api_keys: ["{key_hash}"]
    models: ["*"]
"""
# exact values kept: these count what the fixed requests did
KEEP_VALUES = re.compile(r"^gateway_(requests_total|tokens_total|attempts_total|"
                         r"dialect_requests_total|upstream_responses_total)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {deadline_s} s")


def call(url: str, body: dict[str, object] | None, headers: dict[str, str]) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json",
                                                          **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def normalise(scrape: str) -> str:
    out = []
    for line in scrape.splitlines():
        if line.startswith("#") or not line.strip():
            out.append(line)
            continue
        name_labels, _, _value = line.rpartition(" ")
        if KEEP_VALUES.match(line):
            out.append(line)
        else:
            out.append(f"{name_labels} <v>")
    return "\n".join(out) + "\n"


def main() -> None:
    out_path = Path(sys.argv[1])
    py = sys.executable
    schema = subprocess.run([py, "-m", "gateway.cli", "schema"], check=True,
                            capture_output=True, text=True).stdout
    mock_port, gw_port = free_port(), free_port()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY.format(mock=mock_port, key_hash="sha256:" + hashlib.sha256(
            KEY.encode()).hexdigest()))
        procs = [subprocess.Popen([py, "-m", "gateway.cli", "mock-upstream", "--port",
                                   str(mock_port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=env)]
        try:
            wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
            procs.append(subprocess.Popen([py, "-m", "gateway.cli", "serve", "--config",
                                           str(policy), "--port", str(gw_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=env))
            base = f"http://127.0.0.1:{gw_port}"
            wait_http(f"{base}/healthz")
            auth = {"authorization": f"Bearer {KEY}"}
            chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 16}
            statuses = [
                call(f"{base}/v1/chat/completions", chat, auth),
                call(f"{base}/v1/chat/completions", {**chat, "stream": True}, auth),
                call(f"{base}/v1/chat/completions", chat, {"authorization": "Bearer nope"}),
                call(f"{base}/v1/chat/completions", {**chat, "model": "no-such"}, auth),
                call(f"{base}/v1/messages", {"model": "claude-test", "max_tokens": 16,
                                             "messages": [{"role": "user", "content": "hi"}]},
                     {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
            ]
            time.sleep(0.5)  # settlement runs in the background
            scrape = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    out_path.write_text("# statuses " + " ".join(map(str, statuses)) + "\n"
                        + "# --- gateway schema ---\n" + schema
                        + "# --- /metrics (values of timing series: <v>) ---\n"
                        + normalise(scrape))
    print(f"wrote {out_path}: statuses {statuses}, schema {len(schema)} bytes, "
          f"{scrape.count(chr(10))} metric lines")


if __name__ == "__main__":
    main()
