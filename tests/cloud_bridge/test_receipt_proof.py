"""Proving that a receipt reached HQ, against real peers.

At HQ: ``store-gateway hq-receiver receipt`` and :meth:`SqlReceiverStore.receipt` on a real SQLite file and a
real PostgreSQL server (tests/harness/pg.py): the receipt, the returns naming it, the gap classes of its gateway up to
it, exit codes, text and JSON, the lookup's indexes, and databases from before the receipt columns.
At the store: ``GET /api/receipts/{device_id}/{receipt_no}`` over real HTTP, on a real journal (the delivered
watermark flips when HQ acknowledges) and on a running gateway with mosquitto and the HQ receiver.
Every wait is a poll for a condition; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from cloud_bridge.hq.postgres import PostgresReceiverStore
from cloud_bridge.hq.ranges import GapClasses
from cloud_bridge.hq.receipt import format_completeness, format_receipt, receipt_status
from cloud_bridge.hq.receiver import receiver_main
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sql_receipts import _BY_ORIGINAL, _BY_RECEIPT, _UNFILLED, GatewayCompleteness
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from gateway.api import create_app
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.outbox import TRANSACTION
from tests.cloud_bridge.hq.test_receiver import batch_of, envelope
from tests.gateway.test_api import TOKEN
from tests.gateway.test_api import running as running_api
from tests.harness.brokers import Mosquitto
from tests.harness.driver_harness import running_journal
from tests.harness.e2e_helpers import (
    AUTH,
    GATEWAY_ID,
    STORE_ID,
    TERMINALS,
    load,
    poll_until,
    publish_and_wait,
    running_gateway,
    running_receiver,
    sale_payload,
    write_config,
)
from tests.harness.pg import PostgresServer, session_server

S, G, G2 = "hk-001", "gw-a", "gw-b"
TILL, TILL2 = "till-1", "till-2"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


@dataclass
class Hq:
    """An HQ database and the command-line options that name it."""

    store: SqlReceiverStore
    args: list[str]
    reopen: Callable[[], SqlReceiverStore]


@pytest.fixture(params=["sqlite", "postgres"])
def hq(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hq]:
    """A single receiver's database: a missing seq at or below complete_through is lost at once (no grace)."""
    if request.param == "sqlite":
        path = tmp_path / "hq.db"
        args = ["--db", str(path)]

        def reopen() -> SqlReceiverStore:
            return SqliteReceiverStore(path, lost_grace_s=0)
    else:
        dsn = request.getfixturevalue("postgres").fresh_schema()
        args = ["--postgres", dsn]

        def reopen() -> SqlReceiverStore:
            return PostgresReceiverStore(dsn, lost_grace_s=0)

    handle = Hq(reopen(), args, reopen)
    yield handle
    handle.store.close()


def pos(
    seq: int,
    receipt_no: str,
    *,
    kind: str = "pos.sale",
    device: str = TILL,
    original: str | None = None,
    store: str = S,
    gateway: str = G,
) -> bytes:
    """A sale (or a return naming ``original``) as a gateway sends it."""
    data: dict[str, Any] = {
        "receipt_no": receipt_no,
        "register_id": "reg-1",
        "cashier_id": None,
        "currency": "HKD",
        "lines": [{"sku": "SKU-1", "gtin": None, "quantity": "1", "unit_price": "9.90", "discount": "0"}],
        "totals": {"subtotal": "9.90", "tax": "0.00", "total": "9.90"},
        "payments": [{"method": "cash", "amount": "9.90"}],
    }
    if kind == "pos.return":
        data |= {"original_receipt_no": original, "reason": None}
    event = orjson.loads(envelope(store, gateway, seq, kind=kind, data=data))
    event["device_id"] = device
    event["occurred_at"] = f"2026-03-01T10:00:{seq % 60:02d}.000+08:00"
    return orjson.dumps(event)


def other(seq: int, gateway: str = G) -> bytes:
    return envelope(S, gateway, seq)


def evicted(seq: int, *ranges: list[int]) -> bytes:
    data = {"class": "telemetry", "reason": "disk_budget", "count": 1, "bytes": 10, "ranges": list(ranges)}
    return envelope(S, G, seq, kind="outbox.evicted", data=data)


def receipt_args(hq: Hq, receipt_no: str, *extra: str, device: str = TILL, store: str = S) -> list[str]:
    return ["receipt", "--store", store, "--device", device, "--receipt", receipt_no, *hq.args, *extra]


# --- at HQ: the lookup --------------------------------------------------------------------------------------


def test_the_receipt_its_return_and_every_seq_before_it(hq: Hq) -> None:
    bodies = [
        other(1),
        pos(2, "R-1"),
        pos(3, "R-1", device=TILL2),  # the same number at another till: another receipt
        pos(4, "R-2"),
        pos(5, "R-9", kind="pos.return", device=TILL2, original="R-1"),
    ]
    hq.store.store_batch(S, G, batch_of(S, G, bodies, complete_through=5))
    hq.store.store_batch("hk-002", G, batch_of("hk-002", G, [pos(1, "R-1", store="hk-002")]))
    proof = hq.store.receipt(S, TILL, "R-1")
    assert proof.found
    assert receipt_status(proof) == 0
    assert [(e.match, e.gateway_id, e.seq, e.kind, e.device_id) for e in proof.events] == [
        ("receipt_no", G, 2, "pos.sale", TILL),
        ("original_receipt_no", G, 5, "pos.return", TILL2),
    ]
    sale, ret = proof.events
    sent = orjson.loads(bodies[1])
    assert (sale.id, sale.occurred_at, sale.recorded_at) == (
        sent["id"],
        sent["occurred_at"],
        sent["recorded_at"],
    )
    assert (sale.store_id, sale.receipt_no, sale.original_receipt_no, sale.register_id) == (
        S,
        "R-1",
        None,
        "reg-1",
    )
    assert sale.corrected_at is None
    assert sale.received_at.utcoffset() is not None
    assert (ret.receipt_no, ret.original_receipt_no) == ("R-9", "R-1")
    assert proof.gateways == [GatewayCompleteness(S, G, True, 2, GapClasses())]
    assert (
        format_completeness(proof.gateways[0]) == "HQ has every event of gateway gw-a up to seq 2; 0 missing"
    )
    other_till = hq.store.receipt(S, TILL2, "R-1")
    assert [(e.match, e.seq) for e in other_till.events] == [("receipt_no", 3), ("original_receipt_no", 5)]


def test_what_is_missing_below_the_receipt_by_class(hq: Hq) -> None:
    """Below the receipt (seq 6): 2 explained (evicted), 3 lost (below complete_through), 5 pending."""
    hq.store.store_batch(
        S, G, batch_of(S, G, [other(1), evicted(4, [2, 2]), pos(6, "R-1")], complete_through=3)
    )
    proof = hq.store.receipt(S, TILL, "R-1")
    (gateway,) = proof.gateways
    assert gateway.gaps == GapClasses(explained=[(2, 2)], lost=[(3, 3)], pending=[(5, 5)])
    assert (gateway.through_seq, gateway.missing, proof.lost_below, receipt_status(proof)) == (6, 3, True, 2)
    assert format_completeness(gateway) == (
        "HQ is missing 3 event(s) of gateway gw-a up to seq 6: lost 3; pending 5; explained 2"
    )
    hq.store.store_batch(S, G, batch_of(S, G, [other(3)]))
    proof = hq.store.receipt(S, TILL, "R-1")
    assert (proof.gateways[0].missing, receipt_status(proof)) == (2, 0)  # pending and explained: not lost
    # What is missing above the receipt is not its gateway's state up to it.
    hq.store.store_batch(S, G, batch_of(S, G, [other(5), other(9)], complete_through=8))
    proof = hq.store.receipt(S, TILL, "R-1")
    assert proof.gateways[0].gaps == GapClasses(explained=[(2, 2)])
    assert receipt_status(proof) == 0


def test_an_unknown_receipt_shows_every_gateway_of_its_store(hq: Hq) -> None:
    hq.store.store_batch(S, G, batch_of(S, G, [pos(1, "R-1"), pos(3, "R-3")], complete_through=1))
    hq.store.store_batch(S, G2, batch_of(S, G2, [other(1, G2), other(2, G2)]))
    hq.store.store_batch("hk-002", G, batch_of("hk-002", G, [pos(1, "R-2", store="hk-002")]))
    hq.store.store_batch(
        S, G2, batch_of(S, G2, [pos(3, "R-7", kind="pos.return", original="R-2", gateway=G2)])
    )
    proof = hq.store.receipt(S, TILL, "R-2")
    assert not proof.found
    assert receipt_status(proof) == 1
    # A return naming it is shown, but is no proof of the receipt itself.
    assert [(e.match, e.gateway_id, e.seq) for e in proof.events] == [("original_receipt_no", G2, 3)]
    assert proof.gateways == [
        GatewayCompleteness(S, G, False, 3, GapClasses(pending=[(2, 2)])),
        GatewayCompleteness(S, G2, False, 3, GapClasses()),
    ]
    text = format_receipt(proof)
    assert text.splitlines()[0] == "receipt R-2 of device till-1 in store hk-001: HQ has no such receipt"
    assert "HQ is missing 1 event(s) of gateway gw-a up to seq 3: pending 2" in text
    assert not hq.store.receipt(S, TILL2, "R-1").found  # right number, wrong till
    nowhere = hq.store.receipt("hk-404", TILL, "R-1")
    assert (nowhere.events, nowhere.gateways) == ([], [])
    assert format_receipt(nowhere).splitlines()[-1] == "HQ has no event of store hk-404"


def test_a_database_from_before_the_receipt_columns_is_upgraded(hq: Hq) -> None:
    bodies = [pos(1, "R-1"), pos(2, "R-2", kind="pos.return", original="R-1"), other(3), pos(4, "x" * 65)]
    hq.store.store_batch(S, G, batch_of(S, G, bodies))
    with hq.store._session() as cur:  # back to the tables of before
        for index in ("events_receipt", "events_original_receipt", "events_receipt_unfilled"):
            cur.execute(f"DROP INDEX {index}")
        for column in ("receipt_no", "original_receipt_no"):
            cur.execute(f"ALTER TABLE events DROP COLUMN {column}")
    hq.store.close()
    hq.store = hq.reopen()
    with hq.store._session() as cur:
        filled = cur.execute(
            "SELECT seq, receipt_no, original_receipt_no FROM events ORDER BY seq"
        ).fetchall()
    assert [tuple(row) for row in filled] == [
        (1, "R-1", None),
        (2, "R-2", "R-1"),
        (3, None, None),
        (4, None, None),
    ]
    proof = hq.store.receipt(S, TILL, "R-1")
    assert [(e.match, e.seq) for e in proof.events] == [("receipt_no", 1), ("original_receipt_no", 2)]
    hq.store.close()
    hq.store = hq.reopen()  # and opens again as it is
    assert hq.store.receipt(S, TILL, "R-2").found


def test_what_an_older_receiver_stores_after_the_upgrade_is_found(hq: Hq) -> None:
    """A receiver of before the receipt columns (rolling upgrade) leaves them NULL: lookups read bodies."""
    hq.store.store_batch(S, G, batch_of(S, G, [pos(1, "R-1")]))
    old_insert = hq.store._sql(
        "INSERT INTO events (id, store_id, gateway_id, seq, kind, device_id, recorded_at, received_at,"
        " boot_id, mono_ns, clock_synced, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    received = hq.store._time_param(datetime.now(UTC))
    with hq.store._session() as cur:
        for body in (
            pos(2, "R-8", kind="pos.return", device=TILL2, original="R-1"),
            pos(3, "R-3"),
            pos(4, "R-3", device=TILL2),
        ):
            e = orjson.loads(body)
            cur.execute(
                old_insert,
                (
                    e["id"],
                    S,
                    G,
                    e["seq"],
                    e["kind"],
                    e["device_id"],
                    e["recorded_at"],
                    received,
                    "b",
                    1,
                    True,
                    body,
                ),
            )
    assert [(e.match, e.seq) for e in hq.store.receipt(S, TILL, "R-1").events] == [
        ("receipt_no", 1),
        ("original_receipt_no", 2),
    ]
    assert [(e.match, e.seq) for e in hq.store.receipt(S, TILL, "R-3").events] == [("receipt_no", 3)]


def test_the_lookups_are_index_searches(hq: Hq) -> None:
    params: list[tuple[str, tuple[Any, ...], str]] = [
        (_BY_RECEIPT, (S, TILL, "R-1", 100), "events_receipt"),
        (_BY_ORIGINAL, (S, "R-1", 100), "events_original_receipt"),
        (_UNFILLED, (S,), "events_receipt_unfilled"),
    ]
    with hq.store._session() as cur:
        sqlite = isinstance(hq.store, SqliteReceiverStore)
        if not sqlite:
            cur.execute("SET enable_seqscan = off")  # an empty table: show which index the planner can use
        for sql, args, index in params:
            explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            plan = " ".join(str(row) for row in cur.execute(explain + hq.store._sql(sql), args).fetchall())
            assert index in plan, plan


# --- at HQ: the command ----------------------------------------------------------------------------------


def test_the_command_in_text_and_json(hq: Hq, capsys: pytest.CaptureFixture[str]) -> None:
    receipt = "2026/03 R 1 é"  # receipt numbers are any text but control characters
    bodies = [pos(1, receipt), pos(2, "R-2"), pos(4, "R-4")]
    hq.store.store_batch(S, G, batch_of(S, G, bodies, complete_through=3))
    sent = orjson.loads(bodies[0])

    assert receiver_main(receipt_args(hq, receipt, "--lost-grace", "0")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"receipt {receipt} of device till-1 in store hk-001: at HQ (1 event(s))"
    assert lines[1].split() == [
        "pos.sale",
        "gateway",
        "gw-a",
        "seq",
        "1",
        "event",
        sent["id"],
        "(the",
        "receipt)",
    ]
    times = lines[2].split()
    assert times[:4] == ["occurred_at", sent["occurred_at"], "recorded_at", sent["recorded_at"]]
    assert times[4] == "received_at"
    assert datetime.fromisoformat(times[5]).utcoffset() is not None
    assert lines[3:] == ["HQ has every event of gateway gw-a up to seq 1; 0 missing"]

    assert receiver_main(receipt_args(hq, "R-4", "--json", "--lost-grace", "0")) == 2
    doc = orjson.loads(capsys.readouterr().out)
    received_at = doc["events"][0].pop("received_at")
    assert datetime.fromisoformat(received_at).utcoffset() is not None
    r4 = orjson.loads(bodies[2])
    assert doc == {
        "store_id": S,
        "device_id": TILL,
        "receipt_no": "R-4",
        "found": True,
        "status": "lost_below",
        "events": [
            {
                "match": "receipt_no",
                "store_id": S,
                "gateway_id": G,
                "seq": 4,
                "kind": "pos.sale",
                "id": r4["id"],
                "device_id": TILL,
                "receipt_no": "R-4",
                "original_receipt_no": None,
                "register_id": "reg-1",
                "occurred_at": r4["occurred_at"],
                "recorded_at": r4["recorded_at"],
                "corrected_at": None,
            }
        ],
        "gateways": [
            {
                "store_id": S,
                "gateway_id": G,
                "holds_receipt": True,
                "through_seq": 4,
                "missing": 1,
                "lost": [[3, 3]],
                "pending": [],
                "explained": [],
            }
        ],
    }
    # Seq 3 is lost only once HQ has known complete_through=3 for the grace period (a day here).
    assert receiver_main(receipt_args(hq, "R-4", "--json", "--lost-grace", "86400")) == 0
    assert orjson.loads(capsys.readouterr().out)["gateways"][0]["pending"] == [[3, 3]]

    assert receiver_main(receipt_args(hq, "R-3", "--json")) == 1
    doc = orjson.loads(capsys.readouterr().out)
    assert (doc["found"], doc["status"], doc["events"]) == (False, "not_found", [])
    assert [(g["gateway_id"], g["through_seq"], g["holds_receipt"]) for g in doc["gateways"]] == [
        (G, 4, False)
    ]


def test_the_command_refuses_what_cannot_be_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.db"
    assert (
        receiver_main(["receipt", "--store", S, "--device", TILL, "--receipt", "R-1", "--db", str(missing)])
        == 1
    )
    assert capsys.readouterr().err == f"hq-receiver: no database at {missing}\n"
    assert not missing.exists()
    for bad in (
        ["--store", "hk 001", "--device", TILL, "--receipt", "R-1"],
        ["--store", S, "--device", "-till", "--receipt", "R-1"],
        ["--store", S, "--device", TILL, "--receipt", "x" * 65],
        ["--store", S, "--device", TILL, "--receipt", "R\x1b1"],
        ["--store", S, "--device", TILL],
    ):
        with pytest.raises(SystemExit) as exited:
            receiver_main(["receipt", *bad, "--db", str(missing)])
        assert exited.value.code == 2
        assert "usage: store-gateway hq-receiver receipt" in capsys.readouterr().err


def test_the_store_gateway_command_line(tmp_path: Path) -> None:
    """``store-gateway hq-receiver receipt`` as a real process, next to the receiver's existing modes."""
    path = tmp_path / "hq.db"
    store = SqliteReceiverStore(path)
    body = pos(1, "R-1")
    store.store_batch(S, G, batch_of(S, G, [body]))
    store.close()
    base = [sys.executable, "-m", "gateway.cli", "hq-receiver"]
    found = subprocess.run(
        [*base, "receipt", "--store", S, "--device", TILL, "--receipt", "R-1", "--db", str(path), "--json"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    doc = orjson.loads(found.stdout)
    assert (doc["status"], doc["events"][0]["id"]) == ("found", orjson.loads(body)["id"])
    report = subprocess.run(
        [*base, "--db", str(path), "--report"], capture_output=True, check=False, timeout=60
    )
    assert report.returncode == 0, report.stderr
    assert b"gw-a" in report.stdout


# --- at the store: the local API on a real journal -------------------------------------------------------


def sale_draft(device: str, receipt_no: str, *, original: str | None = None) -> Draft:
    data: dict[str, Any] = {
        "receipt_no": receipt_no,
        "register_id": "reg-1",
        "currency": "HKD",
        "lines": [{"sku": "SKU-1", "quantity": "1", "unit_price": "9.90", "discount": "0"}],
        "totals": {"subtotal": "9.90", "tax": "0", "total": "9.90"},
        "payments": [],
    }
    kind = "pos.sale"
    if original is not None:
        kind, data = "pos.return", data | {"original_receipt_no": original}
    return Draft(kind, device, orjson.dumps(data), occurred_at="2026-03-01T10:00:00.000+08:00")


@contextlib.asynccontextmanager
async def api_on(journal: Journal) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(journal.path, TOKEN, Metrics(), lambda: {"status": "ok"})
    async with (
        running_api(app) as (base, _),
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http,
    ):
        yield http


def receipt_url(device: str, receipt_no: str) -> str:
    return f"/api/receipts/{device}/{quote(receipt_no, safe='')}"


async def test_the_api_answers_a_receipt_and_whether_hq_acknowledged_it(tmp_path: Path) -> None:
    async with running_journal(tmp_path / "journal.db", Metrics()) as journal, api_on(journal) as http:
        for draft in (
            sale_draft(TILL, "R-1"),
            sale_draft(TILL2, "R-1"),  # the same number at another till
            sale_draft(TILL, "R-2"),
            sale_draft(TILL2, "R-9", original="R-1"),
        ):
            assert journal.submit(draft)
        await journal.flush()

        response = await http.get(receipt_url(TILL, "R-1"))
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        seqs = {e["seq"]: e for e in body["events"]}
        assert [(e["match"], e["kind"], e["device_id"]) for e in body["events"]] == [
            ("receipt_no", "pos.sale", TILL),
            ("original_receipt_no", "pos.return", TILL2),
        ]
        sale_seq, return_seq = sorted(seqs)
        sale = seqs[sale_seq]
        stored = await journal.query("SELECT id, recorded_at FROM events WHERE seq = ?", (sale_seq,))
        assert (sale["id"], sale["recorded_at"]) == tuple(stored[0])
        assert (sale["receipt_no"], sale["original_receipt_no"], sale["occurred_at"], sale["class"]) == (
            "R-1",
            None,
            "2026-03-01T10:00:00.000+08:00",
            "transaction",
        )
        assert seqs[return_seq]["original_receipt_no"] == "R-1"
        assert body["delivered_to_hq"] is False
        assert [e["delivered_to_hq"] for e in body["events"]] == [False, False]

        journal.note_delivered(TRANSACTION, sale_seq)  # HQ's broker acknowledged up to the sale
        await journal.flush()  # ... and the journal persisted it
        body = (await http.get(receipt_url(TILL, "R-1"))).json()
        assert body["delivered_to_hq"] is True
        assert [(e["delivered_to_hq"], e["delivered_seq"]) for e in body["events"]] == [
            (True, sale_seq),
            (False, sale_seq),
        ]
        journal.note_delivered(TRANSACTION, journal.last_seq)
        await journal.flush()
        body = (await http.get(receipt_url(TILL, "R-1"))).json()
        assert [e["delivered_to_hq"] for e in body["events"]] == [True, True]


async def test_the_api_validates_its_path_and_explains_a_404(tmp_path: Path) -> None:
    odd = "2026/03 R#1?é"  # '/', '#', '?' and non-ASCII: percent-encoded in the path
    async with running_journal(tmp_path / "journal.db", Metrics()) as journal, api_on(journal) as http:
        assert journal.submit(sale_draft(TILL, odd))
        assert journal.submit(sale_draft(TILL, "R-1"))
        await journal.flush()

        response = await http.get(receipt_url(TILL, odd))
        assert response.status_code == 200, response.text
        assert response.json()["receipt_no"] == odd
        # An unencoded '/' reaches the same receipt (the route takes the rest of the path).
        assert (await http.get(f"/api/receipts/{TILL}/2026/03%20R%231%3F%C3%A9")).status_code == 200

        for device, receipt_no in ((TILL, "R-404"), (TILL2, "R-1"), (TILL, "' OR 1=1 --")):
            response = await http.get(receipt_url(device, receipt_no))
            assert response.status_code == 404, response.text
            detail = response.json()["detail"]
            assert (
                f"no pos.sale or pos.return with receipt_no {receipt_no!r} from device {device!r}" in detail
            )

        for path in (
            receipt_url("-till", "R-1"),  # not an id
            receipt_url("t" * 65, "R-1"),
            receipt_url("till 1", "R-1"),
            receipt_url(TILL, "x" * 65),
            receipt_url(TILL, "x" * 5000),
            receipt_url(TILL, "R\x001"),
            receipt_url(TILL, "R\x1b[31m"),
            f"/api/receipts/{TILL}/",
        ):
            response = await http.get(path)
            assert response.status_code == 422, (path, response.status_code, response.text)

        anonymous = await http.get(receipt_url(TILL, "R-1"), headers={"Authorization": ""})
        assert anonymous.status_code == 401


# --- end to end: till -> gateway -> HQ, and the proof at both ends ------------------------------------------


async def test_a_receipt_from_the_till_to_hq(
    store_broker: Mosquitto,
    persistent_hq_broker: Mosquitto,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """HQ is down: the store says committed, not delivered. HQ comes back: the store says delivered, and HQ's
    ``receipt`` command proves it holds the same event, with nothing missing before it."""
    hq_broker = persistent_hq_broker
    config = load(
        write_config(
            tmp_path / "store.yaml",
            store_port=store_broker.port,
            hq_port=hq_broker.port,
            data_dir=tmp_path / "data",
        )
    )
    hq_db = tmp_path / "hq.db"
    async with running_receiver(hq_broker, hq_db):
        pass  # the receiver's persistent session (and subscription) now exists at HQ
    hq_broker.stop()

    till, other_till = TERMINALS[0], TERMINALS[1]
    receipt = "2026/03/01-0001"
    returned = orjson.loads(sale_payload("R-RET-1", "reg-2", [("SKU-0001", 1)])) | {
        "original_receipt_no": receipt
    }
    messages = [
        (f"store/pos/{till}/sale", sale_payload(receipt, "reg-1", [("SKU-0001", 2)])),
        (f"store/pos/{other_till}/return", orjson.dumps(returned)),
    ]
    url = receipt_url(till, receipt)
    async with running_gateway(config) as gateway:
        base = f"http://127.0.0.1:{await gateway.wait_api()}"
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as http:
            assert (await http.get(url)).status_code == 404
            await publish_and_wait(store_broker, messages, "receipt-proof-till")
            last: dict[str, Any] = {}

            async def store_says(delivered: bool) -> bool:
                response = await http.get(url)
                last["answer"] = (response.status_code, response.text)
                if response.status_code != 200:
                    return False
                body = response.json()
                last["body"] = body
                return len(body["events"]) == 2 and all(
                    e["delivered_to_hq"] is delivered for e in body["events"]
                )

            await poll_until(
                lambda: store_says(False), "the sale and its return committed", state=lambda: last
            )
            assert last["body"]["delivered_to_hq"] is False  # HQ is down: nothing can have been acknowledged
            sale = last["body"]["events"][0]
            assert (sale["match"], sale["kind"], sale["receipt_no"]) == ("receipt_no", "pos.sale", receipt)

            hq_broker.start()
            async with running_receiver(hq_broker, hq_db) as hq_store:
                await poll_until(
                    lambda: store_says(True), "HQ's broker to acknowledge both", state=lambda: last
                )
                assert last["body"]["delivered_to_hq"] is True

                def hq_has_it() -> bool:
                    proof = hq_store.receipt(STORE_ID, till, receipt)
                    last["proof"] = proof
                    return proof.found and len(proof.events) == 2 and proof.gateways[0].missing == 0

                await poll_until(
                    hq_has_it, "HQ to store the receipt and every seq before it", state=lambda: last
                )
                capsys.readouterr()
                args = [
                    "receipt",
                    "--store",
                    STORE_ID,
                    "--device",
                    till,
                    "--receipt",
                    receipt,
                    "--db",
                    str(hq_db),
                ]
                assert await asyncio.to_thread(receiver_main, args) == 0
                text = capsys.readouterr().out
                assert await asyncio.to_thread(receiver_main, [*args, "--json"]) == 0
                doc = orjson.loads(capsys.readouterr().out)

    lines = text.splitlines()
    assert lines[0] == f"receipt {receipt} of device {till} in store {STORE_ID}: at HQ (1 event(s))"
    assert (
        f"pos.sale    gateway {GATEWAY_ID} seq {sale['seq']}  event {sale['id']}  (the receipt)" in lines[1]
    )
    assert f"(receipt R-RET-1 of device {other_till} returns it)" in lines[3]
    assert lines[-1] == f"HQ has every event of gateway {GATEWAY_ID} up to seq {sale['seq']}; 0 missing"
    assert doc["status"] == "found"
    at_hq = doc["events"][0]
    assert (at_hq["id"], at_hq["seq"], at_hq["recorded_at"]) == (sale["id"], sale["seq"], sale["recorded_at"])
    assert at_hq["occurred_at"] == sale["occurred_at"]
