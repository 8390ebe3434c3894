"""aiohttp load generator for the benchmarks; runs as its own process.

Modes:

- ``serve``: reads one JSON command per line on stdin, answers one JSON line on stdout:
  ``{"op": "closed", "url", "headers", "body", "concurrency", "duration", "warmup"}``
  (closed loop: ``concurrency`` workers each send the next request when the last answered),
  ``{"op": "open", "url", "headers", "body", "rate", "duration", "warmup"}`` (open loop:
  requests start on a fixed schedule whether or not earlier ones answered), ``{"op": "quit"}``.
- ``streams``: holds ``--count`` streaming requests, started evenly over ``--ramp`` seconds
  from ``--start-at`` (a time.time() value, to line several workers up), counting bytes only;
  prints a progress line every ``--report`` seconds and a summary line at the end.
- ``timed``: a latency sample: ``--count`` streams to each ``--target`` (JSON objects with
  name/url/headers/body), interleaved, timestamping every content chunk; prints one summary.

Every loop is bounded by a count and by ``--deadline`` / the command's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from typing import Any

import aiohttp
from benchlib import percentile, raise_nofile

# --- closed / open loop --------------------------------------------------------------------


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=30),
        skip_auto_headers=("User-Agent",),
    )


def _lat_summary(lat: list[float]) -> dict[str, float]:
    lat.sort()
    return {"p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "max_ms": (lat[-1] * 1e3) if lat else float("nan")}


async def closed_loop(cmd: dict[str, Any]) -> dict[str, Any]:
    url, headers, body = cmd["url"], cmd["headers"], cmd["body"].encode()
    conc, duration, warmup = int(cmd["concurrency"]), float(cmd["duration"]), float(cmd["warmup"])
    perf = time.perf_counter
    t_start = perf() + warmup
    t_end = t_start + duration
    ok = errors = 0
    lat: list[float] = []
    first_error = ""

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, errors, first_error
        while (t0 := perf()) < t_end:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    good = resp.status == 200
                    if not good and not first_error:
                        first_error = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                good = False
                first_error = first_error or repr(exc)
                await asyncio.sleep(0.01)
            t1 = perf()
            if t0 >= t_start and t1 <= t_end:
                if good:
                    ok += 1
                    lat.append(t1 - t0)
                else:
                    errors += 1

    async with _session(conc) as session:
        await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(conc))),
                               timeout=warmup + duration + 35)
    return {"rps": ok / duration, "ok": ok, "errors": errors, "first_error": first_error,
            **_lat_summary(lat)}


async def open_loop(cmd: dict[str, Any]) -> dict[str, Any]:
    url, headers, body = cmd["url"], cmd["headers"], cmd["body"].encode()
    rate, duration, warmup = float(cmd["rate"]), float(cmd["duration"]), float(cmd["warmup"])
    max_inflight = int(cmd.get("max_inflight", 2000))
    perf = time.perf_counter
    lat: list[float] = []
    lags: list[float] = []
    ok = errors = dropped = 0
    first_error = ""
    inflight: set[asyncio.Task[None]] = set()
    total = int((warmup + duration) * rate)
    n_warm = int(warmup * rate)

    async def one(session: aiohttp.ClientSession, measured: bool) -> None:
        nonlocal ok, errors, first_error
        t0 = perf()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                good = resp.status == 200
                if not good and not first_error:
                    first_error = f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            good = False
            first_error = first_error or repr(exc)
        t1 = perf()
        if measured:
            if good:
                ok += 1
                lat.append(t1 - t0)
            else:
                errors += 1

    async with _session(0) as session:
        gc.collect()
        t_base = perf() + 0.05
        for i in range(total):
            due = t_base + i / rate
            delay = due - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = i >= n_warm
            if measured:
                lags.append(perf() - due)
            if len(inflight) >= max_inflight:
                dropped += 1
                continue
            task = asyncio.create_task(one(session, measured))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=35)
        for task in inflight:
            task.cancel()
    lags.sort()
    return {"rps": ok / duration, "ok": ok, "errors": errors, "dropped": dropped,
            "first_error": first_error, "sched_lag_p50_ms": percentile(lags, 50) * 1e3,
            "sched_lag_p99_ms": percentile(lags, 99) * 1e3, **_lat_summary(lat)}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return
        try:
            if cmd["op"] == "closed":
                result = await closed_loop(cmd)
            elif cmd["op"] == "open":
                result = await open_loop(cmd)
            else:
                result = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as exc:  # noqa: BLE001 (report it, keep serving)
            result = {"error": repr(exc)}
        print(json.dumps(result), flush=True)


# --- streams -------------------------------------------------------------------------------


async def streams(args: argparse.Namespace) -> None:
    headers = json.loads(args.headers)
    body = args.body.encode()
    count, ramp = args.count, args.ramp
    started = opened = done = failed = 0
    open_now = peak_open = 0
    total_bytes = 0
    first_error = ""
    loop = asyncio.get_running_loop()
    hard_end = time.time() + args.deadline

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened, done, failed, open_now, peak_open, total_bytes, first_error
        is_open = False
        try:
            async with session.post(args.url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    detail = (await resp.content.read(300)).decode(errors="replace")
                    raise RuntimeError(f"HTTP {resp.status} {detail}")
                opened += 1
                open_now += 1
                is_open = True
                peak_open = max(peak_open, open_now)
                tail = b""
                async for chunk in resp.content.iter_any():
                    total_bytes += len(chunk)
                    tail = (tail + chunk)[-32:]
                if b"[DONE]" not in tail:
                    raise RuntimeError("stream ended without [DONE]")
            done += 1
        except Exception as exc:  # noqa: BLE001 (any failure of a stream is counted)
            failed += 1
            first_error = first_error or repr(exc)[:200]
        finally:
            if is_open:
                open_now -= 1

    async def reporter() -> None:
        while True:
            await asyncio.sleep(args.report)
            print(json.dumps({"t": time.time(), "started": started, "open": open_now,
                              "done": done, "failed": failed}), flush=True)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
        # A bounded process: no cyclic GC, whose full passes over 5,000 open streams would
        # stall this generator for hundreds of ms.
        gc.collect()
        gc.freeze()
        gc.disable()
        rep = asyncio.create_task(reporter())
        tasks = []
        t0 = loop.time() + max(0.0, args.start_at - time.time())
        for i in range(count):
            due = t0 + (ramp * i / count if count else 0)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
            started += 1
        left = hard_end - time.time()
        _done, pending = await asyncio.wait(tasks, timeout=max(1.0, left))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)  # cancelled ones are counted as failed below
            first_error = first_error or f"{len(pending)} streams still open at the deadline"
        rep.cancel()
    print(json.dumps({"summary": True, "started": started, "opened": opened, "done": done,
                      "failed": failed + len(pending), "peak_open": peak_open,
                      "bytes": total_bytes, "first_error": first_error}), flush=True)


# --- timed sample --------------------------------------------------------------------------


async def timed(args: argparse.Namespace) -> None:
    targets = [json.loads(t) for t in args.target]
    gap = args.gap_ms / 1e3
    perf = time.perf_counter
    loop = asyncio.get_running_loop()
    results: dict[str, dict[str, Any]] = {
        t["name"]: {"ttfb": [], "late": [], "inter": [], "ok": 0, "failed": 0, "error": ""}
        for t in targets}

    async def one(session: aiohttp.ClientSession, target: dict[str, Any]) -> None:
        res = results[target["name"]]
        arrivals: list[float] = []
        t_send = perf()
        try:
            async with session.post(target["url"], data=target["body"].encode(),
                                    headers=target["headers"]) as resp:
                t_head = perf()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                buf = b""
                async for chunk in resp.content.iter_any():
                    now = perf()
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for event in events:
                        if b'"content":"tok' in event:
                            arrivals.append(now)
            if len(arrivals) != args.chunks:
                raise RuntimeError(f"{len(arrivals)} content chunks, expected {args.chunks}")
            res["ok"] += 1
            res["ttfb"].append(t_head - t_send)
            for k, t in enumerate(arrivals):
                res["late"].append(t - t_send - k * gap)
                if k:
                    res["inter"].append(t - arrivals[k - 1] - gap)
        except Exception as exc:  # noqa: BLE001 (any failure of a stream is counted)
            res["failed"] += 1
            res["error"] = res["error"] or repr(exc)[:200]

    gc.collect()
    gc.freeze()
    gc.disable()  # bounded process; keeps collector pauses out of the timestamps
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=args.deadline),
        skip_auto_headers=("User-Agent",),
    ) as session:
        tasks = []
        t0 = loop.time() + max(0.0, args.start_at - time.time())
        n = args.count * len(targets)
        for i in range(n):  # interleaved: direct, gateway, direct, gateway, ...
            due = t0 + args.ramp * i / n
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, targets[i % len(targets)])))
        await asyncio.wait(tasks, timeout=args.deadline)
        for task in tasks:
            task.cancel()

    out: dict[str, Any] = {}
    for name, res in results.items():
        summary = {"ok": res["ok"], "failed": res["failed"], "error": res["error"],
                   "chunks": len(res["late"])}
        for key in ("ttfb", "late", "inter"):
            vals = sorted(res[key])
            for q in (50, 90, 99):
                summary[f"{key}_p{q}_ms"] = percentile(vals, q) * 1e3
            summary[f"{key}_max_ms"] = (vals[-1] * 1e3) if vals else float("nan")
        out[name] = summary
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("serve")
    st = sub.add_parser("streams")
    st.add_argument("--url", required=True)
    st.add_argument("--headers", default="{}")
    st.add_argument("--body", required=True)
    st.add_argument("--count", type=int, required=True)
    st.add_argument("--ramp", type=float, default=5.0)
    st.add_argument("--start-at", type=float, default=0.0)
    st.add_argument("--report", type=float, default=0.5)
    st.add_argument("--deadline", type=float, default=120.0, help="seconds from start")
    tm = sub.add_parser("timed")
    tm.add_argument("--target", action="append", required=True)
    tm.add_argument("--count", type=int, required=True, help="streams per target")
    tm.add_argument("--chunks", type=int, required=True)
    tm.add_argument("--gap-ms", type=float, required=True)
    tm.add_argument("--ramp", type=float, default=2.0)
    tm.add_argument("--start-at", type=float, default=0.0)
    tm.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args()
    raise_nofile()
    if args.mode == "serve":
        asyncio.run(serve())
    elif args.mode == "streams":
        asyncio.run(streams(args))
    else:
        asyncio.run(timed(args))


if __name__ == "__main__":
    main()
