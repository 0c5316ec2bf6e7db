"""The HQ receiver's tables, written once for SQLite and PostgreSQL: ``{int}``, ``{time}``... are each
database's types (:class:`~cloud_bridge.hq.sql_base.Dialect`), and the schema upgrades; the receipt columns
and what they hold (:func:`receipt_fields`). :mod:`cloud_bridge.hq.sql` tells what each table is for.
"""

from __future__ import annotations

from typing import Any, Final

from cloud_bridge.hq.model import MAX_TEXT_ID

SCHEMA_VERSION: Final = 3

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    seq {int} NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    recorded_at {time} NOT NULL,
    received_at {time} NOT NULL,
    boot_id TEXT,
    mono_ns {int},
    clock_synced {bool},
    corrected_ns {int},
    anchor_mono_ns {int},
    corrected_at {corrected_at},
    body {blob} NOT NULL,
    receipt_no TEXT,
    original_receipt_no TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_store_gateway_seq ON events (store_id, gateway_id, seq);
CREATE INDEX IF NOT EXISTS events_unsynced ON events (store_id, gateway_id, boot_id) WHERE NOT clock_synced;
CREATE TABLE IF NOT EXISTS gateways (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    max_seq {int} NOT NULL DEFAULT 0,
    complete_through {int},
    events {int} NOT NULL DEFAULT 0,
    duplicates {int} NOT NULL DEFAULT 0,
    conflicts {int} NOT NULL DEFAULT 0,
    bad_reports {int} NOT NULL DEFAULT 0,
    newest_recorded_at {time},
    last_received_at {time},
    resend_at_ms {int},
    resend_commands {int} NOT NULL DEFAULT 0,
    mark_through {int} NOT NULL DEFAULT 0,
    mark_at {time},
    lost_through {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, gateway_id)
);
CREATE TABLE IF NOT EXISTS runs (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    first_seq {int} NOT NULL,
    last_seq {int} NOT NULL,
    PRIMARY KEY (store_id, gateway_id, first_seq)
);
CREATE INDEX IF NOT EXISTS runs_last ON runs (store_id, gateway_id, last_seq);
CREATE TABLE IF NOT EXISTS explained (
    event_id TEXT NOT NULL,
    first_seq {int} NOT NULL,
    last_seq {int} NOT NULL,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (event_id, first_seq)
);
CREATE INDEX IF NOT EXISTS explained_gateway ON explained (store_id, gateway_id, first_seq);
CREATE TABLE IF NOT EXISTS anchors (
    event_id TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    mono_ns {int} NOT NULL,
    utc_ns {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS anchors_boot ON anchors (store_id, gateway_id, boot_id);
CREATE TABLE IF NOT EXISTS rejected (
    id {identity},
    received_at {time} NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size {int} NOT NULL
)
"""

POS_KINDS: Final = ("pos.sale", "pos.return")
"""The kinds that carry a receipt (docs/EVENTS.md)."""
IS_POS: Final = "kind IN ('pos.sale', 'pos.return')"
"""The one spelling of "a sale or a return", in the unfilled index and the query that must match it."""
RECEIPT_COLUMNS: Final = ("receipt_no", "original_receipt_no")
RECEIPT_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS events_receipt ON events (store_id, device_id, receipt_no)"
    " WHERE receipt_no IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_original_receipt ON events (store_id, original_receipt_no)"
    " WHERE original_receipt_no IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_receipt_unfilled ON events (store_id)"
    f" WHERE receipt_no IS NULL AND {IS_POS}",
)
"""Created after the columns are filled (:mod:`cloud_bridge.hq.sql`); ``IF NOT EXISTS``: every open runs them."""

CONFLICTS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS conflicts (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    seq {int} NOT NULL,
    id TEXT NOT NULL,
    kept_id TEXT,
    kind TEXT NOT NULL,
    received_at {time} NOT NULL,
    body {blob} NOT NULL,
    PRIMARY KEY (store_id, gateway_id, seq, id)
)"""
"""Events that came under a seq another event id already holds (or whose id is stored at another seq): kept
here beside the stored one, never dropped. Created on every open (``IF NOT EXISTS``) rather than by a schema
number: it only adds, so an older receiver still opens the database (and does not fill it)."""
SINGLE_RANGE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS single_range (
    store_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    marked_at_ms {int} NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (store_id, gateway_id)
)"""
"""Gateways that refused a multi-range ``resend`` (a release of before ``ranges``): asked one range per command.
Created on every open, like ``conflicts``."""
SUBSCRIPTIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    PRIMARY KEY (client_id, topic)
)"""
"""The topic filters each receiver (by MQTT client id) has subscribed in its persistent session, so a receiver
started with other ``--stores`` (or share group) unsubscribes the ones it no longer wants: a broker keeps a
session's subscriptions, and MQTT cannot list them."""
UPGRADE_2: Final = (
    "ALTER TABLE gateways ADD COLUMN mark_through {int} NOT NULL DEFAULT 0",
    "ALTER TABLE gateways ADD COLUMN mark_at {time}",
    "ALTER TABLE gateways ADD COLUMN lost_through {int} NOT NULL DEFAULT 0",
    "UPDATE gateways SET lost_through = coalesce(complete_through, 0)",  # what schema 2 called lost
    "UPDATE meta SET value = '3' WHERE key = 'schema'",
)
"""Schema 2 to 3: when missing seqs count as lost."""


def receipt_fields(kind: str, event: dict[str, Any]) -> tuple[str | None, str | None]:
    """(receipt_no, original_receipt_no) of a sale or return, each None when absent or not a receipt number
    (a string of 1..64 characters without NUL): what the receipt columns hold."""
    if kind not in POS_KINDS:
        return None, None
    data = event.get("data")
    if not isinstance(data, dict):
        return None, None
    original = data.get("original_receipt_no") if kind == "pos.return" else None
    return _receipt_text(data.get("receipt_no")), _receipt_text(original)


def _receipt_text(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT_ID and "\x00" not in value:
        return value
    return None
