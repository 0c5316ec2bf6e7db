"""The one console script, ``store-gateway``, and its subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="store-gateway", description="Edge IoT gateway for retail stores.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the gateway with a config file")
    run.add_argument("--config", "-c", type=Path, required=True, help="the store config (YAML)")
    check = sub.add_parser(
        "check-config", help="validate a config file; exit 0 if valid, 1 with every error if not"
    )
    check.add_argument("file", type=Path)
    schema = sub.add_parser("config-schema", help="print the JSON Schema of the config (or of events)")
    schema.add_argument("--events", action="store_true", help="print the event envelope schema instead")
    demo = sub.add_parser("demo", help="embedded brokers, a simulated store, the gateway and an HQ receiver")
    demo.add_argument(
        "--scenario",
        default="normal-day",
        help="a shipped scenario (normal-day, fridge-failure-night, garbage-flood, device-unplugged) or a file",
    )
    demo.add_argument(
        "--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)"
    )
    demo.add_argument("--rate", type=float, default=1.0, help="sales per second per till (default 1)")
    demo.add_argument(
        "--data-dir", type=Path, default=None, help="keep the journal here (default: a temp dir)"
    )
    sub.add_parser("version", help="print the version")
    sub.add_parser("hq-receiver", help="HQ reference receiver (see 'hq-receiver --help')", add_help=False)
    sub.add_parser("simulate", help="device simulators (see 'simulate --help')", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["hq-receiver"]:
        from cloud_bridge.receiver import receiver_main

        return receiver_main(args_list[1:])
    if args_list[:1] == ["simulate"]:
        from simulators.cli import simulate_main

        return simulate_main(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "version":
        print(f"store-gateway {__version__}")
        return 0
    if args.command == "check-config":
        from gateway.config_loader import check_config

        code, text = check_config(args.file)
        print(text)
        return code
    if args.command == "config-schema":
        if args.events:
            from gateway.events import envelope_json_schema

            print(json.dumps(envelope_json_schema(), indent=2))
        else:
            from gateway.config_loader import json_schema

            print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "run":
        return _run(args.config)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(
            duration=args.duration, rate=args.rate, data_dir=args.data_dir, scenario=args.scenario
        )
    return 2


def _run(config_path: Path) -> int:
    from gateway.config_loader import ConfigError, config_hash, load_config
    from gateway.logs import setup_logging
    from gateway.runtime import Gateway

    try:
        config = load_config(config_path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    setup_logging(config.log.level, config.log.format)
    problems = _preflight(config)
    if problems:
        for problem in problems:
            print(f"store-gateway: {problem}", file=sys.stderr)
        return 1

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(config, config_hash(config)).run(stop)

    try:
        asyncio.run(_main())
    except BaseException as err:
        known = _startup_failures(err)
        if not known:
            raise
        for failure in known:
            print(f"store-gateway: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0


def _preflight(config: GatewayConfig) -> list[str]:
    """What the config names but the machine lacks (TLS files), said now rather than retried forever."""
    import ssl

    from gateway.mqtt import tls_context

    problems = []
    for label, broker in (("store_broker", config.store_broker), ("hq", config.hq)):
        try:
            tls_context(broker)
        except (OSError, ssl.SSLError) as err:
            problems.append(f"{label}.tls: cannot load the CA, certificate or key: {err}")
    return problems


def _startup_failures(err: BaseException) -> list[BaseException]:
    """The known ways a start fails (port taken, journal unreadable, bad stock CSV), out of exception groups."""
    from gateway.api import ApiError
    from gateway.journal import JournalError
    from rules.stock import StockConfigError

    known = (ApiError, JournalError, StockConfigError)
    if isinstance(err, BaseExceptionGroup):
        found = [f for sub in err.exceptions for f in _startup_failures(sub)]
        return found if len(found) == len(err.exceptions) else []
    return [err] if isinstance(err, known) else []


if __name__ == "__main__":
    raise SystemExit(main())
