"""``store-gateway hq-receiver``: run the HQ reference receiver
(:class:`~cloud_bridge.hq.service.HqReceiver`), print ``--report`` on its database, or prove that a receipt
reached HQ (``receipt``: :mod:`cloud_bridge.hq.receipt`).

:func:`receiver_main` is the command; the options it shares with the other HQ tools, and what they turn into,
are in :mod:`cloud_bridge.hq.options`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Final

from cloud_bridge.commands import MAX_RESEND_RANGES
from cloud_bridge.hq.export import export_main
from cloud_bridge.hq.model import StoreUnavailableError
from cloud_bridge.hq.options import (
    CliError,
    broker_config,
    command_signer,
    database_options,
    lost_grace_option,
    open_store,
    positive,
    signing_options,
    store_list,
    whole_number,
)
from cloud_bridge.hq.receipt import receipt_main
from cloud_bridge.hq.report import conflict_alarms, print_conflicts, print_report, print_summary
from cloud_bridge.hq.resend import MAX_RESEND_COMMANDS
from cloud_bridge.hq.service import DEFAULT_CLIENT_ID, HqReceiver, sleep_unless
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.signing import CommandSigner
from gateway.kernel.config import BrokerConfig

_LOGGER = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY_S: Final = 7 * 24 * 3600


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver",
        description=(
            "HQ reference receiver: stores every gateway's batches once (SQLite, or PostgreSQL for several"
            " receivers), classifies missing seqs (explained, lost, pending) and can ask for lost ones."
        ),
        epilog="'store-gateway hq-receiver receipt --help': prove that a receipt reached HQ.\n"
        "'store-gateway hq-receiver export --help': a store's events, for 'store-gateway rules test'.",
    )
    broker = parser.add_argument_group("HQ broker")
    broker.add_argument("--host", default="127.0.0.1", help="HQ broker host (default: %(default)s)")
    broker.add_argument("--port", type=int, default=1883, help="HQ broker port (default: %(default)s)")
    broker.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (default: 5)")
    broker.add_argument("--prefix", default="retail", help="HQ topic prefix (default: %(default)s)")
    broker.add_argument(
        "--client-id",
        default=DEFAULT_CLIENT_ID,
        help="MQTT client id: fixed across restarts, and different for each receiver (default: %(default)s)",
    )
    broker.add_argument(
        "--share-group",
        metavar="GROUP",
        help="subscribe through the MQTT shared subscription $share/GROUP/...: receivers of one group split the"
        " batches. Not with mosquitto 2.0, which forgets an absent member's shared subscription when the broker"
        " restarts (the batches of that time are lost to HQ); default: a plain subscription",
    )
    broker.add_argument(
        "--no-share", action="store_true", help="a plain subscription (the default; overrides --share-group)"
    )
    broker.add_argument(
        "--stores",
        type=store_list,
        metavar="ID[,ID...]",
        help="only these stores' batches (<prefix>/<store>/+/events each): receivers with plain subscriptions"
        " split the stores between them, every store in exactly one receiver's list (default: every store)",
    )
    parser.add_argument(
        "--resend-ranges",
        type=whole_number(1, MAX_RESEND_RANGES),
        default=MAX_RESEND_RANGES,
        metavar=f"1..{MAX_RESEND_RANGES}",
        help="ranges per resend command (default: %(default)s); 1 sends single-range commands, up to"
        f" {MAX_RESEND_COMMANDS} per round, for gateways of before multi-range resends",
    )
    broker.add_argument(
        "--session-expiry",
        type=int,
        default=DEFAULT_SESSION_EXPIRY_S,
        metavar="SECONDS",
        help="how long the broker keeps this receiver's session, and queues its batches, while it is away (MQTT"
        " 5; default: %(default)s, 7 days). Shorter for a receiver that may be retired. mosquitto 2.0 forgets an"
        " absent member's shared subscription when the broker restarts: with it, do not use --share-group",
    )
    broker.add_argument("--ca-file", type=Path, help="CA bundle that signed the broker's certificate (TLS)")
    broker.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS), with --key-file")
    broker.add_argument("--key-file", type=Path, help="client private key (mutual TLS), with --cert-file")
    broker.add_argument("--username", help="MQTT user name")
    broker.add_argument("--password-file", type=Path, help="file holding the MQTT password (never logged)")
    database_options(parser)
    parser.add_argument(
        "--resend",
        action="store_true",
        help="publish a 'resend' command to a gateway for its lost seqs (needs --signing-key and --key-id)",
    )
    signing_options(parser)
    parser.add_argument(
        "--resend-interval",
        type=positive,
        default=30.0,
        metavar="SECONDS",
        help="ask again for a still-lost range after SECONDS (default: %(default)s)",
    )
    lost_grace_option(parser)
    parser.add_argument(
        "--summary-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="print the per-gateway summary every SECONDS; 0 disables (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the summary and the missing seqs by class, and exit: 0, or 2 if any seq is lost or conflicts",
    )
    return parser


async def _serve(
    args: argparse.Namespace, broker: BrokerConfig, store: SqlReceiverStore, signer: CommandSigner | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    receiver = HqReceiver(
        broker,
        store,
        prefix=args.prefix,
        client_id=args.client_id,
        share_group=None if args.no_share else args.share_group,
        resend_interval_s=args.resend_interval if args.resend else None,
        resend_ranges=args.resend_ranges,
        stores=args.stores,
        signer=signer,
    )
    if args.share_group is not None and not args.no_share:
        _LOGGER.warning(
            "SHARED SUBSCRIPTION (--share-group %s): mosquitto 2.0 drops the shared subscription of a member that"
            " is away when the broker restarts, and the batches of that time reach no receiver (the gateways"
            " count them delivered). Use it only on a broker that persists shared subscriptions (EMQX), or run"
            " with --resend; with mosquitto, split the stores with --stores instead (docs/HQ-RECEIVER.md,"
            " 'HQ topology')",
            args.share_group,
        )
    if not args.resend:
        _LOGGER.warning("--resend is off: lost seqs are reported (--report) but not asked for again")
    else:
        _LOGGER.info("resend commands are signed with key %s", args.key_id)
    try:
        async with asyncio.TaskGroup() as tg:
            if args.summary_every > 0:
                tg.create_task(
                    _print_summaries(receiver, stop, args.summary_every), name="hq-receiver-summary"
                )
            await receiver.run(stop)
            stop.set()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _print_summaries(receiver: HqReceiver, stop: asyncio.Event, every: float) -> None:
    seen: dict[tuple[str, str], int] = {}
    while not await sleep_unless(stop, every):
        try:
            rows = await receiver.summary()
        except StoreUnavailableError as err:
            _LOGGER.warning("cannot read the summary: %s", err)
            continue
        print_summary(rows)
        for line in conflict_alarms(rows, seen):
            print(line, flush=True)
            _LOGGER.warning("%s", line)


def receiver_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver``: run the receiver, or ``--report`` on an existing database, or
    ``receipt ...`` (:func:`receipt_main`), or ``export ...`` (:func:`export_main`)."""
    if argv[:1] == ["receipt"]:
        return receipt_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.report and not args.postgres and not args.db.exists():
        print(f"hq-receiver: no database at {args.db}", file=sys.stderr)
        return 1
    try:
        broker = None if args.report else broker_config(args)
        signer = command_signer(args, "--resend" if args.resend and not args.report else None)
        store = open_store(args)
    except (CliError, StoreUnavailableError) as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    try:
        if broker is None:
            failed = print_report(store, sys.stdout)
            conflicting = print_conflicts(store, sys.stdout)
            return 2 if failed or conflicting else 0
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(_serve(args, broker, store, signer))
    except StoreUnavailableError as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    else:
        return 0
    finally:
        store.close()
