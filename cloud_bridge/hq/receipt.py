"""``store-gateway hq-receiver receipt``: prove that a receipt reached HQ.

It prints what HQ holds for the receipt (:meth:`SqlReceiverStore.receipt`) and whether HQ has every event of its
gateway up to it, as text or one JSON document; the exit status says which (see the epilog).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from cloud_bridge.hq.options import checked_id, database_options, lost_grace_option, read_store
from cloud_bridge.hq.report import format_ranges
from cloud_bridge.hq.sql_receipts import RECEIPT_MATCH, GatewayCompleteness, ReceiptEvent, ReceiptProof

RECEIPT_FOUND: Final = 0
RECEIPT_NOT_FOUND: Final = 1
RECEIPT_LOST_BELOW: Final = 2
_RECEIPT_STATUS: Final = {
    RECEIPT_FOUND: "found",
    RECEIPT_NOT_FOUND: "not_found",
    RECEIPT_LOST_BELOW: "lost_below",
}
_RECEIPT_NO: Final = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
"""A receipt number as gateways accept it (gateway/kernel/events.py ``ShortText``)."""

_RECEIPT_EPILOG: Final = """\
A receipt is the pos.sale or pos.return that DEVICE sent with this receipt_no; returns from any device
of the store naming it as original_receipt_no are listed too. For each gateway holding the receipt, the
seqs HQ misses up to the receipt's seq are shown by class: lost (the gateway said it delivered them),
pending (still on the way) and explained (the gateway reported them evicted). When HQ has no such receipt,
every gateway of the store is shown up to its highest seq: a pending gap may still bring it.

exit status:
  0  HQ holds the receipt, and no seq of its gateway up to it is lost
  1  HQ has no such receipt (or the database cannot be read)
  2  HQ holds the receipt, but seqs of its gateway below it are lost (as --report counts them)
     (argparse also exits 2 for a bad command line, with a usage message on stderr)
"""


def _receipt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver receipt",
        description="Prove that a receipt reached HQ: print what HQ holds for it (gateway, seq, kind,\n"
        "event id, occurred_at, recorded_at, when HQ received it) and whether HQ has every event of its\n"
        "gateway up to it.",
        epilog=_RECEIPT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", required=True, type=checked_id, help="store id")
    parser.add_argument("--device", required=True, type=checked_id, help="the till's device id")
    parser.add_argument(
        "--receipt", required=True, type=_checked_receipt_no, metavar="RECEIPT_NO", help="receipt number"
    )
    database_options(parser)
    lost_grace_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _checked_receipt_no(text: str) -> str:
    if not _RECEIPT_NO.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not a receipt number (1 to 64 characters, no control characters)"
        )
    return text


def receipt_status(proof: ReceiptProof) -> int:
    """The exit status of ``hq-receiver receipt`` (see its epilog)."""
    if not proof.found:
        return RECEIPT_NOT_FOUND
    return RECEIPT_LOST_BELOW if proof.lost_below else RECEIPT_FOUND


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event_document(event: ReceiptEvent) -> dict[str, Any]:
    return {
        "match": event.match,
        "store_id": event.store_id,
        "gateway_id": event.gateway_id,
        "seq": event.seq,
        "kind": event.kind,
        "id": event.id,
        "device_id": event.device_id,
        "receipt_no": event.receipt_no,
        "original_receipt_no": event.original_receipt_no,
        "register_id": event.register_id,
        "occurred_at": event.occurred_at,
        "recorded_at": event.recorded_at,
        "corrected_at": None if event.corrected_at is None else _utc_text(event.corrected_at),
        "received_at": _utc_text(event.received_at),
    }


def _gateway_document(gateway: GatewayCompleteness) -> dict[str, Any]:
    gaps = gateway.gaps
    return {
        "store_id": gateway.store_id,
        "gateway_id": gateway.gateway_id,
        "holds_receipt": gateway.holds_receipt,
        "through_seq": gateway.through_seq,
        "missing": gateway.missing,
        "lost": [list(r) for r in gaps.lost],
        "pending": [list(r) for r in gaps.pending],
        "explained": [list(r) for r in gaps.explained],
    }


def receipt_document(proof: ReceiptProof) -> dict[str, Any]:
    """``hq-receiver receipt --json``: ``status`` is found, lost_below or not_found (exit 0, 2, 1)."""
    return {
        "store_id": proof.store_id,
        "device_id": proof.device_id,
        "receipt_no": proof.receipt_no,
        "found": proof.found,
        "status": _RECEIPT_STATUS[receipt_status(proof)],
        "events": [_event_document(e) for e in proof.events],
        "gateways": [_gateway_document(g) for g in proof.gateways],
    }


def format_completeness(gateway: GatewayCompleteness) -> str:
    """ "HQ has every event of gateway G up to seq N; 0 missing", or what it misses up to N, by class."""
    name, through = gateway.gateway_id, gateway.through_seq
    if not gateway.missing:
        return f"HQ has every event of gateway {name} up to seq {through}; 0 missing"
    parts = [
        f"{label} {format_ranges(ranges)}"
        for label, ranges in (
            ("lost", gateway.gaps.lost),
            ("pending", gateway.gaps.pending),
            ("explained", gateway.gaps.explained),
        )
        if ranges
    ]
    return (
        f"HQ is missing {gateway.missing} event(s) of gateway {name} up to seq {through}: {'; '.join(parts)}"
    )


def format_receipt(proof: ReceiptProof) -> str:
    """The text ``hq-receiver receipt`` prints."""
    own = sum(e.match == RECEIPT_MATCH for e in proof.events)
    verdict = f"at HQ ({own} event(s))" if proof.found else "HQ has no such receipt"
    lines = [f"receipt {proof.receipt_no} of device {proof.device_id} in store {proof.store_id}: {verdict}"]
    for e in proof.events:
        if e.match == RECEIPT_MATCH:
            what = "the receipt"
        else:
            what = f"receipt {e.receipt_no} of device {e.device_id} returns it"
        lines.append(f"  {e.kind:<10}  gateway {e.gateway_id} seq {e.seq}  event {e.id}  ({what})")
        times = [f"occurred_at {e.occurred_at or '-'}", f"recorded_at {e.recorded_at}"]
        if e.corrected_at is not None:
            times.append(f"corrected_at {_utc_text(e.corrected_at)}")
        times.append(f"received_at {_utc_text(e.received_at)}")
        lines.append("      " + "  ".join(times))
    lines += [format_completeness(g) for g in proof.gateways]
    if not proof.found and not proof.gateways:
        lines.append(f"HQ has no event of store {proof.store_id}")
    return "\n".join(lines)


def receipt_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver receipt``: what HQ holds for a receipt; exit 0, 1 or 2 (see the epilog)."""
    args = _receipt_parser().parse_args(argv)
    proof = read_store(args, lambda store: store.receipt(args.store, args.device, args.receipt))
    if proof is None:
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(receipt_document(proof), option=orjson.OPT_APPEND_NEWLINE).decode())
        sys.stdout.flush()
    else:
        print(format_receipt(proof), flush=True)
    return receipt_status(proof)
