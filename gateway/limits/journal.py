"""The usage journal on disk: settlements a stopping replica could not hand to the store.

While Redis is unreachable every settlement waits in ``DegradedMode``'s in-memory journal.
A replica that stops before Redis answers again writes what is left to
``<directory>/usage-journal-<replica id>.jsonl`` (one settlement per line, written to a temporary
file, fsynced, then renamed into place, so a file is whole or absent). The next process to
start on that directory claims every file another replica left (an atomic rename, so two
workers starting together never take the same file; a claimed file abandoned for
``CLAIM_STALE_S`` by a claimer that died is claimed again), replays the settlements with the
idempotent settle script and deletes the files once the store has them all.

Exactly once: a settlement carries its request id, and the store keeps a done marker per
request id (``limits.DONE_TTL_MS``), so a file replayed twice (a crash between the replay and
the delete) charges once. Its limit: a file replayed a second time more than ``DONE_TTL_MS``
after the first replay would charge again; the delete right after the replay is what keeps
that from happening.

The directory is a process setting: ``state.degraded.journal_dir``, else the environment's
``GATEWAY_JOURNAL_DIR`` (the container image sets it; the Kubernetes manifests mount an
``emptyDir`` there, which outlives a container restart but not the pod; use a persistent volume
to keep the journal across pod replacement).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import orjson

from gateway.state import SettlePlan, exact_interval

log = logging.getLogger("gateway.limits")
PREFIX = "usage-journal-"
CLAIMED = "claimed-"
SUFFIX = ".jsonl"
CLAIM_STALE_S = 300.0


def encode(plan: SettlePlan) -> bytes:
    return orjson.dumps({
        "request_id": plan.request_id, "done_key": plan.done_key, "hold_key": plan.hold_key,
        "done_ttl_ms": plan.done_ttl_ms,
        # intervals are exact fractions: written as "60000/7", read back by exact_interval
        "gcra": [(k, str(i), r, a) for k, i, r, a in plan.gcra], "counters": plan.counters,
        "leases": plan.leases,
    })


def decode(line: bytes) -> SettlePlan:
    """One line back into a plan; ValueError/KeyError/TypeError when it is not one."""
    d = orjson.loads(line)
    return SettlePlan(
        str(d["request_id"]), str(d["done_key"]), str(d["hold_key"]), int(d["done_ttl_ms"]),
        tuple((str(k), exact_interval(i if isinstance(i, str | float) else str(i)), int(r),
               int(a)) for k, i, r, a in d["gcra"]),
        tuple((str(k), int(r), int(a), int(t)) for k, r, a, t in d["counters"]),
        tuple(str(k) for k in d["leases"]),
    )


class JournalFile:
    """One replica's view of the journal directory (module docstring)."""

    def __init__(self, directory: str, replica_id: str) -> None:
        self.directory = directory
        self._dir = Path(directory)
        self._id = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)
        self._claimed: list[Path] = []
        self._claims = 0

    @property
    def path(self) -> Path:
        return self._dir / f"{PREFIX}{self._id}{SUFFIX}"

    def claim(self) -> tuple[list[SettlePlan], int]:
        """Take over every file other replicas left: (settlements, unreadable lines)."""
        plans: list[SettlePlan] = []
        corrupt = 0
        now = time.time()  # the real wall clock: compared with the files' mtimes, set by the OS
        try:
            names = sorted(os.listdir(self._dir))
        except FileNotFoundError:
            return plans, 0
        except OSError as exc:  # not fatal: this replica can still serve; its stop will tell
            log.error("usage journal directory unreadable", extra={"fields": {
                "directory": self.directory, "error": str(exc)}})
            return plans, 0
        for name in names:
            if not name.endswith(SUFFIX) or not name.startswith((PREFIX, CLAIMED)) \
                    or name.startswith(f"{CLAIMED}{self._id}-"):
                continue
            if name.startswith(CLAIMED) and not self._abandoned(self._dir / name, now):
                continue  # another live process is replaying it
            self._claims += 1
            mine = self._dir / f"{CLAIMED}{self._id}-{self._claims}{SUFFIX}"
            try:
                os.rename(self._dir / name, mine)
                lines = mine.read_bytes().splitlines()
            except FileNotFoundError:
                continue  # another worker claimed it first
            except OSError as exc:
                log.error("usage journal file unreadable", extra={"fields": {
                    "file": str(mine), "error": str(exc)}})
                continue
            self._claimed.append(mine)
            for line in lines:
                if not line.strip():
                    continue
                try:
                    plans.append(decode(line))
                except (ValueError, KeyError, TypeError):
                    corrupt += 1
        return plans, corrupt

    @staticmethod
    def _abandoned(path: Path, now: float) -> bool:
        """A claimed file untouched for a while: its claimer died before replaying it (a
        live claimer deletes it once replayed, or folds it into its own file at stop)."""
        try:
            return now - path.stat().st_ctime > CLAIM_STALE_S
        except OSError:
            return False

    def replayed(self) -> None:
        """Every claimed settlement is in the store: the claimed files go."""
        for path in self._claimed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._claimed.clear()

    def save(self, plans: list[SettlePlan]) -> None:
        """Write ``plans`` (this replica's whole unflushed journal, claimed ones included)
        durably, then drop the claimed files. OSError when it cannot be written."""
        if plans:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                out.write(b"".join(encode(p) + b"\n" for p in plans))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            with contextlib.suppress(OSError):  # the rename itself survives a power cut
                fd = os.open(self._dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self.replayed()
