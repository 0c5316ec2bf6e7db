"""The HTTP intake driver: one ``POST /webhooks/<source id>`` route per source on the local API.

Each request is checked in this order: the source's HMAC signature (401, counted, and at most a bounded
note in the quarantine: never the body of a request nobody authenticated), the freshness of its signed time
(403 ``stale`` or ``ahead``, counted and noted the same way: drivers/http/freshness.py), its size (413), its
mapping (400 and quarantined with the reason; a JSON key or form field given twice is ``duplicate_key``), then
the journal. The answer is 200 only once every event the
webhook carries is committed to disk (422 when the journal quarantined one: too large for it, or a
processor failed on it); 429 (the source's rate limit) and 503 (journal busy, commit slower
than ``ack_timeout_s``, or the gateway stopping) carry ``Retry-After`` so the cloud POS sends it again.
A webhook sent again is harmless: its dedup key (source, kind, register, the sale's identity) makes the
journal drop it, and the answer is 200 again; the journal remembers dedup keys for ``dedup_retention_days``,
longer than any freshness window, so a replay is refused by one or the other.

Freshness needs a true clock. Until the gateway's clock is synchronised (gateway/kernel/clock.py: a box without a
real-time clock may boot years off), the window is not applied, since it would refuse every genuine webhook
or accept every old one at random; each webhook let through unchecked is counted in
``storegw_webhook_freshness_unchecked_total``, and the dedup keys still refuse replays.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import ClientDisconnect

from drivers.base import DecodeError, DriverContext
from drivers.devices import Device
from drivers.http import freshness
from drivers.http.config import HttpDriverConfig, HttpProfile, HttpSource, Window
from drivers.http.generic import map_generic
from drivers.http.lightspeed import map_lightspeed
from drivers.http.mapped import Ignored, Mapper
from drivers.http.signatures import TIMESTAMP_HEADER, signed_timestamp, verify
from drivers.http.square import map_square
from drivers.profiles import get_profile
from gateway.kernel.config import WEBHOOK_PREFIX
from gateway.kernel.logs import register_secret
from gateway.kernel.ratelimit import TokenBucket

_LOGGER = logging.getLogger(__name__)

NOTE_RATE_PER_S: Final = 0.2
NOTE_BURST: Final = 5
"""Quarantine notes about unauthenticated requests, per source: a flood of them cannot wash out the rest."""
STOPPING_RETRY_S: Final = 5

_Outcome = Literal["committed", "duplicate", "quarantined"]

_UNCHECKED: Final[weakref.WeakKeyDictionary[CollectorRegistry, Counter]] = weakref.WeakKeyDictionary()


def _unchecked_counter(registry: CollectorRegistry) -> Counter:
    """``storegw_webhook_freshness_unchecked_total``, registered once per registry (one per HTTP driver)."""
    counter = _UNCHECKED.get(registry)
    if counter is None:
        counter = _UNCHECKED[registry] = Counter(
            "storegw_webhook_freshness_unchecked",
            "Webhooks whose signed time was not checked because the gateway's clock is not synchronised.",
            ["driver"],
            registry=registry,
        )
    return counter


@dataclass(slots=True)
class _Source:
    config: HttpSource
    device: Device
    mapper: Mapper
    secret: str
    notes: TokenBucket


class HttpIntake:
    """One driver instance: its routes are mounted by the local API; ``run`` only keeps its state."""

    def __init__(self, config: HttpDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._ctx = ctx
        self._sink = ctx.sink(config.name)
        self._ack_timeout = config.ack_timeout_s
        self._accepting = True
        self._dropped: Callable[[str], Any] = functools.partial(ctx.metrics.dropped.labels, config.name)
        self._unchecked = _unchecked_counter(ctx.metrics.registry).labels(config.name)
        self.clock = ctx.clock
        """Whether wall time can be trusted for freshness windows (the gateway's; tests replace it)."""
        router = APIRouter()
        for source in config.sources:
            secret = source.secret.get_secret_value()
            register_secret(secret)
            entry = _Source(
                source,
                ctx.devices.add(
                    source.id,
                    config.name,
                    source.limits_over(get_profile(source.profile_name, HttpProfile).limits),
                    source.profile_name,
                ),
                _mapper(source),
                secret,
                TokenBucket(NOTE_RATE_PER_S, NOTE_BURST, ctx.devices.monotonic()),
            )
            router.add_api_route(
                f"{WEBHOOK_PREFIX}{source.id}",
                self._endpoint(entry),
                methods=["POST"],
                name=f"webhook-{source.id}",
            )
        ctx.api_routers.append(router)

    async def run(self) -> None:
        """Nothing to connect to: requests come through the local API. Waits until cancelled."""
        if self._ctx.config.api.enabled:
            self._ctx.set_state(self.name, True)
        else:
            _LOGGER.error("%s: the local API is disabled (api.enabled), so no webhook can arrive", self.name)
            self._ctx.set_state(self.name, False, "the local API is disabled: webhooks cannot arrive")
        try:
            await asyncio.Event().wait()
        finally:
            self._ctx.set_state(self.name, False, "stopped")

    def pause(self) -> None:
        """Shutdown: answer 503 from now on (the cloud POS retries later); requests in hand still commit."""
        self._accepting = False

    def _endpoint(self, source: _Source) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._handle(source, request)

        return endpoint

    async def _handle(self, source: _Source, request: Request) -> Response:
        if not self._accepting:
            return _reply(503, {"status": "stopping"}, retry_after=STOPPING_RETRY_S)
        try:
            body = await request.body()
        except ClientDisconnect:  # the API closed a request whose body stopped coming (gateway/api.py)
            return _reply(408, {"status": "timeout"})
        refusal = self._authenticate(source, request, body)
        if refusal is not None:
            return refusal
        config, device = source.config, source.device
        limits = device.limits
        if len(body) > limits.max_payload_bytes:
            detail = f"{len(body)} bytes > max_payload_bytes {limits.max_payload_bytes}"
            self._sink.reject(device, "too_large", detail, body, size=len(body))
            return _reply(413, {"status": "too_large", "detail": detail})
        try:
            outcome = source.mapper(body)
        except DecodeError as err:
            return self._quarantine(device, err.reason, err.detail, body)
        except Exception as err:  # a mapper bug: quarantine the body, never a 500
            _LOGGER.exception("%s: mapping a webhook of %s failed", self.name, config.id)
            return self._quarantine(device, "internal_error", repr(err)[:300], body)
        if isinstance(outcome, Ignored):
            self._dropped("ignored").inc()
            device.seen()
            return _reply(200, {"status": "ignored", "reason": outcome.reason})
        loop = asyncio.get_running_loop()
        outcomes: list[asyncio.Future[_Outcome]] = []
        for event in outcome:
            pending = _Pending(loop, loop.create_future())
            taken = self._sink.emit(
                device,
                event.kind,
                event.data,
                size=len(body),
                occurred_at=event.occurred_at,
                dedup_key=event.dedup_key(config.id),
                ack=pending.acked,
                raw=body,
                done=pending.done,
            )
            if not taken:
                if pending.future.done():  # acknowledged at once: the source's rate limit dropped it
                    retry = max(1, math.ceil(1 / limits.rate_limit_per_s))
                    return _reply(429, {"status": "rate_limited"}, retry_after=retry)
                return _reply(503, {"status": "journal_busy"}, retry_after=1)
            outcomes.append(pending.future)
        try:
            async with asyncio.timeout(self._ack_timeout):
                results = await asyncio.gather(*outcomes)
        except TimeoutError:
            # Still queued: it commits, and the retry is then dropped as a replay.
            return _reply(503, {"status": "not_committed_yet"}, retry_after=1)
        quarantined = results.count("quarantined")
        if quarantined:
            # The journal kept the event in quarantine (too large for it, or a processor failed on it): it is
            # not in the ledger, and sending it again would not change that.
            _LOGGER.warning("%s: a webhook of %s was quarantined by the journal", self.name, config.id)
            return _reply(422, {"status": "quarantined", "events": len(results), "quarantined": quarantined})
        return _reply(200, {"status": "committed", "events": len(results)})

    def _quarantine(self, device: Device, reason: str, detail: str, body: bytes) -> Response:
        self._sink.reject(device, reason, detail, body)
        return _reply(400, {"status": "quarantined", "reason": reason, "detail": detail})

    def _authenticate(self, source: _Source, request: Request, body: bytes) -> Response | None:
        """None when the signature is right and the signed time fresh; otherwise the answer (401 or 403)."""
        config = source.config
        client = request.client.host if request.client else "?"
        window = config.freshness
        signature = request.headers.get(config.header)
        try:
            timestamp = None
            if window is not None and config.format == "generic" and signature:
                timestamp = signed_timestamp(request.headers.get(TIMESTAMP_HEADER))
            verify(
                config.format,
                source.secret,
                signature,
                body,
                config.notification_url,
                timestamp,
            )
        except DecodeError as err:
            self._refused(source, err, len(body), client)
            return _reply(401, {"status": "unauthenticated", "reason": err.reason})
        if window is None:
            return None
        try:
            signed_at = float(timestamp) if timestamp is not None else freshness.square_signed_at(body)
            if signed_at is not None:  # None: a square body that is not an object (quarantined as such)
                self._check_fresh(window, signed_at)
        except DecodeError as err:
            self._refused(source, err, len(body), client)
            return _reply(403, {"status": "refused", "reason": err.reason, "detail": err.detail})
        return None

    def _check_fresh(self, window: Window, signed_at: float) -> None:
        """:class:`DecodeError` when ``signed_at`` is outside ``window``; only counted while the clock is not
        synchronised (see the module's docstring)."""
        if not self.clock.synced():
            self._unchecked.inc()
            return
        freshness.check(signed_at, time.time(), window)

    def _refused(self, source: _Source, err: DecodeError, size: int, client: str) -> None:
        """An unauthenticated or replayed webhook: counted always; a quarantine note (reason, size, client
        address; no body) at most every few s."""
        self._dropped(err.reason).inc()
        if source.notes.take(self._ctx.devices.monotonic()):
            detail = f"{err.detail} (from {client}, {size} bytes; the body is not kept)"
            _LOGGER.warning("%s: webhook for %s refused: %s", self.name, source.config.id, detail)
            self._sink.reject(source.device, err.reason, detail, b"", size=size)
        else:
            _LOGGER.debug("%s: webhook for %s refused: %s", self.name, source.config.id, err.detail)


def _mapper(source: HttpSource) -> Mapper:
    if source.format == "lightspeed":
        assert source.currency is not None  # the config requires it for lightspeed
        return functools.partial(map_lightspeed, currency=source.currency)
    if source.format == "square":
        return functools.partial(map_square, register_id=source.register_id)
    return map_generic


@dataclass(slots=True)
class _Pending:
    """One event in the journal's hands. Its ``done`` (writer thread, after COMMIT; brought to the loop with
    call_soon_threadsafe, so before the ack) notes the outcome; the ack resolves the future, after the
    journal's own bookkeeping. An ack without ``done``: rate-limited, or quarantined by the journal."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_Outcome]
    outcome: _Outcome = "quarantined"

    def done(self, seq: int | None) -> None:
        self.loop.call_soon_threadsafe(self._note, "committed" if seq is not None else "duplicate")

    def _note(self, outcome: _Outcome) -> None:
        self.outcome = outcome

    def acked(self) -> None:
        if not self.future.done():
            self.future.set_result(self.outcome)


def _reply(status: int, body: dict[str, Any], retry_after: int | None = None) -> Response:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
