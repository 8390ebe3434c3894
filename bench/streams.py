"""Many slow concurrent streams through one gateway process: memory and per-chunk latency.

Starts the mock upstream and one gateway (memory backend, bench/configs/streams.yaml: no
limits, x-mock-* forwarded) as separate processes; with 2+ CPUs the gateway is pinned to the
first CPU, the mock and the load generators to the second.

1. Bulk: ``--streams`` streams (default 10,000) through the gateway, started evenly over
   ``--ramp`` s by ``--workers`` load-generator processes that only count bytes; each stream
   is ``--chunks`` chunks ``--gap-ms`` apart (x-mock-chunks / x-mock-chunk-gap-ms). 100 of the
   N are a timed sample, started once every other stream is open, next to 100 streams direct
   to the mock: the per-chunk latency at full load.
2. Latency at light load, once the bulk streams are over and the gateway's idle upstream
   connections have closed: ``--sample`` streams direct to the mock and as many through the
   gateway, interleaved, all open at once; every content chunk is timestamped.

The gateway's RSS (/proc/PID/status VmRSS) is printed at idle, at full load and at its peak
(sampled every 0.25 s, and the kernel's VmHWM). Target: 10,000 streams within 1 GiB RSS.
"Lateness" of content chunk k = arrival - request sent - k * gap; the gateway's added latency
is its lateness minus direct's at the same percentile.

The gateway holds 2 sockets per stream, so N is capped to what its RLIMIT_NOFILE allows (the
script raises the limit as far as it may, in itself and in every child); a cap is reported.
A default run takes about 2 minutes.

    .venv/bin/python bench/streams.py [--streams 10000] [--chunks 40] [--gap-ms 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

TARGET_RSS_KIB = 1024 * 1024  # 1 GiB
UNDER_LOAD_SAMPLE = 100
UNDER_LOAD_MAX_CHUNKS = 10
LIGHT_MAX_CHUNKS = 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000, help="concurrent streams")
    parser.add_argument("--chunks", type=int, default=40, help="content chunks per stream")
    parser.add_argument("--gap-ms", type=float, default=1000.0, help="gap between chunks")
    parser.add_argument("--ramp", type=float, default=15.0, help="seconds to open all streams")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--sample", type=int, default=200,
                        help="streams per target (direct, gateway) in the light-load sample")
    parser.add_argument("--gateway-ref", metavar="REF",
                        help="measure this commit (git archive of gateway/) instead of the "
                        "working tree, e.g. HEAD")
    parser.add_argument("--tuned-gateway", action="store_true",
                        help="experiment: start the gateway through bench/tuned_gateway.py "
                        "(listen backlog and GC thresholds changed, code untouched)")
    parser.add_argument("--tuned-backlog", type=int, default=4096)
    parser.add_argument("--tuned-gc-threshold", default="50000,50,1000", metavar="G0,G1,G2")
    args = parser.parse_args()
    if min(args.streams, args.chunks, args.workers, args.sample) < 1 or args.gap_ms < 0:
        parser.error("streams, chunks, workers and sample must be >= 1, gap-ms >= 0")

    bl.exit_on_sigterm()
    nofile = bl.raise_nofile()
    server_pin, support_pin, pin_desc = bl.pin_plan()
    procs = bl.Procs()
    tmp = tempfile.TemporaryDirectory(prefix="bench-streams-")
    tmpdir = Path(tmp.name)
    t_begin = time.monotonic()
    try:
        source = bl.GatewaySource(args.gateway_ref, tmpdir)
        header = bl.run_header(sys.argv, source)
        mock_port, gw_port = bl.free_port(), bl.free_port()
        config = bl.gateway_config(bl.BENCH / "configs" / "streams.yaml", tmpdir, mock_port)
        gw_log = tmpdir / "gateway.log"
        mock = procs.start("mock", [*support_pin, bl.PYTHON, str(bl.BENCH / "mockserver.py"),
                                    "--host", "127.0.0.1", "--port", str(mock_port)],
                           stderr=open(tmpdir / "mock.log", "wb"),  # noqa: SIM115
                           cwd=source.cwd, env=source.env)
        launcher = ["-m", "gateway.cli"]
        if args.tuned_gateway:
            launcher = [str(bl.BENCH / "tuned_gateway.py"), "--backlog", str(args.tuned_backlog),
                        "--gc-threshold", args.tuned_gc_threshold, "--"]
        gateway = procs.start("gateway", [
            *server_pin, bl.PYTHON, *launcher, "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(gw_port)],
            stderr=open(gw_log, "wb"), cwd=source.cwd, env=source.env)  # noqa: SIM115
        bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
        bl.wait_http(f"http://127.0.0.1:{gw_port}/healthz", procs=procs)
        urls: dict[str, Any] = {
            "gateway": f"http://127.0.0.1:{gw_port}/v1/chat/completions",
            "direct": f"http://127.0.0.1:{mock_port}/v1/chat/completions",
            "gw_port": gw_port, "mock_port": mock_port}

        print("\n".join([
            "LLM gateway concurrent-streams benchmark", *header,
            f"pinning:  {pin_desc}",
            "gateway:  " + (
                f"TUNED (--tuned-gateway): listen backlog {args.tuned_backlog}, gc.freeze() + "
                f"gc.set_threshold({args.tuned_gc_threshold}); code as shipped"
                if args.tuned_gateway else "`gateway serve` as shipped"),
            ("mock:     the gateway.mock.upstream app via bench/mockserver.py (listen backlog "
             "4096, cyclic GC off), so that the mock is not the limit"),
            (f"streams:  {args.streams} through the gateway, {args.chunks} chunks "
             f"{args.gap_ms:g} ms apart (~{args.chunks * args.gap_ms / 1000:.0f} s each), opened "
             f"over {args.ramp:g} s by {args.workers} load-generator processes; RLIMIT_NOFILE "
             f"{nofile}"), ""]),
            flush=True)

        _smoke(urls["gateway"], gw_log)
        time.sleep(1.0)
        rss_idle = bl.proc_status_kib(gateway.pid, "VmRSS")
        fds_idle = bl.proc_fds(gateway.pid)
        # 2 sockets a stream (client + upstream); keep some slack for everything else.
        fd_limit = bl.proc_nofile(gateway.pid)
        n_streams = min(args.streams, (fd_limit - fds_idle - 64) // 2)
        if n_streams < args.streams:
            print(f"NOTE: the gateway may open {fd_limit} files (its RLIMIT_NOFILE; the hard limit "
                  f"cannot be raised here) and needs 2 per stream: running {n_streams} streams, "
                  f"not {args.streams}; memory is also extrapolated to {args.streams}.\n",
                  flush=True)

        print(f"[1] {n_streams} streams through the gateway", flush=True)
        bulk = _bulk(procs, support_pin, args, n_streams, urls, gateway.pid, mock.pid)
        hwm = bl.proc_status_kib(gateway.pid, "VmHWM")
        rss_after = bl.proc_status_kib(gateway.pid, "VmRSS")

        # Let the gateway's idle upstream connections (aiohttp keeps them 15 s) close first:
        # the mock handling thousands of disconnects at once would stall the sample.
        deadline = time.monotonic() + 25
        while bl.proc_fds(gateway.pid) > fds_idle + 32 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)
        rss_drained = bl.proc_status_kib(gateway.pid, "VmRSS")

        light_chunks = min(args.chunks, LIGHT_MAX_CHUNKS)
        print(f"[2] latency sample at light load: {args.sample} streams direct + {args.sample} "
              f"through the gateway, {light_chunks} chunks", flush=True)
        light = _timed_sample(procs, support_pin, urls, args.sample, light_chunks, args.gap_ms,
                              ramp=2.0)
        light["chunks_per_stream"] = light_chunks

        problems = _log_problems(gw_log)
        print()
        print(_report(args, n_streams, rss_idle, rss_after, rss_drained, hwm, bulk, light,
                      problems))
        print(f"\n(total run time {time.monotonic() - t_begin:.0f} s; at the end: "
              f"{bl.cpu_pressure()})")
        ok = bulk["failed"] == 0 and bulk["peak_open"] >= bulk["n_bulk"]
        return 0 if ok else 1
    finally:
        procs.stop_all()
        tmp.cleanup()


def _smoke(url: str, log: Path) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, text = bl.post(url, body, {
        "Authorization": f"Bearer {bl.DEMO_KEY}", "Content-Type": "application/json",
        "x-mock-chunks": "3"})
    if status != 200 or b"[DONE]" not in text:
        raise RuntimeError(f"a test stream through the gateway failed: HTTP {status} "
                           f"{text[:300]!r}\ngateway log tail:\n{bl.log_tail(log)}")


def _stream_target(name: str, url: str, model: str, chunks: int, gap_ms: float) -> dict[str, Any]:
    return {
        "name": name, "url": url,
        "headers": {"Authorization": f"Bearer {bl.DEMO_KEY}", "Content-Type": "application/json",
                    "x-mock-chunks": str(chunks), "x-mock-chunk-gap-ms": f"{gap_ms:g}"},
        "body": json.dumps({"model": model, "stream": True,
                            "messages": [{"role": "user", "content": "Count to forty."}]}),
    }


def _start_sampler(procs: bl.Procs, pin: list[str], urls: dict[str, Any], count: int,
                   chunks: int, gap_ms: float, ramp: float) -> tuple[subprocess.Popen[Any], float]:
    """A ``loadgen.py timed`` process; returns it and the time by which it must answer."""
    start_at = time.time() + 0.7  # leave the process time to start
    span = 0.7 + ramp + chunks * gap_ms / 1000
    argv = [*pin, bl.PYTHON, str(bl.BENCH / "loadgen.py"), "timed", "--count", str(count),
            "--chunks", str(chunks), "--gap-ms", f"{gap_ms:g}", "--ramp", f"{ramp:g}",
            "--start-at", f"{start_at:.3f}", "--deadline", f"{span + 30:.0f}"]
    # The sample goes through its own provider (and connection pool) in streams.yaml.
    for name in ("direct", "gateway"):
        target = _stream_target(name, urls[name], "gpt-4o-mini-sample", chunks, gap_ms)
        argv += ["--target", json.dumps(target)]
    proc = procs.start("sampler", argv, stdout=subprocess.PIPE, text=True)
    return proc, time.monotonic() + span + 45


def _timed_sample(procs: bl.Procs, pin: list[str], urls: dict[str, Any], count: int,
                  chunks: int, gap_ms: float, ramp: float) -> dict[str, Any]:
    proc, answer_by = _start_sampler(procs, pin, urls, count, chunks, gap_ms, ramp)
    assert proc.stdout is not None
    line = bl.readline_timeout(proc.stdout, proc, answer_by - time.monotonic())
    return dict(json.loads(line))


class _Lines:
    """Non-blocking line reader over a child's stdout pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = b""
        self.eof = False

    def read(self) -> list[str]:
        while not self.eof:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
                break
            self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode() for line in lines if line.strip()]


def _bulk(procs: bl.Procs, pin: list[str], args: argparse.Namespace, n_streams: int,
          urls: dict[str, Any], gw_pid: int, mock_pid: int) -> dict[str, Any]:
    target = _stream_target("bulk", urls["gateway"], "gpt-4o-mini", args.chunks, args.gap_ms)
    stream_s = args.chunks * args.gap_ms / 1000.0
    start_at = time.time() + 1.0
    deadline_s = 1.0 + args.ramp + stream_s + 60
    n_timed = min(UNDER_LOAD_SAMPLE, n_streams // 10)  # part of the N gateway streams
    n_bulk = n_streams - n_timed
    per = [n_bulk // args.workers + (1 if i < n_bulk % args.workers else 0)
           for i in range(args.workers)]
    workers = []
    for i, n in enumerate(per):
        proc = procs.start(f"loadgen-{i}", [
            *pin, bl.PYTHON, str(bl.BENCH / "loadgen.py"), "streams", "--url", urls["gateway"],
            "--headers", json.dumps(target["headers"]), "--body", target["body"],
            "--count", str(n), "--ramp", f"{args.ramp:g}", "--start-at", f"{start_at:.3f}",
            "--report", "0.25", "--deadline", f"{deadline_s:.0f}"],
            stdout=subprocess.PIPE)
        assert proc.stdout is not None
        workers.append((proc, _Lines(proc.stdout.fileno())))
    worker_pids = [p.pid for p, _ in workers]
    sample_chunks = min(args.chunks, UNDER_LOAD_MAX_CHUNKS)

    latest: list[dict[str, Any]] = [{} for _ in workers]
    summaries: list[dict[str, Any] | None] = [None for _ in workers]
    sampler: subprocess.Popen[Any] | None = None
    sampler_lines: _Lines | None = None
    sampler_answer_by = 0.0
    under_load: dict[str, Any] | None = None
    t_full: float | None = None  # when every bulk stream was open
    samples: list[tuple[float, int, int, int]] = []  # (t, open, rss KiB, fds)
    accept_q = {urls["gw_port"]: [0, 0], urls["mock_port"]: [0, 0]}  # deepest seen, backlog
    overflow0 = bl.tcp_ext_counters("ListenOverflows", "ListenDrops")

    def cpu() -> tuple[float, ...]:
        return (time.monotonic(), bl.proc_cpu_seconds(gw_pid), bl.proc_cpu_seconds(mock_pid),
                sum(bl.proc_cpu_seconds(p) for p in worker_pids), bl.proc_wait_seconds(gw_pid))

    cpu_marks = {"start": cpu()}
    hard_end = time.monotonic() + deadline_s + 15
    next_print = time.monotonic()
    while True:
        if time.monotonic() > hard_end:
            raise RuntimeError("the bulk phase did not finish in time")
        for i, (proc, lines) in enumerate(workers):
            for line in lines.read():
                msg = json.loads(line)
                if msg.get("summary"):
                    summaries[i] = msg
                else:
                    latest[i] = msg
            if proc.poll() is not None and summaries[i] is None and lines.eof:
                raise RuntimeError(f"load generator {proc.pid} exited with {proc.returncode}")
        open_now = sum(m.get("open", 0) for m in latest)
        rss = bl.proc_status_kib(gw_pid, "VmRSS")
        fds = bl.proc_fds(gw_pid)
        now = time.time()
        samples.append((now, open_now, rss, fds))
        for port, (depth, backlog) in bl.listen_queues(list(accept_q)).items():
            accept_q[port] = [max(accept_q[port][0], depth), backlog]
        # The under-load sample starts once every bulk stream is open (or 20 s after the ramp).
        if sampler is None and (open_now >= n_bulk or now > start_at + args.ramp + 20):
            t_full = now if open_now >= n_bulk else None
            cpu_marks["full"] = cpu()
            sampler, sampler_answer_by = _start_sampler(procs, pin, urls, n_timed, sample_chunks,
                                                        args.gap_ms, ramp=0.5)
            assert sampler.stdout is not None
            sampler_lines = _Lines(sampler.stdout.fileno())
        if sampler_lines is not None and under_load is None:
            for line in sampler_lines.read():
                under_load = json.loads(line)
                cpu_marks["sampled"] = cpu()
            if under_load is None and time.monotonic() > sampler_answer_by:
                raise RuntimeError("the under-load latency sample did not answer in time")
        if time.monotonic() >= next_print:
            done = sum(m.get("done", 0) for m in latest)
            failed = sum(m.get("failed", 0) for m in latest)
            print(f"  t={now - start_at:5.1f}s open {open_now:6d}  done {done:6d}  "
                  f"failed {failed:4d}  gateway RSS {rss / 1024:7.1f} MiB  fds {fds}", flush=True)
            next_print += 2.0
        if all(s is not None for s in summaries) and under_load is not None:
            break
        time.sleep(0.25)
    overflow1 = bl.tcp_ext_counters("ListenOverflows", "ListenDrops")

    def pct(a: str, b: str) -> tuple[float, ...] | None:
        if a not in cpu_marks or b not in cpu_marks:
            return None
        (t0, *c0), (t1, *c1) = cpu_marks[a], cpu_marks[b]
        return tuple((y - x) / (t1 - t0) for x, y in zip(c0, c1, strict=True))

    peak_open = max(o for _, o, _, _ in samples)
    full = [s for s in samples if s[1] >= 0.99 * peak_open] or samples
    done_s = [s for s in summaries if s is not None]
    return {
        "n_bulk": n_bulk,
        "n_timed": n_timed,
        "started": sum(s["started"] for s in done_s),
        "done": sum(s["done"] for s in done_s),
        "failed": sum(s["failed"] for s in done_s),
        "first_error": next((s["first_error"] for s in done_s if s["first_error"]), ""),
        "peak_open": peak_open,
        "t_full": None if t_full is None else t_full - start_at,
        "full_secs": full[-1][0] - full[0][0],
        "rss_full_median": bl.median([s[2] for s in full]),
        "rss_peak_sampled": max(s[2] for s in samples),
        "fds_peak": max(s[3] for s in samples),
        "cpu_ramp": pct("start", "full"),
        "cpu_full": pct("full", "sampled"),
        "mock_rss": bl.proc_status_kib(mock_pid, "VmHWM"),
        "overflows": {k: overflow1.get(k, 0) - overflow0.get(k, 0) for k in overflow0},
        "accept_q": {"gateway": accept_q[urls["gw_port"]], "mock": accept_q[urls["mock_port"]]},
        "under_load": under_load,
        "under_load_chunks": sample_chunks,
    }


def _log_problems(path: Path) -> list[str]:
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if b'"level":"error"' in line or b'"level":"warning"' in line \
                        or b"Traceback" in line:
                    out.append(line.decode(errors="replace").strip()[:300])
    except OSError:
        pass
    return out


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def _latency_table(title: str, res: dict[str, Any]) -> list[str]:
    d, g = res["direct"], res["gateway"]
    lines = [title, f"  {'':<26}{'direct':>10}{'gateway':>10}{'added':>10}   (ms)"]
    for label, key in (("first byte (headers)", "ttfb"), ("chunk lateness", "late"),
                       ("inter-arrival - gap", "inter")):
        for q in ("p50", "p90", "p99", "max"):
            dv, gv = d[f"{key}_{q}_ms"], g[f"{key}_{q}_ms"]
            lines.append(f"  {label + ' ' + q:<26}{dv:>10.2f}{gv:>10.2f}{gv - dv:>+10.2f}")
    err = d["error"] or g["error"]
    lines.append(f"  streams ok/failed: direct {d['ok']}/{d['failed']}, gateway {g['ok']}/"
                 f"{g['failed']}; chunks timed: direct {d['chunks']}, gateway {g['chunks']}"
                 + (f"; first error: {err}" if err else ""))
    return lines


def _cpu_text(c: tuple[float, ...] | None) -> str:
    if c is None:
        return "n/a"
    return (f"gateway {c[0] * 100:.0f}% (and {c[3] * 100:.0f}% of the time runnable but waiting "
            f"for a CPU), mock {c[1] * 100:.0f}%, load generators {c[2] * 100:.0f}%")


def _report(args: argparse.Namespace, n_streams: int, rss_idle: int, rss_after: int,
            rss_drained: int, hwm: int, bulk: dict[str, Any], light: dict[str, Any],
            problems: list[str]) -> str:
    n_timed, n_bulk = bulk["n_timed"], bulk["n_bulk"]
    under = bulk["under_load"]
    timed_ok = under["gateway"]["ok"] if under else 0
    open_total = bulk["peak_open"] + timed_ok
    t_full = bulk["t_full"]
    lines = [(f"(a) {n_streams} concurrent streams through one gateway process "
              f"({n_bulk} counted + {n_timed} timed)")]
    lines.append(f"  bulk: started {bulk['started']}, completed {bulk['done']}, failed "
                 f"{bulk['failed']}, peak open at once {bulk['peak_open']}/{n_bulk}"
                 + (f" (all open {t_full:.1f} s after the first, for ~{bulk['full_secs']:.0f} s)"
                    if t_full is not None else " (never all open at once)")
                 + f"; timed: {timed_ok}/{n_timed} ok"
                 + (f"; first error: {bulk['first_error']}" if bulk["first_error"] else ""))
    lines.append(f"  streams open in the gateway at the peak: ~{open_total}; its open fds peaked "
                 f"at {bulk['fds_peak']} (2 per stream)")
    lines.append(f"  gateway RSS idle (after start)                  {_mib(rss_idle):>11}")
    lines.append(f"  gateway RSS at full load (median)               "
                 f"{_mib(bulk['rss_full_median']):>11}")
    lines.append(f"  gateway RSS peak (sampled / VmHWM)              "
                 f"{_mib(bulk['rss_peak_sampled']):>11} / {_mib(hwm)}")
    lines.append(f"  gateway RSS when the streams ended              {_mib(rss_after):>11}")
    lines.append(f"  gateway RSS once its idle upstream conns closed {_mib(rss_drained):>11}")
    per = (bulk["rss_full_median"] - rss_idle) / max(1, open_total)
    peak = max(hwm, bulk["rss_peak_sampled"])
    lines.append(f"  per open stream: ~{per:.1f} KiB ((full-load RSS - idle RSS) / streams open); "
                 f"mock RSS peak {_mib(bulk['mock_rss'])}")
    lines.append(f"  CPU (share of one core) while opening: {_cpu_text(bulk['cpu_ramp'])}")
    lines.append(f"  CPU at full load (during the timed sample): {_cpu_text(bulk['cpu_full'])}")
    aq = bulk["accept_q"]
    lines.append("  listen queues: deepest accept queue seen "
                 + ", ".join(f"{k} {d}/{b}" for k, (d, b) in aq.items())
                 + "; kernel overflow counters (all sockets): "
                 + ", ".join(f"{k} +{v}" for k, v in bulk["overflows"].items()))
    held = open_total >= 0.99 * n_streams and bulk["failed"] == 0
    if n_streams >= args.streams:
        met = held and peak < TARGET_RSS_KIB
        lines.append(f"  target: {args.streams} streams open at once within 1 GiB RSS: "
                     f"{'MET' if met else 'NOT MET'} (peak {_mib(peak)}"
                     + ("" if held else "; not all streams were held") + ")")
    else:
        extrapolated = rss_idle + per * args.streams
        met = held and extrapolated < TARGET_RSS_KIB
        lines.append(f"  target: {args.streams} streams within 1 GiB RSS: "
                     f"{'MET' if met else 'NOT MET'} by extrapolation ({_mib(extrapolated)} = "
                     f"idle + {args.streams} x per-stream"
                     + ("" if held else "; and not all streams were held") + f"); measured "
                     f"{n_streams} streams, peak {_mib(peak)} (10,000 streams need a file limit "
                     f"above {2 * args.streams + 64})")
    lines.append("")
    if under:
        when = ("once the bulk streams were all open" if t_full is not None else
                "20 s after the ramp (the bulk streams were never all open)")
        lines += _latency_table(
            f"(b) per-chunk latency at full load: {n_timed} streams direct + {n_timed} through "
            f"the gateway, {bulk['under_load_chunks']} chunks {args.gap_ms:g} ms apart, started "
            f"{when}, while they ran", under)
        lines.append("")
    lines += _latency_table(
        f"(c) per-chunk latency at light load (the bulk streams over): {args.sample} streams "
        f"direct + {args.sample} through the gateway, concurrently, "
        f"{light['chunks_per_stream']} chunks {args.gap_ms:g} ms apart", light)
    lines.append("  (lateness = arrival - request sent - k x gap for content chunk k, over all "
                 "chunks of all streams; added = gateway - direct at the same percentile)")
    if problems:
        lines.append("")
        lines.append(f"gateway log: {len(problems)} warning/error line(s), first: {problems[0]}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
