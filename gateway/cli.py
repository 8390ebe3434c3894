"""``gateway`` command line: serve, check-config, mock-upstream, demo, hash-key, schema, version."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__, logs
from .auth import hash_key
from .config import ConfigError, GatewayConfig, json_schema, load_config

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
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a policy file")
    check.add_argument("path")
    check.set_defaults(func=_check_config)

    mock = sub.add_parser("mock-upstream", help="run the mock OpenAI/Anthropic upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.set_defaults(func=_mock_upstream)

    demo = sub.add_parser("demo", help="the mock upstream and the gateway, in one process")
    demo.add_argument("--config", default="config/example.yaml")
    demo.add_argument("--mock-port", type=int, default=9000)
    demo.set_defaults(func=_demo)

    hk = sub.add_parser("hash-key", help="print the sha256 form of an API key for the config")
    hk.add_argument("key", nargs="?", help="the key (read from stdin or a prompt if omitted)")
    hk.set_defaults(func=_hash_key)

    schema = sub.add_parser("schema", help="print the policy file's JSON Schema")
    schema.set_defaults(func=_schema)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(__version__))
    return parser


def _load_or_exit(path: str) -> GatewayConfig:
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
    logs.configure(args.log_level)
    config = _load_or_exit(args.config)
    config = _with_process_settings(config, args.host, args.port)
    try:
        asyncio.run(_run_until_signal([_gateway_site(config)]))
    except ConfigError as exc:  # e.g. a provider key's env var is missing
        print(str(exc), file=sys.stderr)
        return 2
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
    from .server import create_app

    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    log.info("gateway listening", extra={"fields": {
        "host": config.server.host, "port": config.server.port,
        "state_backend": config.state.backend, "version": __version__}})
    return runner


async def _mock_site(host: str, port: int) -> web.AppRunner:
    from .mock_upstream import create_mock_app

    runner = web.AppRunner(create_mock_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("mock upstream listening", extra={"fields": {"host": host, "port": port}})
    return runner


async def _run_until_signal(starters: list[object]) -> None:
    runners: list[web.AppRunner] = []
    try:
        for start in starters:
            runners.append(await start)  # type: ignore[misc]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _mock_upstream(args: argparse.Namespace) -> int:
    logs.configure()
    asyncio.run(_run_until_signal([_mock_site(args.host, args.port)]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    logs.configure()
    config = _load_or_exit(args.config)
    config = _with_process_settings(config, None, None)
    print(
        f"\nGateway on http://{config.server.host}:{config.server.port}/v1 in front of a mock "
        f"upstream on 127.0.0.1:{args.mock_port}.\nTry it from another terminal:\n\n"
        f"  curl -s http://{config.server.host}:{config.server.port}/v1/chat/completions \\\n"
        "    -H 'Authorization: Bearer sk-demo-acme' -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"hello\"}]}'\n\nCtrl-C stops both.\n",
        file=sys.stderr,
    )
    asyncio.run(_run_until_signal(
        [_mock_site("127.0.0.1", args.mock_port), _gateway_site(config)]
    ))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
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
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
