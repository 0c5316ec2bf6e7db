"""The local HTTP API over real HTTP: a real uvicorn on a free loopback port, a real SQLite journal file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request

from gateway.api import MAX_BODY_BYTES, MAX_RESPONSE_BYTES, PREVIEW_BYTES, ApiError, create_app, serve_api
from gateway.kernel.metrics import Metrics

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The journal schema as the briefing gives it (the journal and the stock ledger write it in production).
SCHEMA = """
CREATE TABLE events(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, device_id TEXT,
                    recorded_at TEXT NOT NULL, dedup_key TEXT UNIQUE, body BLOB NOT NULL);
CREATE TABLE quarantine(qid INTEGER PRIMARY KEY, received_at TEXT NOT NULL, driver TEXT NOT NULL,
                        device_id TEXT, topic TEXT, reason TEXT NOT NULL, detail TEXT, size INTEGER NOT NULL,
                        payload BLOB);
CREATE TABLE stock(sku TEXT PRIMARY KEY, on_hand REAL NOT NULL, safety_stock REAL, updated_seq INTEGER,
                   low INTEGER NOT NULL);
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# (seq, kind, device_id) of the events in the test journal.
EVENTS = [
    (1, "pos.sale", "till-1"),
    (2, "pos.sale", "till-2"),
    (3, "stock.level", None),
    (4, "pos.return", "till-1"),
    (5, "pos.sale", "till-1"),
    (6, "stock.level", None),
    (7, "pos.sale", "till-2"),
    (8, "alert.raised", None),
    (9, "pos.sale", "till-1"),
    (10, "stock.level", None),
]

LONG_TEXT = ("{" + '"note": "' + "x" * (PREVIEW_BYTES - 11) + "é" + '"}').encode()  # é straddles the cut
BINARY = bytes(range(256)) * 3
QUARANTINE = [
    # (reason, topic, size, payload)
    ("json_invalid", "pos/till-1/sale", 9, b"{not json"),
    ("too_large", "pos/till-2/sale", 300_000, BINARY),
    ("schema_invalid", "pos/till-1/sale", len(LONG_TEXT), LONG_TEXT),
    ("topic_unknown", "pos/x/y", 0, None),
    ("control_chars", "pos/till-1/sale", 8, b"ab\x1b[31mcd"),
]


def envelope(seq: int, kind: str, device_id: str | None) -> bytes:
    """An envelope as the journal stores it: compact orjson bytes (key order and spacing must survive)."""
    return orjson.dumps(
        {
            "id": f"0190c0de-0000-7000-8000-{seq:012d}",
            "store_id": "hk-001",
            "gateway_id": "gw-1",
            "seq": seq,
            "kind": kind,
            "device_id": device_id,
            "occurred_at": None,
            "recorded_at": f"2025-01-01T00:00:{seq:02d}.000+00:00",
            "boot_id": "b00t",
            "clock_synced": True,
            "mono_ns": seq * 1000,
            "schema": 1,
            "data": {"n": seq},
        }
    )


def insert_event(conn: sqlite3.Connection, seq: int, kind: str, device_id: str | None) -> None:
    conn.execute(
        "INSERT INTO events(seq, id, kind, device_id, recorded_at, dedup_key, body) VALUES (?,?,?,?,?,?,?)",
        (
            seq,
            f"id-{seq}",
            kind,
            device_id,
            f"2025-01-01T00:00:{seq:02d}+00:00",
            f"dedup-{seq}",
            envelope(seq, kind, device_id),
        ),
    )
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq),))


def make_journal(path: Path) -> sqlite3.Connection:
    """A WAL journal with EVENTS, QUARANTINE and a few stock rows; returns the open writer connection."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    for seq, kind, device_id in EVENTS:
        insert_event(conn, seq, kind, device_id)
    for reason, topic, size, payload in QUARANTINE:
        conn.execute(
            "INSERT INTO quarantine(received_at, driver, device_id, topic, reason, detail, size, payload)"
            " VALUES ('2025-01-01T00:00:00.000+00:00', 'pos', 'till-1', ?, ?, 'detail', ?, ?)",
            (topic, reason, size, payload),
        )
    conn.executemany(
        "INSERT INTO stock VALUES (?,?,?,?,?)",
        [
            ("SKU-A", 40.0, 5.0, 9, 0),
            ("SKU-B", 2.0, 5.0, 7, 1),
            ("SKU-C", 0.0, None, 5, 1),
            ("SKU-D", 12.5, None, 1, 0),
        ],
    )
    conn.execute("COMMIT")
    return conn


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "journal.db"
    conn = make_journal(path)
    yield path, conn
    conn.close()


class Health:
    """A health source the test can flip between ok and degraded."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"status": "ok", "version": "0.1.0", "uptime_s": 1.5, "last_seq": 10}

    def __call__(self) -> dict[str, Any]:
        return dict(self.report)


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """The app served on a free loopback port inside a TaskGroup; yields the base URL and the server task."""
    started = asyncio.Event()
    port: list[int] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(serve_api(app, "127.0.0.1", 0, started, port), name="api")
        async with asyncio.timeout(10):
            await started.wait()
        yield f"http://127.0.0.1:{port[0]}", task
        task.cancel()


def make_app(
    db: Path, health: Callable[[], dict[str, Any]] | None = None, **kw: Any
) -> tuple[FastAPI, Metrics]:
    metrics = Metrics()
    return create_app(db, TOKEN, metrics, health or Health(), **kw), metrics


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    response = await client.get(url, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def test_health_is_open_and_503_when_degraded(journal: tuple[Path, sqlite3.Connection]) -> None:
    health = Health()
    app, _ = make_app(journal[0], health)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == health.report
        health.report["status"] = "degraded"
        health.report["uplink_connected"] = False
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["uplink_connected"] is False


async def test_health_survives_a_failing_health_source(journal: tuple[Path, sqlite3.Connection]) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    app, _ = make_app(journal[0], broken)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "degraded"


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/api/events", "/api/stock", "/api/quarantine", "/no-such-page", "/docs", "/openapi.json"],
)
async def test_everything_but_health_needs_the_token(
    journal: tuple[Path, sqlite3.Connection], path: str
) -> None:
    app, _ = make_app(journal[0])
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789abcd"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {"Authorization": "Bearer"},
        ):
            response = await client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in response.text
        expected = 404 if path in ("/no-such-page", "/docs", "/openapi.json") else 200
        assert (await client.get(path, headers=AUTH)).status_code == expected
        # The scheme is case-insensitive (RFC 7235).
        assert (await client.get(path, headers={"Authorization": f"bearer {TOKEN}"})).status_code == expected


async def test_docs_only_when_asked(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0], docs=True)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/openapi.json")).status_code == 401
        schema = await get_json(client, "/openapi.json")
        assert "/api/events" in schema["paths"]


def test_an_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(tmp_path / "journal.db", "", Metrics(), Health())


async def test_metrics_is_prometheus_text(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, metrics = make_app(journal[0])
    metrics.committed.labels("pos.sale").inc(3)
    metrics.last_seq.set(10)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/metrics", headers=AUTH)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'storegw_events_committed_total{kind="pos.sale"} 3.0' in response.text
        assert "storegw_journal_last_seq 10.0" in response.text


async def test_events_filters_and_order(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])

    def seqs(events: list[dict[str, Any]]) -> list[int]:
        return [e["seq"] for e in events]

    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        assert seqs(await get_json(client, "/api/events")) == list(range(10, 0, -1))
        assert seqs(await get_json(client, "/api/events?limit=3")) == [10, 9, 8]
        assert seqs(await get_json(client, "/api/events?kind=pos.sale")) == [9, 7, 5, 2, 1]
        assert seqs(await get_json(client, "/api/events?device_id=till-1")) == [9, 5, 4, 1]
        assert seqs(await get_json(client, "/api/events?kind=pos.sale&device_id=till-2")) == [7, 2]
        assert seqs(await get_json(client, "/api/events?after_seq=4&limit=3")) == [5, 6, 7]
        assert seqs(await get_json(client, "/api/events?after_seq=0&kind=stock.level")) == [3, 6, 10]
        assert await get_json(client, "/api/events?after_seq=10") == []
        assert await get_json(client, "/api/events?kind=no.such") == []
        for bad in ("limit=0", "limit=1001", "after_seq=-1", "limit=abc", "kind=" + "k" * 65):
            response = await client.get(f"/api/events?{bad}", headers=AUTH)
            assert response.status_code == 422, bad

        # The stored bytes are passed on untouched, not re-serialised.
        response = await client.get("/api/events?after_seq=0&limit=2", headers=AUTH)
        assert response.headers["content-type"] == "application/json"
        assert (
            response.content
            == b"[" + envelope(1, "pos.sale", "till-1") + b"," + envelope(2, "pos.sale", "till-2") + b"]"
        )


async def test_events_pages_are_bounded_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    conn = make_journal(path)
    big = MAX_RESPONSE_BYTES * 3 // 8
    with conn:
        for seq in range(11, 15):
            body = orjson.dumps({"seq": seq, "pad": "x" * big})
            conn.execute(
                "INSERT INTO events(seq, id, kind, device_id, recorded_at, body) VALUES (?,?,?,?,?,?)",
                (seq, f"id-{seq}", "pos.sale", "till-9", "2025-01-01T00:01:00+00:00", body),
            )
        body = orjson.dumps({"seq": 15, "pad": "x" * (MAX_RESPONSE_BYTES + 1)})
        conn.execute(
            "INSERT INTO events(seq, id, kind, device_id, recorded_at, body) VALUES (?,?,?,?,?,?)",
            (15, "id-15", "pos.sale", "till-8", "2025-01-01T00:01:00+00:00", body),
        )
    conn.close()
    app, _ = make_app(path)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        # Fewer than `limit` come back once the byte budget is spent; paging on with after_seq gets the rest.
        assert [e["seq"] for e in await get_json(client, "/api/events?after_seq=10")] == [11, 12]
        assert [e["seq"] for e in await get_json(client, "/api/events?after_seq=12")] == [13, 14]
        # One event larger than the budget still comes back, alone.
        assert [e["seq"] for e in await get_json(client, "/api/events")] == [15]


async def test_events_sees_what_a_live_writer_commits(journal: tuple[Path, sqlite3.Connection]) -> None:
    path, writer = journal
    app, _ = make_app(path)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        assert await get_json(client, "/api/events?after_seq=10") == []
        # The writer keeps its connection open (as the journal does) and holds a write transaction meanwhile.
        writer.execute("BEGIN IMMEDIATE")
        insert_event(writer, 11, "pos.sale", "till-3")
        assert await get_json(client, "/api/events?after_seq=10") == []
        assert len(await get_json(client, "/api/events")) == 10
        writer.execute("COMMIT")
        async with asyncio.timeout(10):
            while True:
                events = await get_json(client, "/api/events?after_seq=10")
                if events:
                    break
                await asyncio.sleep(0.05)
        assert [e["device_id"] for e in events] == ["till-3"]


async def test_integer_parameters_beyond_sqlite_are_422(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])
    too_big = 2**63  # one past SQLite's INTEGER: binding it raised OverflowError, a 500
    async with running(app) as (base, _), httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        for url in (
            f"/api/events?after_seq={too_big}",
            f"/api/events?limit={too_big}",
            f"/api/stock?limit={too_big}",
            f"/api/quarantine?limit={too_big}",
            "/api/events?after_seq=-1",
            "/api/events?after_seq=1e3",
        ):
            reply = await client.get(url)
            assert reply.status_code == 422, (url, reply.status_code, reply.text)
        assert await get_json(client, f"/api/events?after_seq={too_big - 1}") == []


async def test_stock_rows_and_low_only(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        rows = await get_json(client, "/api/stock")
        assert [r["sku"] for r in rows] == ["SKU-A", "SKU-B", "SKU-C", "SKU-D"]
        assert rows[1] == {"sku": "SKU-B", "on_hand": 2.0, "safety_stock": 5.0, "updated_seq": 7, "low": True}
        assert rows[3]["safety_stock"] is None
        assert [r["sku"] for r in await get_json(client, "/api/stock?low_only=true")] == ["SKU-B", "SKU-C"]
        assert [r["sku"] for r in await get_json(client, "/api/stock?low_only=false")] == [
            r["sku"] for r in rows
        ]
        assert [r["on_hand"] for r in await get_json(client, "/api/stock?sku=SKU-D")] == [12.5]
        assert await get_json(client, "/api/stock?sku=SKU-A&low_only=1") == []
        # Paging in SKU order: limit, then on from the last SKU received.
        assert [r["sku"] for r in await get_json(client, "/api/stock?limit=2")] == ["SKU-A", "SKU-B"]
        assert [r["sku"] for r in await get_json(client, "/api/stock?limit=2&after_sku=SKU-B")] == [
            "SKU-C",
            "SKU-D",
        ]
        assert (await client.get("/api/stock?limit=0", headers=AUTH)).status_code == 422


async def test_quarantine_previews(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        rows = await get_json(client, "/api/quarantine")
        assert [r["qid"] for r in rows] == [5, 4, 3, 2, 1]
        by_reason = {r["reason"]: r for r in rows}
        first = by_reason["json_invalid"]
        assert first["topic"] == "pos/till-1/sale"
        assert first["size"] == 9
        assert first["driver"] == "pos"
        assert first["detail"] == "detail"
        assert first["received_at"] == "2025-01-01T00:00:00.000+00:00"
        assert first["payload"] == {"encoding": "text", "data": "{not json", "truncated": False}

        binary = by_reason["too_large"]["payload"]
        assert binary["encoding"] == "base64"
        assert binary["truncated"] is True
        assert base64.b64decode(binary["data"]) == BINARY[:PREVIEW_BYTES]

        # Cut at 512 bytes in the middle of "é": the half character is dropped, the text stays text.
        long = by_reason["schema_invalid"]["payload"]
        assert long["encoding"] == "text"
        assert long["truncated"] is True
        assert long["data"].encode() == LONG_TEXT[: PREVIEW_BYTES - 1]

        assert by_reason["topic_unknown"]["payload"] is None
        # Terminal escapes are not passed on as text.
        escaped = by_reason["control_chars"]["payload"]
        assert escaped["encoding"] == "base64"
        assert base64.b64decode(escaped["data"]) == b"ab\x1b[31mcd"

        assert [r["qid"] for r in await get_json(client, "/api/quarantine?limit=2")] == [5, 4]
        assert (await client.get("/api/quarantine?limit=0", headers=AUTH)).status_code == 422


async def test_a_missing_journal_is_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    app, _ = make_app(path)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/health")).status_code == 200
        for page in ("/api/events", "/api/stock", "/api/quarantine"):
            response = await client.get(page, headers=AUTH)
            assert response.status_code == 503, page
            assert response.json() == {"detail": "journal not available"}
        assert not path.exists(), "a read-only reader must not create the journal"
        make_journal(path).close()
        assert len(await get_json(client, "/api/events")) == 10


async def test_oversized_requests_are_refused(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])

    # A route added after create_app, as later POST endpoints will be: it inherits the limit.
    @app.post("/api/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    def chunks(total: int) -> Iterator[bytes]:
        for _ in range(total // 1024):
            yield b"x" * 1024

    async def chunked(total: int) -> AsyncIterator[bytes]:
        for chunk in chunks(total):
            yield chunk

    big = b"x" * (MAX_BODY_BYTES + 1)
    async with running(app) as (url, _task), httpx.AsyncClient(base_url=url) as client:
        for headers in (AUTH, {}):
            for path in ("/api/events", "/api/echo", "/health"):
                response = await client.post(path, content=big, headers=headers)
                assert response.status_code == 413, (path, headers)
        # Without a Content-Length (chunked), the limit is counted as the body arrives.
        response = await client.post("/api/echo", content=chunked(MAX_BODY_BYTES + 1024), headers=AUTH)
        assert response.status_code == 413
        assert "content-length" not in response.request.headers
        response = await client.post("/api/echo", content=chunked(MAX_BODY_BYTES), headers=AUTH)
        assert response.json() == {"received": MAX_BODY_BYTES}
        response = await client.post("/api/echo", content=b"x" * MAX_BODY_BYTES, headers=AUTH)
        assert response.json() == {"received": MAX_BODY_BYTES}


async def test_cancelling_the_task_shuts_the_server_down(journal: tuple[Path, sqlite3.Connection]) -> None:
    app, _ = make_app(journal[0])
    entered, release = asyncio.Event(), asyncio.Event()

    @app.get("/api/slow")
    async def slow() -> dict[str, bool]:
        entered.set()
        await release.wait()
        return {"done": True}

    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    threads_before = {t.name for t in threading.enumerate()}
    async with running(app) as (url, task), httpx.AsyncClient(base_url=url) as client:
        # uvicorn must not take over the process's signals: the gateway owns them.
        assert signal.getsignal(signal.SIGINT) is sigint
        assert signal.getsignal(signal.SIGTERM) is sigterm
        # Leaves an idle keep-alive connection for the shutdown to close.
        assert (await client.get("/api/events", headers=AUTH)).status_code == 200
        in_flight = asyncio.create_task(client.get("/api/slow", headers=AUTH), name="slow-request")
        async with asyncio.timeout(10):
            await entered.wait()
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done(), "the server waits for the request in flight"
        release.set()
        response = await in_flight
        assert response.json() == {"done": True}
        with pytest.raises(asyncio.CancelledError):
            await task
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(httpx.ConnectError):
            await client.get("/api/events", headers=AUTH)
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert signal.getsignal(signal.SIGINT) is sigint
    # Left: FastAPI's threadpool (AnyIO workers, stopped when the loop's main task ends) and the loop's
    # default executor (getaddrinfo; shut down with the loop). Nothing of the server's own.
    left = {t.name for t in threading.enumerate()} - threads_before
    assert {name for name in left if not name.startswith("asyncio_")} <= {"AnyIO worker thread"}


async def test_a_taken_port_raises_api_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        app = create_app(Path("/nonexistent/journal.db"), TOKEN, Metrics(), Health())
        with pytest.raises(ApiError, match="cannot listen"):
            await serve_api(app, "127.0.0.1", port)
