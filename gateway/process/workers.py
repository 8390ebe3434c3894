"""``gateway serve --workers N``: N worker processes on one port, so one pod uses N cores.

Each worker is a whole ``gateway serve`` (its own event loop, connection pools and policy)
that binds the port with SO_REUSEPORT; the kernel spreads new connections across them. The
parent only supervises:

- it validates the policy once, then starts the workers, each in its own process group so
  a terminal's Ctrl-C reaches the parent only, which passes it on exactly once;
- it forwards SIGTERM, SIGINT and SIGHUP to every worker (each drains or reloads itself);
- when the workers have exited it exits too: 0 if they all did, else the first failure's
  code. A worker that exits on its own, unasked, makes the parent drain the others and exit
  non-zero, so the orchestrator restarts the whole container rather than leaving a pod up
  with fewer workers than it was sized for;
- a worker whose parent disappears (SIGKILL, OOM) drains and exits by itself.

State is per process: with ``state.backend: memory`` every limit, budget and concurrency cap
is enforced by each worker separately (N times the configured limits), hence the warning.
With Redis the workers share limits like any other replicas.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("gateway")

POLL_S = 0.1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def memory_backend_warning(workers: int) -> str:
    return (f"state.backend is memory: each of the {workers} workers enforces every limit, "
            f"budget and concurrency cap on its own, so together they allow up to {workers}x "
            "the configured limits; use state.backend: redis to share them")


class _WorkerField(logging.Filter):
    """Adds ``"worker": N`` to every JSON log line of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**fields, "worker": self.index} if isinstance(fields, dict) else {
            "worker": self.index}
        return True


def tag_worker_logs(index: int) -> None:
    """Call in a worker after ``logs.configure``: its log lines say which worker wrote them."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode  # killed by signal N: 128 + N


def supervise(workers: int, argv_for: Callable[[int], list[str]]) -> int:
    """Run ``workers`` processes (``argv_for(i)`` each) until they have all exited."""
    procs: list[subprocess.Popen[bytes]] = []
    state = {"stopping": False}

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            state["stopping"] = True
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    # signal.signal's own return type: a handler, SIG_DFL/SIG_IGN, or None (not set from Python)
    previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {
        sig: signal.signal(sig, forward) for sig in FORWARDED}
    exit_code = 0
    try:
        for index in range(workers):
            if state["stopping"]:
                break
            procs.append(subprocess.Popen(argv_for(index), process_group=0))
        log.info("workers started", extra={"fields": {"pids": [p.pid for p in procs]}})
        finished: set[int] = set()
        while len(finished) < len(procs):
            for index, proc in enumerate(procs):
                if index in finished or proc.poll() is None:
                    continue
                finished.add(index)
                code = _exit_code(proc.returncode)
                fields = {"worker": index, "pid": proc.pid, "exit_code": code}
                if not state["stopping"]:
                    log.error("worker exited unasked: stopping the others",
                              extra={"fields": fields})
                    exit_code = code or 1
                    forward(signal.SIGTERM, None)
                else:
                    log.info("worker exited", extra={"fields": fields})
                    if code != 0 and exit_code == 0:
                        exit_code = code
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:  # only after an error in this function itself
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return exit_code
