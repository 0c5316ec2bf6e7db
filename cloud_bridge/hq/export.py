"""``store-gateway hq-receiver export``: a store's events as HQ holds them, one envelope per line.

The envelopes are the gateways' own bodies, as received, in (gateway, seq) order, for the events recorded in
``[--from, --to)``. It is what ``store-gateway rules test`` replays: HQ can see what a rule change would have done
in a store last month before it pushes the change.
"""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

from cloud_bridge.hq.model import LOST_GRACE_S
from cloud_bridge.hq.options import checked_id, database_options, read_store, utc_time
from cloud_bridge.hq.sql import SqlReceiverStore

PAGE = 5000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver export",
        description="Print a store's events as HQ holds them, one JSON envelope per line, in (gateway, seq)\n"
        "order, recorded from --from (inclusive) to --to (exclusive). For 'store-gateway rules test'.\n\n"
        "example:\n  store-gateway hq-receiver export --store hk-cwb-012 --from 2026-11-01 --to 2026-12-01"
        " > events.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", required=True, type=checked_id, help="store id")
    parser.add_argument(
        "--from",
        dest="since",
        type=utc_time,
        help="from this time (ISO 8601, UTC unless it has an offset: 2026-11-01, 2026-11-01T08:00+08:00)",
    )
    parser.add_argument("--to", dest="until", type=utc_time, help="before this time (as --from)")
    database_options(parser)
    parser.set_defaults(lost_grace=LOST_GRACE_S)  # the store's setting; export classifies no gaps
    return parser


def write_export(store: SqlReceiverStore, args: argparse.Namespace, out: BinaryIO) -> int:
    """Write the envelopes; the number written."""
    after, written = ("", 0), 0
    while True:
        page = store.export_page(args.store, args.since, args.until, after, PAGE)
        for _, _, body in page:
            out.write(body.rstrip(b"\n") + b"\n")
        written += len(page)
        if len(page) < PAGE:
            return written
        after = page[-1][0], page[-1][1]


def export_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver export``: exit 0, or 1 when the database cannot be read."""
    args = _parser().parse_args(argv)
    written = read_store(args, lambda store: write_export(store, args, sys.stdout.buffer))
    if written is None:
        return 1
    sys.stdout.buffer.flush()
    print(f"{written} event(s) of store {args.store}", file=sys.stderr)
    return 0
