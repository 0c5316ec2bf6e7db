"""The local API's defences, below its routes: the body limit and the bearer token (ASGI middleware), and the
connection guard against silent sockets.

uvicorn gives a request unlimited time to arrive, so silent sockets could hold every connection slot
(slowloris). The server's protocol (:class:`_GuardedH11Protocol`) closes a connection that keeps it waiting
(:class:`ConnectionLimits`), bounds the connections of one client address, and lets a new connection take the
slot of the oldest one still waiting for a request head (docs/API.md#connections).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import h11
import orjson
from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.api.session import COOKIE, Session
from gateway.kernel.config import WEBHOOK_PREFIX, Role

MAX_BODY_BYTES: Final = 64 * 1024
"""Largest request body accepted, on every route (present and future) but webhooks."""
WEBHOOK_MAX_BODY_BYTES: Final = 512 * 1024
"""Cloud POS webhooks carry whole receipts (about 1-1.5 KB per line, form-encoded); each HTTP source also has
its own ``max_payload_bytes``, checked after its signature."""
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
OPEN_PATHS: Final = frozenset({"/health"})
"""Paths served without a token."""
UI_PREFIX: Final = "/ui"
"""The local page: its own login (a session cookie from the config's tokens), checked by its routes."""
SESSION_READABLE: Final[dict[str, Role]] = {
    "/api/devices": "viewer",
    "/api/alerts": "viewer",
    "/api/stock": "viewer",
    "/api/haccp": "viewer",
    "/api/events": "technician",
    "/api/quarantine": "technician",
    "/api/attendance.csv": "manager",
    "/api/reports/daily": "manager",
}
"""What a logged-in page may also GET with its cookie instead of the token (the downloads, a device's readings),
and the least role that may: staff names (attendance) and whole events are not for every viewer."""

_JSON: Final = "application/json"


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

    def __init__(
        self, app: ASGIApp, token: str, session: Callable[[str | None], Session | None] | None = None
    ) -> None:
        """``session``: the local page's cookie check (None: no page), for :data:`SESSION_READABLE`."""
        self.app = app
        self._expected = b"bearer " + token.encode("utf-8")
        self._session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(WEBHOOK_PREFIX):
            # Webhooks come from cloud POS services that cannot hold our token: each source's HMAC
            # signature authenticates them instead (drivers/http).
            await self.app(scope, receive, send)
            return
        if self._session is not None and (path == UI_PREFIX or path.startswith(UI_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        least = SESSION_READABLE.get(path)
        if given is None and self._session is not None and least is not None and scope.get("method") == "GET":
            session = self._session(cookie(scope, COOKIE))
            if session is not None and session.may(least):
                await self.app(scope, receive, send)
                return
            if session is not None:
                await _send_json(send, 403, {"detail": f"your role ({session.role}) may not read this"})
                return
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


def cookie(scope: Scope, name: str) -> str | None:
    """A request's cookie by name, as the routes' requests read it (Starlette's parser, the first Cookie header),
    or None."""
    for key, value in scope["headers"]:
        if key == b"cookie":
            return cookie_parser(bytes(value).decode("latin-1")).get(name)
    return None


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


class ConnectionGuard:
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

    guard: ClassVar[ConnectionGuard]
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


def guarded_protocol(guard: ConnectionGuard) -> type[_GuardedH11Protocol]:
    """A protocol class bound to one server's guard (uvicorn builds its protocols from a class)."""

    class GuardedH11Protocol(_GuardedH11Protocol):
        pass

    GuardedH11Protocol.guard = guard
    return GuardedH11Protocol
