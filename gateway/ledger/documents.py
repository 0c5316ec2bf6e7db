"""Storing the documents HQ sends down (roster, planogram, rules) in the journal database.

A document is replaced whole by a downlink command (``roster.set``, ``planogram.set``, ``rules.set``; their
schema is :mod:`cloud_bridge.documents`) and kept in the ``documents`` table of the journal, one row per name
with a version that counts up from 1. Storing a document and committing its ``document.updated`` event happen
in one SQLite transaction (the journal's ``transact``), so the event and the stored document can never disagree.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson
from pydantic import TypeAdapter, ValidationError

from cloud_bridge.documents import MODELS, AnyRule, Document, DocumentName, Planogram, Roster, RuleSet
from gateway.kernel.journal import Draft, key_committed
from gateway.kernel.rule_config import RuleDefinition

_LOGGER = logging.getLogger(__name__)

_ANY_RULE: Final[TypeAdapter[AnyRule]] = TypeAdapter(AnyRule)

SCHEMA: Final = """CREATE TABLE IF NOT EXISTS documents(
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    request_id TEXT NOT NULL,
    updated_at TEXT NOT NULL
)"""
"""One statement, run with ``execute``: ``executescript`` would COMMIT the transaction it runs in."""


def create_table(conn: sqlite3.Connection) -> None:
    """Safe inside a transaction (DDL is transactional in SQLite)."""
    conn.execute(SCHEMA)


@dataclass(frozen=True, slots=True)
class Stored:
    """What a document command did: the version now in force, its entry count, and whether it was a replay."""

    version: int
    count: int
    duplicate: bool = False


def read_document(conn: sqlite3.Connection, name: DocumentName) -> tuple[int, bytes, str] | None:
    """(version, body JSON, request id) of the current document, or None if HQ never sent one."""
    row = conn.execute("SELECT version, body, request_id FROM documents WHERE name=?", (name,)).fetchone()
    return None if row is None else (int(row[0]), bytes(row[1]), str(row[2]))


def read_rules(conn: sqlite3.Connection) -> RuleSet | None:
    """The rules in force. Each stored rule is read on its own: one that no longer validates (a rule type or
    a check this release does not know) is logged and left out, and the others, the stock thresholds among them,
    stay in force."""
    found = read_document(conn, "rules")
    if found is None:
        return None
    try:
        return RuleSet.model_validate_json(found[1])
    except ValidationError:
        pass
    try:
        items = orjson.loads(found[1]).get("rules", [])
    except (orjson.JSONDecodeError, AttributeError):
        _LOGGER.error("stored rules version %d are unreadable and ignored", found[0])
        return None
    kept = []
    for item in items if isinstance(items, list) else []:
        try:
            kept.append(_ANY_RULE.validate_python(item))
        except ValidationError as err:
            rule_id = item.get("id") if isinstance(item, dict) else None
            _LOGGER.error(
                "stored rules version %d: rule %r is not valid here and is left out (%d error(s))",
                found[0],
                str(rule_id)[:64],
                err.error_count(),
            )
    try:
        return RuleSet(rules=kept)
    except ValidationError as err:
        _LOGGER.error(
            "stored rules version %d are unreadable and ignored: %d error(s)", found[0], err.error_count()
        )
        return None


def engine_rules(conn: sqlite3.Connection) -> list[RuleDefinition]:
    """The rule engine's rules in HQ's ``rules`` document (none before HQ sends one)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='documents'").fetchone()
    rules = read_rules(conn) if exists else None
    return [] if rules is None else rules.engine_rules


def planogram(conn: sqlite3.Connection) -> Planogram | None:
    """HQ's planogram in force, for the RFID shelf rules (None before HQ sends one, or if it is unreadable)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='documents'").fetchone()
    found = read_document(conn, "planogram") if exists else None
    if found is None:
        return None
    try:
        return Planogram.model_validate_json(found[1])
    except ValidationError as err:
        _LOGGER.error(
            "stored planogram version %d is unreadable and ignored: %d error(s)", found[0], err.error_count()
        )
        return None


def roster(conn: sqlite3.Connection) -> Roster | None:
    """HQ's roster in force, for the attendance rules (None before HQ sends one, or if it is unreadable)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='documents'").fetchone()
    found = read_document(conn, "roster") if exists else None
    if found is None:
        return None
    try:
        return Roster.model_validate_json(found[1])
    except ValidationError as err:
        _LOGGER.error(
            "stored roster version %d is unreadable and ignored: %d error(s)", found[0], err.error_count()
        )
        return None


def store_work(
    name: DocumentName,
    document: Document,
    request_id: str,
    dedup_key: str,
    then: Callable[[sqlite3.Connection], None] | None = None,
) -> Callable[[sqlite3.Connection], tuple[Stored, list[Draft]]]:
    """Work for :meth:`gateway.kernel.journal.Journal.transact`: store ``document`` as the next version of ``name``, run
    ``then`` (in the same transaction), and return the ``document.updated`` draft that commits with it.

    A replay (an event with ``dedup_key`` is committed, or the current version came from this request) changes
    nothing and answers the current version as a duplicate."""
    body = document.model_dump_json().encode()

    def work(conn: sqlite3.Connection) -> tuple[Stored, list[Draft]]:
        create_table(conn)
        current = read_document(conn, name)
        if key_committed(conn, dedup_key) or (current is not None and current[2] == request_id):
            version = 0 if current is None else current[0]
            return Stored(version, _count(name, current), duplicate=True), []
        version = 1 if current is None else current[0] + 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        conn.execute(
            "INSERT OR REPLACE INTO documents(name, version, body, request_id, updated_at) VALUES (?,?,?,?,?)",
            (name, version, body, request_id, now),
        )
        if then is not None:
            then(conn)
        data = {"name": name, "version": version, "count": document.count, "request_id": request_id}
        draft = Draft("document.updated", None, orjson.dumps(data), dedup_key=dedup_key, driver="downlink")
        return Stored(version, document.count), [draft]

    return work


def _count(name: DocumentName, current: tuple[int, bytes, str] | None) -> int:
    if current is None:
        return 0
    try:
        return MODELS[name].model_validate_json(current[1]).count
    except ValidationError:
        return 0
