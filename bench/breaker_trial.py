"""CPU per breaker verdict on the common path: a closed deployment, a successful attempt.

Times ``BreakerBoard.begin`` + ``Trial.success`` (every verdict is replayed through
pybreaker's ``call()``), median of 5 rounds of 100,000, in-process (no I/O). The gateway
imported is whichever ``gateway`` package Python finds first, so a baseline from another
commit runs the same script:

    .venv/bin/python bench/breaker_trial.py
    rm -rf /tmp/gw-base && mkdir /tmp/gw-base && git archive main gateway | tar -x -C /tmp/gw-base
    PYTHONPATH=/tmp/gw-base .venv/bin/python bench/breaker_trial.py
"""

from __future__ import annotations

import asyncio
import datetime
import random
import statistics
import subprocess
import sys
import time

import gateway
from gateway.breaker.board import BreakerBoard
from gateway.config.breaker import BreakerPolicy
from gateway.state import MemoryBackend

ROUNDS, N = 5, 100_000


async def one_round() -> tuple[float, float]:
    board = BreakerBoard(BreakerPolicy(), MemoryBackend(), deployments=["p/m"],
                         rng=random.Random(1))
    t0 = time.perf_counter()
    trials = [await board.begin("p/m") for _ in range(N)]
    t1 = time.perf_counter()
    for trial in trials:
        assert trial is not None
        trial.success(0.1)
    t2 = time.perf_counter()
    return (t1 - t0) / N * 1e6, (t2 - t1) / N * 1e6


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"gateway from {gateway.__file__}, command: {' '.join(sys.argv)}")
    rounds = [asyncio.run(one_round()) for _ in range(ROUNDS)]
    print(f"begin: {statistics.median(r[0] for r in rounds):.2f} us, "
          f"Trial.success: {statistics.median(r[1] for r in rounds):.2f} us "
          f"(median of {ROUNDS} rounds of {N:,})")


if __name__ == "__main__":
    main()
