"""The local HTTP API: health for probes, Prometheus metrics, and read-only views of the journal.

``/api/receipts/{device_id}/{receipt_no}`` answers whether a receipt was committed and whether HQ's broker has
acknowledged it (the per-class delivered watermark, docs/OUTBOX.md); ``store-gateway hq-receiver receipt``
proves at HQ that it is stored there.

It runs inside the gateway's own event loop and TaskGroup (:func:`serve_api`): uvicorn installs no signal
handlers, the gateway owns SIGINT/SIGTERM. Everything but ``/health`` needs ``Authorization: Bearer <token>``.
Journal reads run in FastAPI's threadpool, each on a short-lived read-only SQLite connection beside the
journal's writer (WAL lets readers and the writer run at once), through the journal's named reads
(gateway/kernel/journal/reader.py); event bodies are the stored envelope bytes, passed on untouched.

The connection guard against silent sockets (slowloris) and the body-limit and token middleware are in
:mod:`gateway.api.guard` (docs/API.md#connections).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.guard import (
    IDLE_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    OPEN_PATHS,
    REQUEST_TIMEOUT_S,
    WEBHOOK_MAX_BODY_BYTES,
    ApiMetrics,
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    ConnectionGuard,
    ConnectionLimits,
    api_metrics,
    guarded_protocol,
)
from gateway.api.session import Session
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.journal.reader import (
    QuarantineRow,
    ReceiptRow,
    StockRow,
    events_page,
    quarantine_page,
    receipt_rows,
    stock_page,
)
from gateway.kernel.metrics import Metrics
from gateway.kernel.model import ID_PATTERN
from gateway.kernel.outbox import CLASSES, TELEMETRY

__all__ = [
    "IDLE_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_CLIENT",
    "MAX_EVENTS",
    "MAX_RESPONSE_BYTES",
    "OPEN_PATHS",
    "PREVIEW_BYTES",
    "REQUEST_TIMEOUT_S",
    "WEBHOOK_MAX_BODY_BYTES",
    "ApiError",
    "ApiMetrics",
    "BearerAuthMiddleware",
    "BodyLimitMiddleware",
    "ConnectionLimits",
    "api_metrics",
    "create_app",
    "payload_preview",
    "receipt_report",
    "serve_api",
]

_LOGGER = logging.getLogger(__name__)


MAX_EVENTS: Final = 1000
"""Most events one ``/api/events`` call returns."""

MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
"""Most event bytes one ``/api/events`` call returns: a page of big receipts must not exhaust a small box."""

PREVIEW_BYTES: Final = 512
"""How much of a quarantined payload ``/api/quarantine`` shows."""
MAX_QUERY_INT: Final = 2**63 - 1
"""Largest integer a query parameter takes: SQLite's INTEGER range (a larger one would overflow the binding)."""

SHUTDOWN_GRACE_S: Final = 5
"""How long a stopping server waits for requests in flight before cancelling them."""
_JSON: Final = "application/json"

MAX_STOCK_ROWS = 5000
"""Largest page of /api/stock (a convenience store carries a few thousand SKUs)."""

RECEIPT_NO_PATTERN: Final = r"^[^\x00-\x1f\x7f]+$"
MAX_RECEIPT_NO: Final = 64
"""A receipt number as the gateway accepts it (gateway/kernel/events.py ``ShortText``): 1-64 characters, no control
characters. It may hold ``/``: the route takes the rest of the path (``%2F`` works too)."""
MAX_RECEIPT_EVENTS: Final = 100
"""Most events ``/api/receipts`` returns per way of matching (a receipt has a sale and a few returns)."""


class ApiError(StoreGatewayError):
    """The local API cannot start (for example, its port is taken)."""


def create_app(
    db_path: Path,
    token: str,
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    *,
    docs: bool = False,
    devices: Callable[[], list[dict[str, Any]]] | None = None,
    routers: Sequence[APIRouter] = (),
    session: Callable[[str | None], Session | None] | None = None,
    kind_class: Callable[[str], int] | None = None,
) -> FastAPI:
    """The API application. ``health`` runs on the event loop thread, so it must be cheap and never block.
    ``session``: the local page's cookie check, when the page is served (one of ``routers``). ``kind_class``: the
    journal's kind-to-class map, for finding events by kind through the kind index."""
    if not token:
        raise ValueError("the API token must not be empty")
    app = FastAPI(
        title="store-gateway local API",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    # Added last, so outermost: an oversized request is refused before anything else looks at it.
    app.add_middleware(BearerAuthMiddleware, token=token, session=session)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.state.api_metrics = api_metrics(metrics.registry)  # serve_api counts its connections there
    for router in routers:
        app.include_router(router)
    app.include_router(_status_routes(metrics, health, devices))
    app.include_router(_journal_routes(db_path.absolute().as_uri() + "?mode=ro", kind_class))
    return app


def _status_routes(
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    devices: Callable[[], list[dict[str, Any]]] | None,
) -> APIRouter:
    """``/api/devices``, ``/health`` and ``/metrics``: the gateway's own state (``/metrics`` also reads the
    outbox's oldest waiting events, on a read-only connection of its own)."""
    router = APIRouter()

    @router.get("/api/devices")
    async def get_devices() -> Response:
        """Every configured device's health: status, last seen, message/error/quarantine/rate-limit counts."""
        return Response(orjson.dumps(devices() if devices else []), media_type=_JSON)

    @router.get("/health")
    async def get_health() -> Response:
        try:
            report = health()
        except Exception:
            _LOGGER.exception("health check failed")
            report = {"status": "degraded", "error": "health check failed"}
        status = 200 if report.get("status") == "ok" else 503
        return Response(orjson.dumps(report, default=str), status_code=status, media_type=_JSON)

    @router.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _journal_routes(db_uri: str, kind_class: Callable[[str], int] | None) -> APIRouter:
    """The read-only views of the journal at ``db_uri``."""
    router = APIRouter()

    @router.get("/api/events")
    def get_events(
        kind: Annotated[str | None, Query(max_length=64)] = None,
        device_id: Annotated[str | None, Query(max_length=64)] = None,
        after_seq: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
    ) -> Response:
        """Newest first; with ``after_seq``, oldest first from just after it (for paging forward).

        Stops early, after at least one event, once :data:`MAX_RESPONSE_BYTES` is reached.
        """
        with journal_read():
            indexed = kind is not None and kind_class is not None and kind_class(kind) != TELEMETRY
            bodies = events_page(db_uri, kind, device_id, after_seq, limit, MAX_RESPONSE_BYTES, indexed)
        return _json_bytes(b"[" + b",".join(bodies) + b"]")

    @router.get("/api/stock")
    def get_stock(
        sku: Annotated[str | None, Query(max_length=64)] = None,
        low_only: bool = False,
        after_sku: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_STOCK_ROWS)] = MAX_STOCK_ROWS,
    ) -> Response:
        """One page of the ledger in SKU order; page on with ``after_sku`` = the last SKU received."""
        with journal_read():
            rows = stock_page(db_uri, sku, low_only, after_sku, limit)
        return _json_bytes(orjson.dumps([_stock_item(row) for row in rows]))

    @router.get("/api/receipts/{device_id}/{receipt_no:path}")
    def get_receipt(
        device_id: Annotated[str, PathParam(pattern=ID_PATTERN, max_length=64)],
        receipt_no: Annotated[
            str, PathParam(min_length=1, max_length=MAX_RECEIPT_NO, pattern=RECEIPT_NO_PATTERN)
        ],
    ) -> Response:
        """The committed ``pos.sale`` or ``pos.return`` of ``device_id`` with this receipt number, and the
        returns (any device) naming it as ``original_receipt_no``, each with ``delivered_to_hq``: HQ's broker
        has acknowledged it (its seq is at or below its class's delivered watermark, as persisted). 404 when
        the journal holds no such receipt."""
        return _json_bytes(orjson.dumps(receipt_report(db_uri, device_id, receipt_no)))

    @router.get("/api/quarantine")
    def get_quarantine(limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100) -> Response:
        """Most recent first; the payload is a preview, as text only when it is plain printable UTF-8."""
        with journal_read():
            rows = quarantine_page(db_uri, limit)
        return _json_bytes(orjson.dumps([_quarantined(row) for row in rows]))

    return router


def _stock_item(row: StockRow) -> dict[str, Any]:
    sku, on_hand, safety, updated_seq, low = row
    return {
        "sku": sku,
        "on_hand": on_hand,
        "safety_stock": safety,
        "updated_seq": updated_seq,
        "low": bool(low),
    }


def _quarantined(row: QuarantineRow) -> dict[str, Any]:
    qid, received_at, driver, device_id, topic, reason, detail, size, payload = row
    return {
        "qid": qid,
        "received_at": received_at,
        "driver": driver,
        "device_id": device_id,
        "topic": topic,
        "reason": reason,
        "detail": detail,
        "size": size,
        "payload": payload_preview(None if payload is None else _as_bytes(payload), size),
    }


def receipt_report(db_uri: str, device_id: str, receipt_no: str) -> dict[str, Any]:
    """The body of ``/api/receipts/{device_id}/{receipt_no}`` from one snapshot of the journal; raises 404."""
    with journal_read():
        own, returns = receipt_rows(db_uri, device_id, receipt_no, MAX_RECEIPT_EVENTS)
    if not own:
        raise HTTPException(
            status_code=404,
            detail=f"no pos.sale or pos.return with receipt_no {receipt_no!r} from device {device_id!r}"
            " in the journal: never received (or quarantined: see /api/quarantine), or removed after"
            " delivery (outbox TTL)",
        )
    seen = {row[0] for row in own}
    events = [_receipt_event(row, "receipt_no") for row in own]
    events += [_receipt_event(row, "original_receipt_no") for row in returns if row[0] not in seen]
    events.sort(key=lambda e: int(e["seq"]))
    return {
        "device_id": device_id,
        "receipt_no": receipt_no,
        "delivered_to_hq": all(e["delivered_to_hq"] for e in events if e["match"] == "receipt_no"),
        "events": events,
    }


def _receipt_event(row: ReceiptRow, match: str) -> dict[str, Any]:
    seq, event_id, kind, device_id, recorded_at, cls, body, delivered_seq = row
    envelope = orjson.loads(body)
    data = envelope.get("data") or {}
    return {
        "seq": seq,
        "id": event_id,
        "kind": kind,
        "match": match,
        "device_id": device_id,
        "receipt_no": data.get("receipt_no"),
        "original_receipt_no": data.get("original_receipt_no"),
        "occurred_at": envelope.get("occurred_at"),
        "recorded_at": recorded_at,
        "class": CLASSES[cls] if 0 <= cls < len(CLASSES) else str(cls),
        "delivered_seq": delivered_seq,
        "delivered_to_hq": delivered_seq is not None and seq <= delivered_seq,
    }


def payload_preview(payload: bytes | None, size: int) -> dict[str, Any] | None:
    """The first :data:`PREVIEW_BYTES` of a payload, safe to show: printable UTF-8 text, otherwise base64."""
    if payload is None:
        return None
    head = payload[:PREVIEW_BYTES]
    truncated = max(size, len(payload)) > len(head)
    text = _printable_text(head, cut=len(payload) > len(head))
    if text is not None:
        return {"encoding": "text", "data": text, "truncated": truncated}
    return {"encoding": "base64", "data": base64.b64encode(head).decode("ascii"), "truncated": truncated}


def _printable_text(data: bytes, *, cut: bool) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        # The cut may split the last character: drop that partial character, nothing else.
        if not (cut and err.reason == "unexpected end of data" and err.end == len(data)):
            return None
        text = data[: err.start].decode("utf-8")
    if all(ch.isprintable() or ch in "\t\n\r" for ch in text):
        return text
    return None


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _json_bytes(content: bytes) -> Response:
    return Response(content, media_type=_JSON, headers={"cache-control": "no-store"})


@contextlib.contextmanager
def journal_read() -> Iterator[None]:
    """Around a journal read: a database that cannot be read makes the request fail with 503 (logged)."""
    try:
        yield
    except sqlite3.Error as err:
        _LOGGER.warning("journal read failed: %s", err)
        raise HTTPException(status_code=503, detail="journal not available") from err


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside someone else's event loop: installs no signal handlers, reports when it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the process's SIGINT/SIGTERM handlers with its own; the gateway owns them.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


async def serve_api(
    app: FastAPI,
    host: str,
    port: int,
    started: asyncio.Event | None = None,
    bound_port: list[int] | None = None,
    *,
    limits: ConnectionLimits | None = None,
) -> None:
    """Serve ``app`` until cancelled, then close the listener and the connections before re-raising.

    Port 0 picks a free port; the port actually bound is appended to ``bound_port``, and ``started`` is set
    once connections are accepted. ``limits`` bound the connections (slowloris): see :class:`ConnectionLimits`.
    Raises :class:`ApiError` when the address cannot be bound.
    """
    limits = limits or ConnectionLimits()
    guard = ConnectionGuard(limits, getattr(app.state, "api_metrics", None))
    # Binding here rather than in uvicorn: uvicorn answers a bind failure with sys.exit(), which must not
    # escape from one task of the gateway's TaskGroup.
    sock = await _bind(host, port)
    try:
        actual_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            host=host,
            port=actual_port,
            http=guarded_protocol(guard),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            # The guard bounds connections; this bounds requests still running after their connection closed.
            limit_concurrency=limits.max_connections + 1,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )

        def on_started() -> None:
            _LOGGER.info("local API listening on %s:%d", host, actual_port)
            if bound_port is not None:
                bound_port.append(actual_port)
            if started is not None:
                started.set()

        server = _EmbeddedServer(config, on_started)
        try:
            await server.serve(sockets=[sock])
        except asyncio.CancelledError:
            # uvicorn's own shutdown runs only when its main loop ends by itself; run it for cancellation too.
            if server.started:
                await server.shutdown(sockets=[sock])
                _LOGGER.info("local API stopped")
            raise
    finally:
        sock.close()


async def _bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket, made as asyncio's create_server makes it.

    The protocol number must come from getaddrinfo: asyncio sets TCP_NODELAY only on sockets whose ``proto``
    is IPPROTO_TCP, and without it every keep-alive response waits ~40 ms for a delayed ACK.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ApiError(f"local API cannot listen on {host}:{port}: {err}") from err
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ApiError(f"local API cannot listen on {host}:{port}: {err}") from err
    return sock
