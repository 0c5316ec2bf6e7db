"""The local HTTP API: health for probes, Prometheus metrics, and read-only views of the journal.

``/api/receipts/{device_id}/{receipt_no}`` answers whether a receipt was committed and whether HQ's broker has
acknowledged it (the per-class delivered watermark, docs/OUTBOX.md); ``store-gateway hq-receiver receipt``
proves at HQ that it is stored there.

It runs inside the gateway's own event loop and TaskGroup (:func:`serve_api`): uvicorn installs no signal
handlers, the gateway owns SIGINT/SIGTERM. Everything but ``/health`` needs ``Authorization: Bearer <token>``.
Journal reads run in FastAPI's threadpool, each on a short-lived read-only SQLite connection beside the
journal's writer (WAL lets readers and the writer run at once); event bodies are the stored envelope bytes,
passed on untouched.

uvicorn gives a request unlimited time to arrive, so silent sockets could hold every connection slot
(slowloris). The server's protocol (:class:`_GuardedH11Protocol`) closes a connection that keeps it waiting
(:class:`ConnectionLimits`), bounds the connections of one client address, and lets a new connection take the
slot of the oldest one still waiting for a request head (docs/API.md#connections).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import logging
import os
import socket
import sqlite3
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final

import h11
import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.kernel.config import WEBHOOK_PREFIX
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.metrics import Metrics
from gateway.kernel.model import ID_PATTERN
from gateway.kernel.outbox import CLASSES

_LOGGER = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 64 * 1024
"""Largest request body accepted, on every route (present and future) but webhooks."""
WEBHOOK_MAX_BODY_BYTES: Final = 512 * 1024
"""Cloud POS webhooks carry whole receipts (about 1-1.5 KB per line, form-encoded); each HTTP source also has
its own ``max_payload_bytes``, checked after its signature."""

MAX_EVENTS: Final = 1000
"""Most events one ``/api/events`` call returns."""

MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
"""Most event bytes one ``/api/events`` call returns: a page of big receipts must not exhaust a small box."""

PREVIEW_BYTES: Final = 512
"""How much of a quarantined payload ``/api/quarantine`` shows."""

MAX_CONNECTIONS: Final = 64
"""Open connections at most: bounds the API's memory on a small box (docs/API.md#connections)."""
MAX_CONNECTIONS_PER_CLIENT: Final = 48
"""Open connections from one client address at most: one address never takes every slot. Three quarters of
them, because a reverse proxy in front brings every sender under its one address."""
IDLE_TIMEOUT_S: Final = 5.0
"""While the API waits for a request's head or body, a connection that sends nothing this long is closed."""
REQUEST_TIMEOUT_S: Final = 30.0
"""A request's head and body must arrive within this long (a trickle of bytes is no way around the idle
deadline): 512 KiB takes 30 s at 17 KB/s."""
MAX_QUERY_INT: Final = 2**63 - 1
"""Largest integer a query parameter takes: SQLite's INTEGER range (a larger one would overflow the binding)."""

SHUTDOWN_GRACE_S: Final = 5
"""How long a stopping server waits for requests in flight before cancelling them."""

OPEN_PATHS: Final = frozenset({"/health"})
"""Paths served without a token."""

_JSON: Final = "application/json"


MAX_STOCK_ROWS = 5000
"""Largest page of /api/stock (a convenience store carries a few thousand SKUs)."""

RECEIPT_NO_PATTERN: Final = r"^[^\x00-\x1f\x7f]+$"
MAX_RECEIPT_NO: Final = 64
"""A receipt number as the gateway accepts it (gateway/kernel/events.py ``ShortText``): 1-64 characters, no control
characters. It may hold ``/``: the route takes the rest of the path (``%2F`` works too)."""
MAX_RECEIPT_EVENTS: Final = 100
"""Most events ``/api/receipts`` returns per way of matching (a receipt has a sale and a few returns)."""
_RECEIPT_EVENTS: Final = (
    "SELECT e.seq, e.id, e.kind, e.device_id, e.recorded_at, e.cls, e.body, s.delivered_seq"
    " FROM events e LEFT JOIN outbox_state s ON s.cls = e.cls"
    " WHERE e.kind IN ('pos.sale', 'pos.return') AND {test} ORDER BY e.seq LIMIT ?"
)
"""Sales and returns (index events_kind), matched on their body, with their class's delivered watermark."""
_OWN_RECEIPT: Final = _RECEIPT_EVENTS.format(
    test="e.device_id = ? AND json_extract(CAST(e.body AS TEXT), '$.data.receipt_no') = ?"
)
_RETURNS_OF: Final = _RECEIPT_EVENTS.format(
    test="e.kind = 'pos.return' AND json_extract(CAST(e.body AS TEXT), '$.data.original_receipt_no') = ?"
)


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
) -> FastAPI:
    """The API application. ``health`` runs on the event loop thread, so it must be cheap and never block."""
    if not token:
        raise ValueError("the API token must not be empty")
    db_uri = db_path.absolute().as_uri() + "?mode=ro"
    app = FastAPI(
        title="store-gateway local API",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    # Added last, so outermost: an oversized request is refused before anything else looks at it.
    app.add_middleware(BearerAuthMiddleware, token=token)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.state.api_metrics = api_metrics(metrics.registry)  # serve_api counts its connections there

    for router in routers:
        app.include_router(router)

    @app.get("/api/devices")
    async def get_devices() -> Response:
        """Every configured device's health: status, last seen, message/error/quarantine/rate-limit counts."""
        return Response(orjson.dumps(devices() if devices else []), media_type=_JSON)

    @app.get("/health")
    async def get_health() -> Response:
        try:
            report = health()
        except Exception:
            _LOGGER.exception("health check failed")
            report = {"status": "degraded", "error": "health check failed"}
        status = 200 if report.get("status") == "ok" else 503
        return Response(orjson.dumps(report, default=str), status_code=status, media_type=_JSON)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/events")
    def get_events(
        kind: Annotated[str | None, Query(max_length=64)] = None,
        device_id: Annotated[str | None, Query(max_length=64)] = None,
        after_seq: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
    ) -> Response:
        """Newest first; with ``after_seq``, oldest first from just after it (for paging forward).

        Stops early, after at least one event, once :data:`MAX_RESPONSE_BYTES` is reached.
        """
        where: list[str] = []
        params: list[Any] = []
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if after_seq is not None:
            where.append("seq > ?")
            params.append(after_seq)
        sql = "SELECT body FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?" if after_seq is None else " ORDER BY seq ASC LIMIT ?"
        params.append(limit)
        return _json_bytes(b"[" + b",".join(_read_bodies(db_uri, sql, params)) + b"]")

    @app.get("/api/stock")
    def get_stock(
        sku: Annotated[str | None, Query(max_length=64)] = None,
        low_only: bool = False,
        after_sku: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_STOCK_ROWS)] = MAX_STOCK_ROWS,
    ) -> Response:
        """One page of the ledger in SKU order; page on with ``after_sku`` = the last SKU received."""
        sql = "SELECT sku, on_hand, safety_stock, updated_seq, low FROM stock"
        where: list[str] = []
        params: list[Any] = []
        if sku is not None:
            where.append("sku = ?")
            params.append(sku)
        if low_only:
            where.append("low != 0")
        if after_sku is not None:
            where.append("sku > ?")
            params.append(after_sku)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = _read(db_uri, sql + " ORDER BY sku LIMIT ?", [*params, limit])
        return _json_bytes(
            orjson.dumps(
                [
                    {
                        "sku": s,
                        "on_hand": on_hand,
                        "safety_stock": safety,
                        "updated_seq": useq,
                        "low": bool(low),
                    }
                    for s, on_hand, safety, useq, low in rows
                ]
            )
        )

    @app.get("/api/receipts/{device_id}/{receipt_no:path}")
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

    @app.get("/api/quarantine")
    def get_quarantine(limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100) -> Response:
        """Most recent first; the payload is a preview, as text only when it is plain printable UTF-8."""
        rows = _read(
            db_uri,
            "SELECT qid, received_at, driver, device_id, topic, reason, detail, size, payload"
            " FROM quarantine ORDER BY qid DESC LIMIT ?",
            (limit,),
        )
        return _json_bytes(
            orjson.dumps(
                [
                    {
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
                    for qid, received_at, driver, device_id, topic, reason, detail, size, payload in rows
                ]
            )
        )

    return app


def receipt_report(db_uri: str, device_id: str, receipt_no: str) -> dict[str, Any]:
    """The body of ``/api/receipts/{device_id}/{receipt_no}`` from one snapshot of the journal; raises 404."""
    with _journal(db_uri) as conn:
        conn.execute("BEGIN")  # one snapshot for both reads and the watermarks
        own = conn.execute(_OWN_RECEIPT, (device_id, receipt_no, MAX_RECEIPT_EVENTS)).fetchall()
        returns = conn.execute(_RETURNS_OF, (receipt_no, MAX_RECEIPT_EVENTS)).fetchall() if own else []
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


def _receipt_event(row: Sequence[Any], match: str) -> dict[str, Any]:
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
def _journal(db_uri: str) -> Iterator[sqlite3.Connection]:
    """A fresh read-only connection (0.3 ms to open): no state shared between threads; errors become 503."""
    try:
        with contextlib.closing(sqlite3.connect(db_uri, uri=True, timeout=5.0)) as conn:
            yield conn
    except sqlite3.Error as err:
        _LOGGER.warning("journal read failed: %s", err)
        raise HTTPException(status_code=503, detail="journal not available") from err


def _read(db_uri: str, sql: str, params: Sequence[Any]) -> list[Any]:
    with _journal(db_uri) as conn:
        return conn.execute(sql, params).fetchall()


def _read_bodies(db_uri: str, sql: str, params: Sequence[Any]) -> list[bytes]:
    """The first column of each row, as bytes, until :data:`MAX_RESPONSE_BYTES` (at least one row)."""
    bodies: list[bytes] = []
    total = 0
    with _journal(db_uri) as conn:
        for (body,) in conn.execute(sql, params):
            data = _as_bytes(body)
            if bodies and total + len(data) > MAX_RESPONSE_BYTES:
                break
            bodies.append(data)
            total += len(data)
    return bodies


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int, webhook_max_bytes: int = WEBHOOK_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.webhook_max_bytes = webhook_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.webhook_max_bytes if scope.get("path", "").startswith(WEBHOOK_PREFIX) else self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_json(send, 413, {"detail": "request body too large"})
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the endpoint's body read, so FastAPI answers 413 itself.
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            # Only when the body was read outside an endpoint (by another middleware).
            if response_started:
                raise
            await _send_json(send, 413, {"detail": "request body too large"})


class BearerAuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` on every path but :data:`OPEN_PATHS`, unknown paths too."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = b"bearer " + token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(WEBHOOK_PREFIX):
            # Webhooks come from cloud POS services that cannot hold our token: each source's HMAC
            # signature authenticates them instead (drivers/http).
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is None:
            await _send_json(
                send,
                401,
                {"detail": "bearer token required"},
                [(b"www-authenticate", b'Bearer realm="store-gateway"')],
            )
            return
        # The scheme is case-insensitive; compare_digest takes the same time whatever the token's content.
        scheme, _, rest = given.partition(b" ")
        if not hmac.compare_digest(scheme.lower() + b" " + rest.strip(), self._expected):
            await _send_json(
                send,
                401,
                {"detail": "invalid bearer token"},
                [(b"www-authenticate", b'Bearer realm="store-gateway", error="invalid_token"')],
            )
            return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    content = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _JSON.encode()),
                (b"content-length", str(len(content)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How the API keeps its connection slots for clients that send requests (docs/API.md#connections)."""

    max_connections: int = MAX_CONNECTIONS
    per_client: int = MAX_CONNECTIONS_PER_CLIENT
    idle_timeout_s: float = IDLE_TIMEOUT_S
    request_timeout_s: float = REQUEST_TIMEOUT_S


class ApiMetrics:
    """The connection defence's own counters, beside the gateway's (gateway/kernel/metrics.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "storegw_api_connections", "Connections open to the local API.", registry=registry
        )
        self.dropped = Counter(
            "storegw_api_connections_dropped",
            "Connections to the local API refused or closed to keep its slots, by reason.",
            ["reason"],
            registry=registry,
        )


_API_METRICS: Final[weakref.WeakKeyDictionary[CollectorRegistry, ApiMetrics]] = weakref.WeakKeyDictionary()


def api_metrics(registry: CollectorRegistry) -> ApiMetrics:
    """The API's counters in ``registry``, registered once however many apps share it."""
    found = _API_METRICS.get(registry)
    if found is None:
        found = _API_METRICS[registry] = ApiMetrics(registry)
    return found


def _raw_response(status: int, reason: str, detail: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written below h11 (no request was parsed)."""
    body = orjson.dumps({"detail": detail})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%bconnection: close\r\n\r\n%b"
        % (status, reason.encode(), len(body), extra, body)
    )


_REFUSED: Final = _raw_response(503, "Service Unavailable", "too many connections", b"retry-after: 1\r\n")
_TIMED_OUT: Final = _raw_response(408, "Request Timeout", "the request did not arrive in time")


class _ConnectionGuard:
    """Admits, evicts and times out the connections of one server (all on the event loop thread).

    A connection waiting for a request head is the only kind ever evicted: a request being received or answered
    keeps its slot until its deadlines pass.
    """

    def __init__(self, limits: ConnectionLimits, metrics: ApiMetrics | None) -> None:
        self.limits = limits
        self._metrics = metrics
        self._open: dict[_GuardedH11Protocol, None] = {}  # admission order: the first is the oldest
        self._per_client: collections.Counter[str] = collections.Counter()

    def admit(self, conn: _GuardedH11Protocol) -> bool:
        """Takes a slot for ``conn``, evicting an idle connection when full; False when none can be freed."""
        if self._per_client[conn.client_host] >= self.limits.per_client and not self._evict(
            c for c in self._open if c.client_host == conn.client_host
        ):
            self.count("client_limit")
            return False
        if len(self._open) >= self.limits.max_connections and not self._evict(iter(self._open)):
            self.count("full")
            return False
        self._open[conn] = None
        self._per_client[conn.client_host] += 1
        self._gauge()
        return True

    def release(self, conn: _GuardedH11Protocol) -> None:
        if self._open.pop(conn, False) is None:
            self._per_client[conn.client_host] -= 1
            if self._per_client[conn.client_host] <= 0:
                del self._per_client[conn.client_host]
            self._gauge()

    def count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.dropped.labels(reason).inc()

    def _evict(self, candidates: Iterator[_GuardedH11Protocol]) -> bool:
        victim = next((c for c in candidates if c.awaiting_request()), None)
        if victim is None:
            return False
        victim.drop("evicted")
        return True

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.connections.set(len(self._open))


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the slot defence uvicorn lacks: it has no deadline for a request's head or
    body (``timeout_keep_alive`` only runs between requests) and no per-client limit, so silent sockets held
    ``limit_concurrency`` for as long as they stayed open (slowloris)."""

    guard: ClassVar[_ConnectionGuard]
    client_host: str
    _admitted: bool
    _wait_started: float
    _last_data: float
    _timer: asyncio.TimerHandle | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self.client_host = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        self._timer = None
        self._wait_started = self._last_data = self.loop.time()
        self._admitted = self.guard.admit(self)
        if not self._admitted:
            transport.write(_REFUSED)
            transport.close()
            return
        super().connection_made(transport)
        self._schedule(self._wait_started + self.guard.limits.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._admitted:
            return
        self.guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)

    def on_response_complete(self) -> None:
        # The wait for the next request on this connection starts now.
        self._wait_started = self._last_data = self.loop.time()
        super().on_response_complete()

    def awaiting_request(self) -> bool:
        """Nothing of a request is being received or answered: the connection may be evicted."""
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def drop(self, reason: str) -> None:
        """Closes the connection to free its slot; a request half received is answered 408."""
        self.guard.count(reason)
        self.guard.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                self.transport.write(_TIMED_OUT)
            cycle.disconnected = True  # the app's answer, if it comes, goes nowhere
        elif self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(_TIMED_OUT)  # part of a request head came
        self.transport.close()

    def _waiting_for_client(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.flow.read_paused

    def _schedule(self, when: float) -> None:
        self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        limits = self.guard.limits
        now = self.loop.time()
        if not self._waiting_for_client():
            # Answering, or not reading (flow control): the client is not the one keeping us waiting.
            self._last_data = now
            self._schedule(now + min(limits.idle_timeout_s, 1.0))
            return
        idle_end = self._last_data + limits.idle_timeout_s
        request_end = self._wait_started + limits.request_timeout_s
        if now >= idle_end:
            self.drop("idle")
        elif now >= request_end:
            self.drop("too_slow")
        else:
            self._schedule(min(idle_end, request_end))


def _guarded_protocol(guard: _ConnectionGuard) -> type[_GuardedH11Protocol]:
    """A protocol class bound to one server's guard (uvicorn builds its protocols from a class)."""

    class GuardedH11Protocol(_GuardedH11Protocol):
        pass

    GuardedH11Protocol.guard = guard
    return GuardedH11Protocol


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
    guard = _ConnectionGuard(limits, getattr(app.state, "api_metrics", None))
    # Binding here rather than in uvicorn: uvicorn answers a bind failure with sys.exit(), which must not
    # escape from one task of the gateway's TaskGroup.
    sock = await _bind(host, port)
    try:
        actual_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            host=host,
            port=actual_port,
            http=_guarded_protocol(guard),
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
