"""Shared plumbing for the benchmark scripts: processes, ports, pinning, /proc readings.

Every process started here runs in its own session (so it can be killed with its children),
with RLIMIT_NOFILE raised, optionally pinned with ``taskset``; ``Procs.stop_all`` (call it in a
``finally``) terminates them, then kills what is left after a grace period.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
DEMO_KEY = "sk-demo-acme"
NOFILE_WANTED = 65536


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise this process's open-file limit: soft to the hard limit, or both to ``wanted``
    when allowed (root). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _child_setup() -> None:  # preexec_fn: runs in the child before exec
    raise_nofile()
    try:  # die with the benchmark even if it is killed with SIGKILL (Linux only)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_plan() -> tuple[list[str], list[str], str]:
    """(prefix for the server under test, prefix for mock + load, description)."""
    cores = cpus()
    if len(cores) < 2 or not shutil.which("taskset"):
        return [], [], f"no pinning ({len(cores)} CPU(s) available)"
    a, b = cores[0], cores[1]
    desc = (f"server under test (gateway / passthrough) on CPU {a}; "
            f"mock upstream + load generator on CPU {b}")
    return ["taskset", "-c", str(a)], ["taskset", "-c", str(b)], desc


class Procs:
    """The child processes of one benchmark run."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: Sequence[str], *, stdin: Any = subprocess.DEVNULL,
              stdout: Any = subprocess.DEVNULL, stderr: Any = None,
              env: dict[str, str] | None = None, text: bool = False,
              cwd: Path = REPO) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, text=text,
            env=env, preexec_fn=_child_setup, start_new_session=True,  # noqa: PLW1509 (no threads)
        )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early with status {proc.returncode}")

    def stop_all(self, grace: float = 3.0) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks still stop the children."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def wait_http(url: str, timeout: float = 20.0, procs: Procs | None = None,
              headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers anything (any HTTP status counts); bounded."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                        timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s: {last}")


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one POST; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def gateway_config(template: Path, out_dir: Path, mock_port: int) -> Path:
    """Copy a bench policy file with every provider's base_url pointed at the mock's port."""
    data = yaml.safe_load(template.read_text(encoding="utf-8"))
    for provider in data["providers"].values():
        base = provider["base_url"]
        scheme, rest = base.split("://", 1)
        path = rest.split("/", 1)[1] if "/" in rest else ""
        provider["base_url"] = f"{scheme}://127.0.0.1:{mock_port}" + (f"/{path}" if path else "")
    out = out_dir / template.name
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


_LAST_CPU: dict[int, float] = {}


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat); the last value read
    once the process has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return _LAST_CPU.get(pid, 0.0)
    value = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    _LAST_CPU[pid] = value
    return value


def proc_wait_seconds(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (run-queue delay,
    /proc/PID/schedstat): how much a noisy machine held it back. 0.0 if unreadable."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...), in KiB; -1 if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def proc_nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process (from /proc/PID/limits); -1 if unreadable."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return 1 << 30 if value == "unlimited" else int(value)
    except OSError:
        pass
    return -1


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def listen_queues(ports: Sequence[int]) -> dict[int, tuple[int, int]]:
    """{port: (connections waiting in the accept queue, backlog)} for loopback listeners."""
    out: dict[int, tuple[int, int]] = {}
    try:
        text = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=5,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return out
    wanted = set(ports)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "LISTEN":
            port = int(parts[3].rsplit(":", 1)[1])
            if port in wanted:
                out[port] = (int(parts[1]), int(parts[2]))
    return out


def tcp_ext_counters(*names: str) -> dict[str, int]:
    """TcpExt counters (ListenOverflows, ListenDrops, ...) from /proc/net/netstat."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], map(int, vals.split()[1:])))
            return {n: table.get(n, -1) for n in names}
    return {}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


class GatewaySource:
    """Where the gateway (and mock) code comes from: the working tree, or ``git archive REF``
    unpacked in a temporary directory (so a run measures exactly one commit while the
    working tree keeps changing)."""

    def __init__(self, ref: str | None, tmpdir: Path) -> None:
        self.cwd = REPO
        self.env: dict[str, str] | None = None
        head = _git("rev-parse", "--short", "HEAD") or "?"
        if not ref:
            dirty = _git("status", "--porcelain", "--", "gateway")
            self.commit = head
            self.describe = f"working tree at {head}" + (
                " WITH UNCOMMITTED CHANGES in gateway/ (use --gateway-ref HEAD to measure "
                "the commit alone)" if dirty else "")
            return
        sha = _git("rev-parse", "--short", f"{ref}^{{commit}}")
        if not sha:
            raise SystemExit(f"--gateway-ref {ref!r} is not a commit")
        dest = tmpdir / "src"
        dest.mkdir()
        archive = subprocess.run(["git", "archive", sha, "gateway"], cwd=REPO,
                                 capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        self.cwd = dest
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p)
        self.commit = sha
        self.describe = f"commit {sha} (git archive of gateway/; working tree ignored)"


def run_header(argv: Sequence[str], source: GatewaySource) -> list[str]:
    """Date, commit and command line, for the top of a report."""
    commit = f"{source.commit}; gateway code: {source.describe}"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return [
        f"date:     {now}",
        f"commit:   {commit}",
        f"command:  {shlex.join([Path(PYTHON).name, *argv])}",
        (f"host:     {len(cpus())} CPU(s) usable, Python {sys.version.split()[0]}, "
         f"loadavg before start {load}, {cpu_pressure()}"),
    ]


def cpu_pressure() -> str:
    """The kernel's CPU pressure (share of time runnable tasks waited for a CPU): how noisy
    the machine is, from /proc/pressure/cpu."""
    try:
        fields = dict(kv.split("=") for kv in
                      Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[1:])
        return f"CPU pressure avg10 {fields['avg10']}% avg60 {fields['avg60']}%"
    except (OSError, KeyError, ValueError, IndexError):
        return "CPU pressure n/a"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def readline_timeout(stream: IO[str], proc: subprocess.Popen[Any], timeout: float) -> str:
    """One line from a child's stdout, or RuntimeError after ``timeout`` s / if it died."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no answer from pid {proc.pid} within {timeout:.0f} s")
            if sel.select(min(left, 0.5)):
                line = stream.readline()
                if not line:
                    raise RuntimeError(f"pid {proc.pid} closed its output "
                                       f"(exit status {proc.poll()})")
                return line
            if proc.poll() is not None:
                raise RuntimeError(f"pid {proc.pid} exited with status {proc.returncode}")
    finally:
        sel.close()
