"""``gateway`` command line: serve, check-config, mock-upstream, demo, hash-key, schema, version,
healthcheck.

Heavy imports (aiohttp, the config models) happen inside the commands that need them, so
``gateway healthcheck`` (a container probe, run every few seconds) starts in a few tens of ms.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.observability import logs

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.config import GatewayConfig
    from gateway.mock import Capacity

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="policy YAML file")
    serve.add_argument("--host", help="listen address (default: server.host from the config)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    serve.add_argument(
        "--workers", type=int, default=os.environ.get("GATEWAY_WORKERS", "1"),
        help="processes sharing the port (SO_REUSEPORT), one per core you give the gateway; "
        "limits are shared only with state.backend: redis (default: $GATEWAY_WORKERS or 1)")
    serve.add_argument(
        "--watch-interval", type=float, default=1.0, metavar="SECONDS",
        help="how often to check the policy file (and api_key_file files) for changes; "
        "0 turns the watch off (SIGHUP still reloads) (default: 1)")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers
    serve.add_argument("--worker-dir", help=argparse.SUPPRESS)  # the group's sockets
    serve.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "healthcheck", help="probe a running gateway: exit 0 when the endpoint answers 200")
    health.add_argument("--host", default="127.0.0.1")
    health.add_argument("--port", type=int, default=8080)
    health.add_argument("--path", default="/healthz", help="/healthz (alive) or /readyz")
    health.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS")
    health.set_defaults(func=_healthcheck)

    check = sub.add_parser("check-config", help="validate a policy file")
    check.add_argument("path")
    check.set_defaults(func=_check_config)

    mock = sub.add_parser("mock-upstream", help="run the mock OpenAI/Anthropic upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    cap = mock.add_argument_group(
        "capacity model", "off unless --slots is given; see gateway/mock/capacity.py")
    cap.add_argument("--slots", type=int, help="concurrent generation slots")
    cap.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting for a slot; more get 429 (default 64)")
    cap.add_argument("--queue-ttft-ms", type=float, default=0.0,
                     help="extra time to first token per request queued ahead (default 0)")
    cap.add_argument("--quota-rpm", type=int, help="requests per minute; more get 429")
    cap.add_argument("--quota-burst", type=int, help="quota bucket size (default rpm/10)")
    mock.set_defaults(func=_mock_upstream)

    demo = sub.add_parser("demo", help="the mock upstream and the gateway, in one process")
    demo.add_argument("--config", default="config/example.yaml")
    demo.add_argument("--port", type=int,
                      help="the gateway's port (default: the policy's server.port, 8080)")
    demo.add_argument("--mock-port", type=int, default=9000,
                      help="the mock upstream's port; the policy's loopback providers are "
                      "pointed at it (default 9000)")
    demo.set_defaults(func=_demo)

    hk = sub.add_parser("hash-key", help="print the sha256 form of an API key for the config")
    hk.add_argument("key", nargs="?", help="the key (read from stdin or a prompt if omitted)")
    hk.set_defaults(func=_hash_key)

    schema = sub.add_parser("schema", help="print the policy file's JSON Schema")
    schema.add_argument(
        "--markdown", action="store_true",
        help="print the reference docs/configuration.md instead (examples are read from the "
        "repository's config/example.yaml and config/example-full.yaml)")
    schema.set_defaults(func=_schema)

    # Every argument goes to gateway.loadtest.cli, which parses them (and owns --help).
    loadtest = sub.add_parser("loadtest", help="drive synthetic agent traffic at a gateway",
                              add_help=False, prefix_chars="\x00")
    loadtest.add_argument("args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(func=_loadtest)

    status = sub.add_parser("status", help="a running gateway's limits, queues and breakers")
    status.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway's base URL")
    status.add_argument("--admin-key", default=os.environ.get("GATEWAY_ADMIN_KEY"),
                        help="admin key (default: $GATEWAY_ADMIN_KEY)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_status)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(__version__))
    return parser


def _load_or_exit(path: str) -> GatewayConfig:
    from gateway.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.path)
    deployments = sum(len(m.deployments) for m in config.models.values())
    print(
        f"{args.path}: ok: {len(config.providers)} providers, {len(config.models)} models "
        f"({deployments} deployments), {len(config.tenants)} tenants, "
        f"state backend {config.state.backend}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError
    from gateway.observability import worker_group_from
    from gateway.process import ServeOptions, file_signature, run, watched_files

    # Until the loop's handler is in place, a SIGHUP must not kill the process (its default);
    # the file watch catches any change made before then.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure(args.log_level)
    if args.worker_index is not None:
        from gateway.process import tag_worker_logs

        tag_worker_logs(args.worker_index)
    if args.workers < 1:
        print("gateway serve: --workers must be at least 1", file=sys.stderr)
        return 2
    baseline = file_signature(watched_files(args.config, None))  # before the read
    config = _with_process_settings(_load_or_exit(args.config), args.host, args.port)
    if args.workers > 1:
        return _supervise(args, config)
    options = ServeOptions(
        config_path=args.config,
        prepare=lambda c: _with_process_settings(c, args.host, args.port),
        reuse_port=args.worker_index is not None,
        watch_interval_s=max(0.0, args.watch_interval),
        parent_pid=os.getppid() if args.worker_index is not None else None,
        baseline=baseline,
        worker_group=worker_group_from(args.worker_dir, args.worker_index, args.worker_count),
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop, args.config)) as runner:
            return runner.run(run(config, options))
    except ConfigError as exc:  # e.g. a provider key's env var is missing
        print(str(exc), file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"gateway serve: cannot listen on {config.server.host}:{config.server.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1


def loop_factory(choice: str, path: str = "") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``serve`` runs on: uvloop when asked for (or, with 'auto', installed),
    else None for asyncio's own. uvloop's libuv transports cut the socket work that is about
    half of every proxied request's CPU (docs/benchmarks.md, "Core overhead")."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        from gateway.config import ConfigError

        if choice == "uvloop":
            raise ConfigError(path, [("server.event_loop: 'uvloop' is not installed "
                                      "(pip install uvloop)")]) from None
        return None
    return uvloop.new_event_loop


def _supervise(args: argparse.Namespace, config: GatewayConfig) -> int:
    from gateway.process import memory_backend_warning, supervise

    if config.server.port == 0:
        print("gateway serve: --workers needs a fixed port (not 0): the workers share it",
              file=sys.stderr)
        return 2
    if config.state.backend == "memory":
        log.warning(memory_backend_warning(args.workers))

    # The workers' sockets for merging /metrics and /admin/status (observability/worker_group.py): a fresh
    # private directory per run, so nothing of an earlier run (or another pod) is ever read.
    # A Unix socket path holds ~100 bytes: a long $TMPDIR gives way to /tmp.
    group_dir: str | None = None
    try:
        group_dir = tempfile.mkdtemp(
            prefix="gw-", dir=None if len(tempfile.gettempdir()) < 64 else "/tmp")
    except OSError as exc:
        log.warning("no directory for the workers' sockets: /metrics and /admin/status will "
                    "answer for one worker each", extra={"fields": {"error": str(exc)}})

    def argv_for(index: int) -> list[str]:
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", args.config,
                "--log-level", args.log_level, "--workers", "1",
                "--watch-interval", str(args.watch_interval), "--worker-index", str(index)]
        if group_dir is not None:
            argv += ["--worker-dir", group_dir, "--worker-count", str(args.workers)]
        if args.host is not None:
            argv += ["--host", args.host]
        if args.port is not None:
            argv += ["--port", str(args.port)]
        return argv

    try:
        return supervise(args.workers, argv_for)
    finally:
        if group_dir is not None:
            shutil.rmtree(group_dir, ignore_errors=True)


def _healthcheck(args: argparse.Namespace) -> int:
    """For Docker HEALTHCHECK and exec probes (a sidecar bound to 127.0.0.1): stdlib only."""
    import urllib.error
    import urllib.request

    url = f"http://{args.host}:{args.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def _with_process_settings(
    config: GatewayConfig, host: str | None, port: int | None
) -> GatewayConfig:
    """Environment and flags override the file for process settings only."""
    server = config.server.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    state = config.state
    if os.environ.get("REDIS_URL"):
        state = state.model_copy(update={"redis_url": os.environ["REDIS_URL"]})
    return config.model_copy(update={"server": server, "state": state})


async def _gateway_site(config: GatewayConfig) -> web.AppRunner:
    from aiohttp import web

    from gateway.app import create_app
    from gateway.process import GatewayRunner

    runner = GatewayRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
    except OSError:  # the port is taken: close the app's sessions before saying so
        await runner.cleanup()
        raise
    log.info("gateway listening", extra={"fields": {
        "host": config.server.host, "port": config.server.port,
        "state_backend": config.state.backend, "version": __version__}})
    return runner


async def _mock_site(host: str, port: int, capacity: Capacity | None = None) -> web.AppRunner:
    from aiohttp import web

    from gateway.mock import create_mock_app

    runner = web.AppRunner(create_mock_app(capacity=capacity), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("mock upstream listening", extra={"fields": {"host": host, "port": port}})
    return runner


async def _run_until_signal(starters: list[object]) -> None:
    """The mock upstream and the demo: stop on SIGINT/SIGTERM (``serve`` drains instead)."""
    runners: list[web.AppRunner] = []
    try:
        for start in starters:
            runners.append(await start)  # type: ignore[misc]
        await _stop_signal()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _stop_signal() -> None:
    """Return at SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _mock_upstream(args: argparse.Namespace) -> int:
    logs.configure()
    capacity = None
    if args.slots is not None:
        from gateway.mock import Capacity

        try:
            capacity = Capacity(slots=args.slots, max_queue=args.max_queue,
                                queue_ttft_ms=args.queue_ttft_ms, quota_rpm=args.quota_rpm,
                                quota_burst=args.quota_burst)
        except ValueError as exc:
            print(f"mock-upstream: {exc}", file=sys.stderr)
            return 2
    asyncio.run(_run_until_signal([_mock_site(args.host, args.port, capacity)]))
    return 0


DEMO_ADMIN_KEY = "sk-demo-admin"  # config/example.yaml's admin key; printed by the demo only


def demo_banner(config: GatewayConfig, mock_port: int) -> str:
    """What ``gateway demo`` prints: the URL, a first request and, when the policy has the
    demo's admin key, how to see the status."""
    from gateway.request import hash_key

    url = f"http://{config.server.host}:{config.server.port}"
    text = (
        f"\nGateway on {url}/v1 in front of a mock upstream on 127.0.0.1:{mock_port}.\n"
        "Try it from another terminal:\n\n"
        f"  curl -s {url}/v1/chat/completions \\\n"
        "    -H 'Authorization: Bearer sk-demo-acme' -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"hello\"}]}'\n"
    )
    if hash_key(DEMO_ADMIN_KEY) in config.admin.api_keys:
        text += (f"\nLimits, budgets, queues and breakers (admin key {DEMO_ADMIN_KEY}):\n\n"
                 f"  .venv/bin/gateway status --url {url} --admin-key {DEMO_ADMIN_KEY}\n"
                 f"  curl -s {url}/metrics\n")
    return text + "\nCtrl-C stops both.\n"


def demo_policy(config: GatewayConfig, port: int | None, mock_port: int) -> GatewayConfig:
    """The demo's policy on the chosen ports: the gateway on ``port`` (None: the file's), and
    every provider on a loopback address (the demo's mock upstream) at ``mock_port``."""
    from urllib.parse import urlsplit, urlunsplit

    config = _with_process_settings(config, None, port)
    providers = {}
    for name, provider in config.providers.items():
        url = urlsplit(provider.base_url)
        if url.hostname in ("127.0.0.1", "localhost", "::1") and url.port != mock_port:
            host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
            provider = provider.model_copy(update={
                "base_url": urlunsplit(url._replace(netloc=f"{host}:{mock_port}"))})
        providers[name] = provider
    return config.model_copy(update={"providers": providers})


class PortInUse(Exception):
    """A demo port is taken: one line for the user, no traceback."""


async def _demo_sites(config: GatewayConfig, mock_port: int) -> None:
    """Bind both ports first (a taken one ends the demo with one clear line), then print
    the banner, then run until a signal."""
    runners: list[web.AppRunner] = []
    try:
        for what, flag, port, start in (
            ("the mock upstream", "--mock-port", mock_port,
             functools.partial(_mock_site, "127.0.0.1", mock_port)),
            ("the gateway", "--port", config.server.port,
             functools.partial(_gateway_site, config)),
        ):
            try:
                runners.append(await start())
            except OSError as exc:
                raise PortInUse(
                    f"gateway demo: cannot listen on port {port} for {what} "
                    f"({exc.strerror or exc}); choose another with {flag} N, e.g. "
                    f"bash scripts/demo.sh {flag} {port + 1}") from None
        print(demo_banner(config, mock_port), file=sys.stderr, flush=True)
        await _stop_signal()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _demo(args: argparse.Namespace) -> int:
    logs.configure()
    config = demo_policy(_load_or_exit(args.config), args.port, args.mock_port)
    try:
        asyncio.run(_demo_sites(config, args.mock_port))
    except PortInUse as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from gateway.loadtest import main as loadtest_main

    return loadtest_main(args.args)


def _status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from gateway.app import render_table

    if not args.admin_key:
        print("gateway status: give --admin-key or set GATEWAY_ADMIN_KEY", file=sys.stderr)
        return 2
    request = urllib.request.Request(args.url.rstrip("/") + "/admin/status",
                                     headers={"Authorization": f"Bearer {args.admin_key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"gateway status: {exc.code} {exc.read().decode(errors='replace')[:300]}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render_table(data))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from gateway.request import hash_key

    key = args.key
    if key is None:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        print("no key given", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.markdown:
        from gateway.config import example_documents, render

        sys.stdout.write(render(example_documents()))
        return 0
    from gateway.config import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
