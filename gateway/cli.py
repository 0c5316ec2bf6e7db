"""The one console script, ``store-gateway``, and its subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

MAX_DEMO_RATE = 100.0
"""The demo's fastest till, in sales per second."""
MIN_USER_TOKEN = 16
"""A local page user's token: as long as the API token at least."""

_FORMATTER = argparse.RawDescriptionHelpFormatter

_RUN_HELP = """\
Run the gateway with one config file, until SIGTERM or Ctrl-C.

First the config is loaded and checked exactly as 'check-config' does, files included (TLS CA, certificate
and key; the stock CSV): on any problem, every one is printed (file:line:column, key path, hint) and
nothing starts. Then the journal opens, the drivers start and events flow to HQ.

exit codes:
  0  stopped by SIGTERM or SIGINT (Ctrl-C)
  1  the config has problems, or the gateway cannot start (API port taken, journal unreadable, data
     directory in use by another gateway, journal and journal.seq both lost without --new-journal, ...)
  2  usage error
  3  the journal was found damaged while running: restart it; the next start moves the file aside and
     salvages it (docs/OUTBOX.md, "Corruption found while running")

example:
  store-gateway run --config /etc/store-gateway/store.yaml
"""

_CHECK_HELP = """\
Check a config file without starting anything: YAML syntax, every key and value, the secrets
({env: NAME}, {file: PATH}) and the files the config names: TLS CA, certificate and key (each must exist,
be readable and be PEM, and the key must match the certificate) and the stock CSV. Every problem is
printed at once, each with file:line:column, the key path and a hint. Serial ports are not opened: a
device may be unplugged while you check.

exit codes:
  0  valid: prints 'OK: FILE: ' and a summary
  1  not valid: prints every problem, then 'N problem(s) in FILE'
  2  usage error

examples:
  store-gateway check-config /etc/store-gateway/store.yaml
  store-gateway check-config --no-secrets firmware_configs/store-example.yaml
"""

_SCHEMA_HELP = """\
Print the JSON Schema of the config file (generated from the models), for editor completion and
validation; with --events, the schema of the event envelope sent to HQ instead.

exit codes:
  0  printed

example:
  store-gateway config-schema > store-gateway.schema.json
"""

_DEMO_HELP = """\
Play a simulated store on this machine: embedded MQTT brokers (store and HQ), simulated devices, the
gateway itself and an HQ receiver, with a live view of what flows. Nothing outside is touched; the journal
goes to a temporary folder unless --data-dir is given.

exit codes:
  0  finished (--duration reached, or Ctrl-C)
  2  unknown scenario or usage error

examples:
  store-gateway demo
  store-gateway demo --scenario fridge-failure-night --duration 60 --verbose
"""

_PROVISION_HELP = """\
Write the store broker's accounts for mosquitto 2 from the store config: its password file and its ACL
file, DIR/passwd and DIR/acl, both mode 0600. One account per MQTT device (the 'devices' list), named by its
device id, which may publish only on its own topics (the MQTT routes of its profile, with its id) and
subscribe to nothing; and the gateway's account (store_broker.username), which may subscribe to the
routes. Everything else, '#' and '$SYS' included, is denied. Modbus, BLE, serial and webhook devices get
no account. Secrets in the config are not read.

Each new password is printed once, here, and nowhere else (no log): give each device its own. Run it again
after adding or removing a device: existing passwords are kept (the tills keep working), new devices get
one, removed devices lose theirs. --rotate ID gives that account a new password (a till was lost, or its
password seen). Then make mosquitto read the files again (SIGHUP, or restart it).

exit codes:
  0  written
  1  the config has problems, or DIR or its files cannot be used
  2  usage error

examples:
  store-gateway broker provision --config /etc/store-gateway/store.yaml --out /etc/mosquitto/store
  store-gateway broker provision --config store.yaml --out accounts --rotate pos-02
  store-gateway broker provision --config store.yaml --out accounts \\
      --gateway-password-file /etc/store-gateway/secrets/store_mqtt_password
"""

_HACCP_HELP = """\
Write one fridge's HACCP temperature log for one day in the store's timezone (store.timezone): the limit
(the max_c of the temperature rules in force that watch it), its readings per interval (min, max, last),
the gaps, and each excursion with its duration and corrective action (docs/HACCP.md). It only reads the
journal: the gateway may be running.

exit codes:
  0  written
  1  the config has problems, no journal, or the journal knows no such fridge
  2  usage error (a date that is not YYYY-MM-DD)

example:
  store-gateway haccp --config store.yaml --device fridge-dairy --date 2026-11-01 --out dairy.csv
"""

_VERSION_HELP = """\
Print 'store-gateway VERSION' (the same as 'store-gateway --version').

exit codes:
  0  printed
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway",
        description="Edge IoT gateway for retail stores.",
        epilog="Run 'store-gateway COMMAND --help' for what a command does, its options and exit codes.\n\n"
        "example:\n  store-gateway check-config /etc/store-gateway/store.yaml\n"
        "  store-gateway run --config /etc/store-gateway/store.yaml",
        formatter_class=_FORMATTER,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"store-gateway {__version__}",
        help="print 'store-gateway VERSION' and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the gateway with a config file", description=_RUN_HELP, formatter_class=_FORMATTER
    )
    run.add_argument("--config", "-c", type=Path, required=True, help="the store config (YAML)")
    run.add_argument(
        "--new-journal",
        action="store_true",
        help="start a new journal at seq 1 when both the journal and its seq reservation (journal.seq) are "
        "missing from a data directory used before; without it the gateway refuses to start then, since HQ "
        "would refuse the reused seqs (docs/OUTBOX.md, 'Lost journal')",
    )
    check = sub.add_parser(
        "check-config",
        help="validate a config file; exit 0 if valid, 1 with every error if not",
        description=_CHECK_HELP,
        formatter_class=_FORMATTER,
    )
    check.add_argument("file", type=Path, help="the store config (YAML)")
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="check a config away from its box: secrets this machine lacks (unset {env: NAME}, missing or "
        "unreadable {file: PATH}) and missing or unreadable TLS files are counted as not checked, not "
        "errors; everything else is checked",
    )
    schema = sub.add_parser(
        "config-schema",
        help="print the JSON Schema of the config (or of events)",
        description=_SCHEMA_HELP,
        formatter_class=_FORMATTER,
    )
    schema.add_argument("--events", action="store_true", help="print the event envelope schema instead")
    demo = sub.add_parser(
        "demo",
        help="embedded brokers, a simulated store, the gateway and an HQ receiver",
        description=_DEMO_HELP,
        formatter_class=_FORMATTER,
    )
    demo.add_argument(
        "--scenario",
        default="normal-day",
        help="a shipped scenario (normal-day, fridge-failure-night, defrost-cycle, returns-spike, shelf-shrink,"
        " late-and-absent, garbage-flood, device-unplugged) or a file",
    )
    demo.add_argument(
        "--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)"
    )
    demo.add_argument(
        "--rate",
        type=_till_rate,
        default=None,
        help="sales per second per till, above 0 and at most 100 (default: the scenario's own rate). Above"
        " about 2 the simulated HQ's reorders cannot keep up and stock may go negative",
    )
    demo.add_argument(
        "--data-dir", type=Path, default=None, help="keep the journal here (default: a temp dir)"
    )
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="print every device message, commit and HQ batch as a line stream instead of the live view",
    )
    broker = sub.add_parser(
        "broker",
        help="the store broker's device accounts (see 'broker provision --help')",
        description="The store broker (mosquitto): 'provision' writes its device accounts and ACL.",
        formatter_class=_FORMATTER,
    )
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    provision = broker_sub.add_parser(
        "provision",
        help="write mosquitto's password and ACL files: one account per MQTT device",
        description=_PROVISION_HELP,
        formatter_class=_FORMATTER,
    )
    provision.add_argument("--config", "-c", type=Path, required=True, help="the store config (YAML)")
    provision.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder of the 'passwd' and 'acl' files"
    )
    provision.add_argument(
        "--rotate",
        action="append",
        default=[],
        metavar="ID",
        help="give this account a new password even if it has one (repeatable)",
    )
    provision.add_argument(
        "--gateway-password-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the gateway's store-broker password (the file store_broker.password reads): its account gets"
        " it on every run and it is never printed; without it, the gateway's account is made like a device's",
    )
    rules = sub.add_parser(
        "rules",
        help="the store's local rules (see 'rules check --help')",
        description="The local rule engine's rules (docs/RULES.md): 'check' validates a file of rules.",
        formatter_class=_FORMATTER,
    )
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="COMMAND")
    rules_check = rules_sub.add_parser(
        "check",
        help="validate a file of rules; exit 0 if valid, 1 with every error if not",
        description="Validate a YAML file with a top-level 'rules:' list, as the store config's 'rules:' section"
        " takes it: every problem at once, with file:line, key path and a hint.\n\nexit codes:\n  0  valid\n"
        "  1  the file has problems\n  2  usage error\n\nexample:\n  store-gateway rules check rules.yaml",
        formatter_class=_FORMATTER,
    )
    rules_check.add_argument("file", type=Path, help="the rules (YAML, a top-level 'rules:' list)")
    rules_test = rules_sub.add_parser(
        "test",
        help="replay exported events through rules (a backtest); --against compares two rule sets",
        description="Replay events (one envelope per line, from 'store-gateway export', GET /api/events or HQ)"
        " through the rules in virtual time and print every alert they raise, clear or escalate, and the recorded"
        " acknowledgements of them, with their times. With --against, print only the differences: '-' only"
        " with RULES, '+' only with OTHER.\n\n"
        "exit codes:\n  0  done\n  1  a file has problems\n  2  usage error\n\nexamples:\n"
        "  store-gateway export --config store.yaml --since 2026-11-01 > events.jsonl\n"
        "  store-gateway rules test rules.yaml --events events.jsonl\n"
        "  store-gateway rules test rules.yaml --events events.jsonl --against stricter.yaml",
        formatter_class=_FORMATTER,
    )
    rules_test.add_argument("file", type=Path, help="the rules (YAML, a top-level 'rules:' list)")
    rules_test.add_argument("--events", type=Path, required=True, help="events, one JSON envelope per line")
    rules_test.add_argument("--against", type=Path, help="other rules to compare with")
    rules_test.add_argument(
        "--config",
        "-c",
        type=Path,
        help="the store's config, for its opening hours (default: always open) and geofence",
    )
    export = sub.add_parser(
        "export",
        help="print the journal's events, one JSON envelope per line",
        description="Print the events of the journal named by the config, in seq order, one envelope per line"
        " (as HQ receives them), recorded from --since (inclusive) to --until (exclusive), UTC. The gateway may"
        " be running.\n\nexample:\n  store-gateway export --config store.yaml --since 2026-11-01 > events.jsonl",
        formatter_class=_FORMATTER,
    )
    export.add_argument("--config", "-c", type=Path, required=True, help="the store config (YAML)")
    export.add_argument(
        "--since",
        type=_utc_time,
        help="from this time (ISO 8601, UTC unless it has an offset: 2026-11-01, 2026-11-01T08:00+08:00)",
    )
    export.add_argument("--until", type=_utc_time, help="before this time (as --since)")
    haccp = sub.add_parser(
        "haccp",
        help="write one fridge's HACCP temperature log for one day (CSV or JSON)",
        description=_HACCP_HELP,
        formatter_class=_FORMATTER,
    )
    haccp.add_argument("--config", "-c", type=Path, required=True, help="the store config (YAML)")
    haccp.add_argument("--device", required=True, help="the fridge's device id")
    haccp.add_argument(
        "--date", type=_local_date, required=True, help="the day, in the store's timezone: YYYY-MM-DD"
    )
    haccp.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (the default) or json")
    haccp.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="the file to write ('-': stdout)"
    )
    hash_token = sub.add_parser(
        "hash-token",
        help="the hash of a local page user's token, for api.users (token_sha256)",
        description="Print the SHA-256 of a token read from standard input (or typed, unseen), as api.users'"
        " token_sha256 takes it. The config keeps the hash; the user keeps the token. --new makes a token too.",
        formatter_class=_FORMATTER,
    )
    hash_token.add_argument("--new", action="store_true", help="make a new random token and print both")
    sub.add_parser("version", help="print the version", description=_VERSION_HELP, formatter_class=_FORMATTER)
    sub.add_parser("hq-receiver", help="HQ reference receiver (see 'hq-receiver --help')", add_help=False)
    sub.add_parser(
        "hq-command", help="send a command to a gateway from HQ (see 'hq-command --help')", add_help=False
    )
    sub.add_parser("simulate", help="device simulators (see 'simulate --help')", add_help=False)
    return parser


def _hash_token(new: bool) -> int:
    import getpass
    import hashlib
    import secrets

    if new:
        token = secrets.token_urlsafe(24)
        print(f"token: {token}")
    elif sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().strip()
    if len(token) < MIN_USER_TOKEN:
        print(f"store-gateway: a token needs {MIN_USER_TOKEN} characters at least", file=sys.stderr)
        return 2
    print(f"token_sha256: {hashlib.sha256(token.encode('utf-8')).hexdigest()}")
    return 0


def _till_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_DEMO_RATE:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_DEMO_RATE:g}, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of our output went away (``store-gateway config-schema | head``): not an error of ours.
        # Point stdout at /dev/null so Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["hq-receiver"]:
        from cloud_bridge.hq.receiver import receiver_main

        return receiver_main(args_list[1:])
    if args_list[:1] == ["hq-command"]:
        from cloud_bridge.hq.command import hq_command_main

        return hq_command_main(args_list[1:])
    if args_list[:1] == ["simulate"]:
        try:
            from simulators.cli import simulate_main
        except ImportError as err:  # the production image leaves the simulators out
            print(
                f"store-gateway simulate is not installed here ({err}): use a development install",
                file=sys.stderr,
            )
            return 2

        return simulate_main(args_list[1:])
    parser = _parser()
    if not args_list:
        parser.print_help()
        return 0
    args = parser.parse_args(args_list)
    if args.command == "version":
        print(f"store-gateway {__version__}")
        return 0
    if args.command == "hash-token":
        return _hash_token(args.new)
    if args.command == "check-config":
        from gateway.config_loader import check_config

        code, text = check_config(args.file, no_secrets=args.no_secrets)
        print(text)
        return code
    if args.command == "config-schema":
        if args.events:
            from gateway.kernel.events import envelope_json_schema

            print(json.dumps(envelope_json_schema(), indent=2))
        else:
            from gateway.config_loader import json_schema

            print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "run":
        return _run(args.config, new_journal=args.new_journal)
    if args.command == "rules":
        if args.rules_command == "test":
            return _rules_test(args.file, args.events, args.against, args.config)
        return _rules_check(args.file)
    if args.command == "haccp":
        return _haccp(args.config, args.device, args.date, args.format, args.out)
    if args.command == "export":
        return _export(args.config, args.since, args.until)
    if args.command == "broker":
        return _provision(args.config, args.out, args.rotate, args.gateway_password_file)
    if args.command == "demo":
        try:
            import amqtt  # noqa: F401 - the demo's embedded brokers

            from simulators.demo import run_demo
        except ImportError as err:  # the production image has neither the demo's brokers nor the simulators
            print(
                f"store-gateway demo needs the demo extra ({err}): pip install 'store-gateway[demo]'",
                file=sys.stderr,
            )
            return 2

        return run_demo(
            duration=args.duration,
            rate=args.rate,
            data_dir=args.data_dir,
            scenario=args.scenario,
            verbose=args.verbose,
        )
    return 2


def _rules_test(path: Path, events: Path, against: Path | None, config_path: Path | None) -> int:
    from gateway.config_loader import ConfigError, load_config
    from gateway.kernel.loader import DocumentError, DocumentKind, load_document
    from gateway.kernel.rule_config import RuleDefinition, RuleFile, StockLowAlerts
    from rules.backtest import difference, read_envelopes, replay

    hours = None
    location = None
    builtin: list[RuleDefinition] = []
    if config_path is not None:
        try:
            config = load_config(config_path, no_secrets=True)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 1
        hours, location = config.store.store_hours(), config.store.location
        builtin = [config.stock.low_alert]  # the stock.low alerts, as the store's config sets them
    else:
        builtin = [StockLowAlerts()]

    kind = DocumentKind("rules", "docs/RULES.md (examples)", 4 * 1024 * 1024)
    try:
        rule_sets = [load_document(p, RuleFile, kind).rules for p in (path, *([against] if against else []))]
        with events.open("rb") as fh:
            envelopes = list(read_envelopes(fh))
    except DocumentError as err:
        print(err)
        return 1
    except (OSError, ValueError) as err:
        print(f"store-gateway: {events}: {err}", file=sys.stderr)
        return 1
    try:
        outcomes = [replay([*builtin, *rules], envelopes, hours, location) for rules in rule_sets]
    except ValueError as err:
        print(f"store-gateway: {events}: {err}", file=sys.stderr)
        return 1
    lines = difference(*outcomes) if against else [o.line() for o in outcomes[0]]
    for line in lines:
        print(line)
    print(f"{len(envelopes)} event(s) replayed; {len(lines)} line(s)", file=sys.stderr)
    return 0


def _utc_time(text: str) -> str:
    """An ISO 8601 time (UTC unless it has an offset) written as the journal writes ``recorded_at``."""
    from cloud_bridge.hq.options import utc_time

    return utc_time(text).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _journal_of(config_path: Path) -> tuple[GatewayConfig, Path] | None:
    """The store config (its secrets not needed) and its journal's file; None, said on stderr, if either is
    missing or the config is invalid."""
    from gateway.config_loader import ConfigError, load_config
    from gateway.runtime import journal_path

    try:
        config = load_config(config_path, no_secrets=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None
    db = journal_path(config.data_dir)
    if not db.exists():
        print(f"store-gateway: no journal at {db}", file=sys.stderr)
        return None
    return config, db


def _export(config_path: Path, since: str | None, until: str | None) -> int:
    from gateway.kernel.journal.reader import export_bodies

    found = _journal_of(config_path)
    if found is None:
        return 1
    _, db = found
    out = sys.stdout.buffer
    for body in export_bodies(db.absolute().as_uri() + "?mode=ro", since, until):
        out.write(body + b"\n")
    out.flush()
    return 0


def _local_date(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is None or len(text) != len("YYYY-MM-DD"):
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (YYYY-MM-DD, e.g. 2026-11-01)")
    if not 1970 <= day.year <= 2999:  # rules.haccp_report.check_day (not imported here: the CLI starts fast)
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (years 1970 to 2999)")
    return day


def _haccp(config_path: Path, device: str, day: date, fmt: str, out: Path) -> int:
    import sqlite3
    import time

    from gateway.kernel.journal.reader import snapshot
    from gateway.ledger.documents import engine_rules
    from rules.haccp_report import as_csv, as_json, build_report, rules_in_force

    found = _journal_of(config_path)
    if found is None:
        return 1
    config, db = found
    try:
        with snapshot(db.absolute().as_uri() + "?mode=ro") as conn:
            conn.execute("BEGIN")  # one snapshot: the gateway may be writing
            report = build_report(
                conn,
                device,
                day,
                store_id=config.store.id,
                store_name=config.store.name,
                timezone=config.store.timezone,
                config=config.haccp,
                rules=rules_in_force(config.rules, engine_rules(conn)),
                now=time.time(),
            )
    except sqlite3.Error as err:
        print(f"store-gateway: cannot read the journal {db}: {err}", file=sys.stderr)
        return 1
    if report is None:
        print(f"store-gateway: no temperature log of device {device!r} in {db}", file=sys.stderr)
        return 1
    data = as_json(report) + b"\n" if fmt == "json" else as_csv(report).encode()
    if str(out) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    try:
        out.write_bytes(data)
    except OSError as err:
        print(f"store-gateway: cannot write {out}: {err}", file=sys.stderr)
        return 1
    print(
        f"{out}: {len(report['intervals'])} interval(s), {len(report['excursions'])} excursion(s)",
        file=sys.stderr,
    )
    return 0


def _rules_check(path: Path) -> int:
    from gateway.kernel.loader import DocumentError, DocumentKind, load_document
    from gateway.kernel.rule_config import RuleFile

    kind = DocumentKind("rules", "docs/RULES.md (examples)", 4 * 1024 * 1024)
    try:
        found = load_document(path, RuleFile, kind)
    except DocumentError as err:
        print(err)
        print(f"{len(err.issues)} problem(s) in {path}")
        return 1
    types = sorted({r.type for r in found.rules})
    print(f"OK: {path}: {len(found.rules)} rule(s){': ' + ', '.join(types) if types else ''}")
    return 0


def _run(config_path: Path, *, new_journal: bool = False) -> int:
    from gateway.config_loader import ConfigError, config_hash, load_config
    from gateway.kernel.logs import setup_logging
    from gateway.runtime import Gateway

    try:
        # check_files: what the config names but the machine lacks (a TLS file missing, unreadable, not PEM,
        # a key that does not match its certificate; an unreadable stock CSV) is said now, with the line of
        # the key, rather than retried forever. The same check as check-config.
        config = load_config(config_path, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        print(f"store-gateway: {len(err.issues)} problem(s) in {config_path}: not started", file=sys.stderr)
        return 1
    setup_logging(config.log.level, config.log.format)

    started = False

    async def _main() -> None:
        nonlocal started
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(config, config_hash(config), new_journal=new_journal, config_path=config_path)
        try:
            await gateway.run(stop)
        finally:
            # Up: every task running, and the local API listening (a port taken is found only there).
            started = gateway.started.is_set() and (not config.api.enabled or gateway.api_port is not None)

    try:
        asyncio.run(_main())
    except BaseException as err:
        # Before the gateway is up, its own errors (a port taken, a journal it cannot open, a bad stock CSV)
        # are the technician's to fix: said in one line. Anything later, or anything else, keeps its traceback.
        known = [] if started else _startup_failures(err)
        if not known:
            raise
        for failure in known:
            print(f"store-gateway: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0


def _provision(config_path: Path, out: Path, rotate: list[str], gateway_password_file: Path | None) -> int:
    """``broker provision``: new passwords go to stdout only, once; problems to stderr."""
    from gateway.broker_accounts import (
        ACL_FILE,
        BROKER_MAX_PACKET_BYTES,
        USERS_FILE,
        ProvisionError,
        provision,
        read_secret,
    )
    from gateway.config_loader import ConfigError, load_config

    try:
        # Without secrets: provisioning reads none of them, and may run where they are not (systemd hands the
        # gateway its secrets only while it runs).
        config = load_config(config_path, no_secrets=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        print(
            f"store-gateway: {len(err.issues)} problem(s) in {config_path}: nothing written", file=sys.stderr
        )
        return 1
    try:
        gateway_password = None if gateway_password_file is None else read_secret(gateway_password_file)
        done = provision(
            config, out, source=str(config_path), rotate=rotate, gateway_password=gateway_password
        )
    except (ProvisionError, OSError) as err:
        print(f"store-gateway: {err}", file=sys.stderr)
        return 1
    gateway_user = done.accounts[0].username
    if done.new_passwords:
        print("New passwords, shown only this once (give each device its own; nothing else keeps them):")
        width = max(len(name) for name, _ in done.new_passwords)
        for name, password in done.new_passwords:
            note = "   <- the gateway's: store_broker.password" if name == gateway_user else ""
            print(f"  {name:<{width}}  {password}{note}")
    if done.kept:
        print(f"Kept the passwords of: {', '.join(done.kept)}")
    if gateway_password is not None:
        print(f"{gateway_user}: the password in {gateway_password_file}")
    if done.removed:
        print(f"Removed the accounts of: {', '.join(done.removed)} (no longer in the config)")
    for name in done.unrouted:
        print(
            f"warning: {name}: no MQTT route carries its profile: its account can publish nothing",
            file=sys.stderr,
        )
    for name, size in done.too_large:
        print(
            f"warning: {name}: the gateway accepts messages from it up to a {size}-byte packet, over the broker's"
            f" max_packet_size {BROKER_MAX_PACKET_BYTES}: raise max_packet_size in mosquitto.conf, or lower"
            " max_payload_bytes",
            file=sys.stderr,
        )
    print(
        f"Wrote {out / USERS_FILE} and {out / ACL_FILE} ({len(done.accounts) - 1} device account(s) and"
        f" {gateway_user}). Make mosquitto read them again: SIGHUP, or restart it."
    )
    return 0


def _startup_failures(err: BaseException) -> list[BaseException]:
    """The gateway's own errors (port taken, journal unreadable, bad stock CSV...), out of exception groups. A
    group with anything else in it is a bug: it keeps its traceback."""
    from gateway.kernel.errors import StoreGatewayError

    if isinstance(err, BaseExceptionGroup):
        found = [f for sub in err.exceptions for f in _startup_failures(sub)]
        return found if len(found) == len(err.exceptions) else []
    return [err] if isinstance(err, StoreGatewayError) else []


if __name__ == "__main__":
    raise SystemExit(main())
