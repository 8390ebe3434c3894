"""Real Redis servers for tests: a standalone ``RedisServer`` and a 3-master ``RedisCluster3``.

Each server is a ``redis-server`` child process owned by the test session (no daemonize),
bound to 127.0.0.1 on a free port, with its own temp dir, no persistence. ``stop()`` and
``start()`` can be called repeatedly; the port stays the same after the first start, so
fault tests can kill Redis and bring it back under clients that were never recreated.

If redis-server is missing or will not start, these helpers raise ``RuntimeError``:
tests that need Redis must fail, never skip.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT_S = 5.0
CLUSTER_OK_TIMEOUT_S = 10.0
# The cluster bus listens on port + 10000, so every port must stay below 55535.
_PORT_RANGE = (20000, 45000)


def _find_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        raise RuntimeError(
            f"{name} not found on PATH: install Redis (Debian: apt-get install redis-server)"
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and port + 10000 too when ``with_bus``). Racy by nature;
    callers retry with a new port when redis-server then fails to bind."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found for redis-server")


def _encode(args: Sequence[str]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def resp_command(port: int, *args: str, timeout_s: float = 1.0) -> bytes | int | None:
    """Send one command over a fresh socket; return a simple/bulk string or integer reply.

    Deliberately independent of redis-py, so fixtures do not share a client with the
    code under test. Error replies raise RuntimeError.
    """
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(_encode(args))
        reader = sock.makefile("rb")
        line = reader.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else reader.read(size + 2)[:size]
        if kind == b"-":
            raise RuntimeError(f"redis port {port}: {' '.join(args)} -> {rest.decode()}")
        raise RuntimeError(f"redis port {port}: unexpected reply {line!r}")


class RedisServer:
    """One redis-server child process. ``start()`` picks a port the first time and reuses
    it afterwards; ``stop()`` terminates (then kills) the process; ``close()`` also
    removes the temp dir. Usable as a context manager."""

    def __init__(self, *, extra_args: Sequence[str] = (), cluster_bus: bool = False) -> None:
        self._binary = _find_binary("redis-server")
        self._extra_args = list(extra_args)
        self._cluster_bus = cluster_bus
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._require_port()}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start and wait (bounded) until PING answers; RuntimeError otherwise."""
        if self.running:
            return
        if self.port is not None:  # restart: the port is part of the contract
            self._spawn(self.port)
            return
        last: RuntimeError | None = None
        for _ in range(3):  # a port found free can be taken before redis binds it
            port = pick_port(with_bus=self._cluster_bus)
            try:
                self._spawn(port)
            except RuntimeError as exc:
                last = exc
                continue
            self.port = port
            return
        assert last is not None
        raise last

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL, as in a crash: no shutdown work, no final save. Restart with start()."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        self._require_proc().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._require_proc().send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> bytes | int | None:
        return resp_command(self._require_port(), *args)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self, port: int) -> None:
        log = self.dir / "redis.log"
        # stderr to a file, not a pipe: nobody reads a pipe once the server is up.
        with open(self.dir / "stderr.log", "ab") as stderr:
            proc = subprocess.Popen(
                [
                    self._binary,
                    "--port",
                    str(port),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--logfile",
                    str(log),
                    *self._extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = "".join(
                    f.read_text(errors="replace")[-800:]
                    for f in (self.dir / "stderr.log", log)
                    if f.exists()
                )
                raise RuntimeError(
                    f"redis-server on port {port} exited with code {proc.returncode}: "
                    f"{tail.strip()}"
                )
            try:
                if resp_command(port, "PING", timeout_s=0.5) == b"PONG":
                    break
            except (OSError, RuntimeError):
                pass  # not listening yet, or still loading
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"redis-server on port {port} did not answer PING within {START_TIMEOUT_S:g} s"
                )
            time.sleep(0.02)
        self._proc = proc

    def _require_port(self) -> int:
        if self.port is None:
            raise RuntimeError("redis server was never started")
        return self.port

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("redis server is not running")
        return self._proc


class RedisCluster3:
    """A 3-master Redis Cluster without replicas on loopback ports below 55535.

    The first ``start()`` creates the cluster with ``redis-cli --cluster create``; later
    starts restart the nodes on the same ports, where they rejoin from their nodes.conf.
    ``start()`` returns only once every node reports ``cluster_state:ok``.
    """

    def __init__(self, *, tls_dir: Path | None = None) -> None:
        self._cli = _find_binary("redis-cli")
        self.nodes: list[RedisServer] = []
        self._created = False
        # With ``tls_dir`` (ca.pem, server.pem/.key): clients and the cluster bus speak TLS on
        # ``tls_ports`` and clients must present a certificate of that CA; the plain ports stay
        # for this class's own setup and readiness checks.
        self._tls_dir = tls_dir
        self.tls_ports: list[int] = []

    @property
    def ports(self) -> list[int]:
        return [node._require_port() for node in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL listing every node, as ``RedisBackend`` expects."""
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    @property
    def tls_url(self) -> str:
        """A ``rediss+cluster://`` URL of the TLS ports (without the certificate parameters)."""
        return "rediss+cluster://" + ",".join(f"{HOST}:{p}" for p in self.tls_ports)

    def start(self) -> None:
        if not self.nodes:
            args = ["--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",  # in the node's own dir
                    "--cluster-node-timeout", "2000"]
            self.nodes = [RedisServer(cluster_bus=True, extra_args=args + self._tls_args())
                          for _ in range(3)]
        try:
            for node in self.nodes:
                node.start()
            if not self._created:
                self._create()
                self._created = True
            self._wait_ok()
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def flushall(self) -> None:
        for node in self.nodes:
            node.command("FLUSHALL")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _tls_args(self) -> list[str]:
        if self._tls_dir is None:
            return []
        # The bus moves to the TLS port + 10000 (redis 7: tls-cluster buses on tls-port's).
        port = pick_port(with_bus=True)
        while port in self.tls_ports:
            port = pick_port(with_bus=True)
        self.tls_ports.append(port)
        d = self._tls_dir
        return ["--tls-port", str(port), "--tls-cluster", "yes", "--tls-auth-clients", "yes",
                "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
                "--tls-ca-cert-file", str(d / "ca.pem")]

    def _create(self) -> None:
        cmd = [
            self._cli,
            "--cluster",
            "create",
            *(f"{HOST}:{p}" for p in self.ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError("redis-cli --cluster create did not finish within 30 s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-1500:]
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}): {output}")

    def _wait_ok(self) -> None:
        # Right after create (or a restart) nodes report cluster_state:fail for a moment.
        deadline = time.monotonic() + CLUSTER_OK_TIMEOUT_S
        pending = list(self.ports)
        while pending:
            info = resp_command(pending[0], "CLUSTER", "INFO")
            if isinstance(info, bytes) and b"cluster_state:ok" in info:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis cluster on ports {self.ports} not ok within "
                    f"{CLUSTER_OK_TIMEOUT_S:g} s: {info!r}"
                )
            time.sleep(0.05)
