"""A lower bound on critical time to first token that no admission policy can beat.

Give critical requests every slot of the upstream and serve nothing else: they still queue for
a slot whenever their own arrivals bunch up. This simulates that best case, an M/D/c queue
(Poisson arrivals, fixed service time, ``c`` slots, first come first served), and prints the
99th percentile of the wait for a slot. When that wait alone exceeds what a TTFT target leaves
above the unloaded first token, the target cannot be met by admission, only by more slots.

The defaults are the 4-slot overload benchmark at 3x (bench/overload.py --slots 4): 5.4
critical requests a second measured, calls of 0.28 s (100 ms first token + 9 gaps of 20 ms),
and a target of 181 ms against an unloaded p99 of 105 ms, which leaves 76 ms of wait.

    python bench/critical_bound.py [--rate 5.4] [--service-s 0.28] [--slots 4]
"""

from __future__ import annotations

import argparse
import heapq
import random


def wait_p99(rate: float, service_s: float, slots: int, arrivals: int,
             seed: int, quantile: float = 0.99) -> tuple[float, float]:
    """(the ``quantile`` of the wait for a slot, p99 by default; share of arrivals that wait at
    all) of an M/D/c queue."""
    rng = random.Random(seed)
    now = 0.0
    free_at = [0.0] * slots  # heap: when each slot frees
    waits: list[float] = []
    for _ in range(arrivals):
        now += rng.expovariate(rate)
        start = max(now, heapq.heappop(free_at))
        waits.append(start - now)
        heapq.heappush(free_at, start + service_s)
    waits.sort()
    return waits[int(quantile * len(waits))], sum(w > 0 for w in waits) / len(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5.4, help="critical requests a second")
    parser.add_argument("--service-s", type=float, default=0.28, help="seconds a call holds a slot")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--allowed-ms", type=float, default=76.0,
                        help="wait the TTFT target leaves above the unloaded first token")
    parser.add_argument("--arrivals", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    p99, waiting = wait_p99(args.rate, args.service_s, args.slots, args.arrivals, args.seed)
    load = args.rate * args.service_s
    print(f"critical alone on all {args.slots} slots: offered {load:.2f} slots of work, "
          f"{waiting:.1%} of requests wait for a slot, p99 wait {p99 * 1000:.0f} ms "
          f"(the target leaves {args.allowed_ms:.0f} ms): "
          f"{'feasible' if p99 * 1000 <= args.allowed_ms else 'infeasible for any admission policy'}")


if __name__ == "__main__":
    main()
