"""The HQ downlink: commands from HQ, answered on the responses topic (docs/OUTBOX.md, "Downlink commands").

Its own MQTT connection to HQ's broker with a persistent session (``clean_start`` false, client id
``<store>-<gw>-downlink``), so commands HQ sends while the gateway is offline wait at the broker and arrive
when it returns. Commands are handled one at a time, in the order they arrive. A command is acknowledged
(PUBACK) only after its response is published and acknowledged in turn, and after what it changed is committed:
a crash in between makes the broker deliver it again, and the idempotent commands answer ``duplicate``.

Parsing and validation are pure (:mod:`cloud_bridge.commands`); state changes go through the journal:
``stock.adjust`` as a ``stock.adjusted`` event the stock ledger applies in its commit, the documents through
:meth:`gateway.journal.Journal.transact` (one transaction with their ``document.updated`` event). Logs name
the request id, command and outcome, never arguments or document bodies (a roster holds staff names).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from cloud_bridge.commands import (
    DeviceWrite,
    ErrorCode,
    NoArgs,
    Refusal,
    Request,
    Resend,
    Status,
    StockAdjust,
    build_response,
    metric_command,
    parse_command,
    refusal_response,
)
from cloud_bridge.topics import commands_topic, responses_topic
from drivers.base import DriverError
from gateway import __version__
from gateway.clock import BOOT_ID
from gateway.config import GatewayConfig
from gateway.events import StockAdjusted
from gateway.journal import QUEUE_LIMIT, Draft, Journal
from gateway.metrics import Metrics
from gateway.mqtt import Message, MqttClient, MqttError
from gateway.supervise import Backoff, reconnect_forever, tcp_reachable
from rules.documents import DocumentName, Planogram, Roster, RuleSet, store_work
from rules.stock import apply_rule_thresholds, quantity_text

_LOGGER = logging.getLogger(__name__)

INBOX_HIGH: Final = 32
"""Commands received and waiting: above this we stop reading the socket (TCP holds the rest at the broker)."""

Resender = Callable[[int, int], Awaitable[dict[str, list[list[int]]]]]
DeviceWriter = Callable[[str, str, float], Awaitable[None]]
DEVICE_WRITE_TIMEOUT_S: Final = 30.0
"""A ``device.write`` that has not finished by then (a bus busy with retries) is answered as failed."""


class CommandError(Exception):
    """A valid command that could not be carried out; answered with ``code`` and this message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def command_key(request_id: str) -> str:
    """The journal dedup key of the event a state-changing command commits: it applies once per request id."""
    return f"cmd:{request_id}"


class Downlink:
    """Receives HQ's commands and answers them; one connection at a time, reconnecting with backoff."""

    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        metrics: Metrics,
        config_hash: str | None,
        resend: Resender,
        status: Callable[[], dict[str, Any]],
        writers: Mapping[str, DeviceWriter] | None = None,
    ) -> None:
        self._config = config
        self._writers: Mapping[str, DeviceWriter] = writers if writers is not None else {}
        """Device id -> write function of its driver (``DriverContext.device_writers``)."""
        self._hq = config.hq
        self._store_id = config.store.id
        self._gateway_id = config.gateway_id
        self._client_id = config.client_id("downlink", config.hq)
        self._journal = journal
        self._metrics = metrics
        self._config_hash = config_hash
        self._resend = resend
        self._status = status
        prefix = self._hq.topic_prefix
        self._commands_topic = commands_topic(prefix, self._store_id, self._gateway_id)
        self._responses_topic = responses_topic(prefix, self._store_id, self._gateway_id)
        self._client: MqttClient | None = None
        self.ready = asyncio.Event()
        """Set while subscribed to the command topic."""

    async def run(self) -> None:
        """Stay subscribed until cancelled."""
        await reconnect_forever(
            "HQ broker (commands)",
            self._session,
            _LOGGER,
            (MqttError, OSError),
            Backoff(cap=self._hq.reconnect_max_s),
            probe=lambda: tcp_reachable(self._hq.host, self._hq.port),
        )

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def _session(self, up: Callable[[], None]) -> str:
        client = MqttClient(self._hq, self._client_id, clean_start=False, manual_ack=True)
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        def receive(message: Message) -> None:
            inbox.put_nowait(message)
            if inbox.qsize() >= INBOX_HIGH:
                client.pause_reading()

        client.on_message = receive
        self._client = client
        try:
            resumed = await client.connect()
            await client.subscribe([(self._commands_topic, 1)])
            _LOGGER.info(
                "downlink: taking HQ commands on %s (session %s)",
                self._commands_topic,
                "resumed" if resumed else "new",
            )
            up()
            self.ready.set()
            return await self._serve(client, inbox)
        finally:
            self.ready.clear()
            await client.disconnect()

    async def _serve(self, client: MqttClient, inbox: asyncio.Queue[Message]) -> str:
        """Answer commands in arrival order until the connection ends (returns why)."""
        closed = asyncio.ensure_future(client.wait_closed())
        try:
            while True:
                getter = asyncio.ensure_future(inbox.get())
                await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed.done():
                    getter.cancel()
                    return closed.result()  # what was taken but not acknowledged comes again next session
                message = getter.result()
                if inbox.qsize() < INBOX_HIGH // 2:
                    client.resume_reading()
                response = await self.handle(message.topic, bytes(message.payload), bool(message.retain))
                await client.publish(self._responses_topic, response, qos=1)
                client.ack(message.mid, message.qos)
        finally:
            closed.cancel()

    # --- one command --------------------------------------------------------------------------------

    async def handle(self, topic: str, payload: bytes, retained: bool = False) -> bytes:
        """The response to one command; never raises (every failure becomes an error response, or a command
        that crashes the handler would come back after every reconnect)."""
        try:
            parsed = parse_command(payload, topic, self._hq.topic_prefix, self._store_id, self._gateway_id)
        except Exception as err:
            _LOGGER.exception("downlink: parsing a command failed")
            return self._refuse(Refusal(None, None, "failed", _reason(err)))
        if isinstance(parsed, Refusal):
            return self._refuse(parsed)
        if retained:
            # A retained command would run again at every new subscription: HQ must not retain commands.
            message = "a retained command is never executed (it would replay at every reconnect)"
            return self._refuse(Refusal(parsed.request_id, parsed.command, "bad_request", message))
        try:
            status, result = await self._execute(parsed)
        except CommandError as err:
            return self._refuse(Refusal(parsed.request_id, parsed.command, err.code, str(err)))
        except Exception as err:  # a bug or a failing disk: answered and logged, never fatal to the downlink
            _LOGGER.exception("downlink: %s %s failed", parsed.command, parsed.request_id)
            return self._refuse(Refusal(parsed.request_id, parsed.command, "failed", _reason(err)))
        self._metrics.commands.labels(parsed.command, status).inc()
        _LOGGER.info("downlink: %s %s: %s", parsed.command, parsed.request_id, status)
        return build_response(
            request_id=parsed.request_id,
            command=parsed.command,
            status=status,
            store_id=self._store_id,
            gateway_id=self._gateway_id,
            result=result,
        )

    def _refuse(self, refusal: Refusal) -> bytes:
        self._metrics.commands.labels(metric_command(refusal.command), refusal.code).inc()
        _LOGGER.log(
            logging.WARNING if refusal.code == "failed" else logging.INFO,
            "downlink: %s %s refused: %s: %s",
            refusal.command or "command",
            refusal.request_id or "(no request id)",
            refusal.code,
            refusal.message,
        )
        return refusal_response(refusal, self._store_id, self._gateway_id)

    async def _execute(self, request: Request) -> tuple[Status, Any]:
        args = request.args
        if isinstance(args, NoArgs):
            return "ok", self._ping() if request.command == "ping" else self._config_view()
        if isinstance(args, StockAdjust):
            return await self._adjust(request.request_id, args)
        if isinstance(args, DeviceWrite):
            return await self._write(args)
        if isinstance(args, Resend):
            return "ok", await self._resend_all(args)
        return await self._store(request.request_id, args)

    async def _resend_all(self, args: Resend) -> dict[str, list[list[int]]]:
        """Every range of one command in one go, answered once: ``resent`` and ``missing`` list the ranges of
        all of them (merged), so HQ learns the whole outcome from one response. The uplink queues each range;
        the command's bounds (ranges, seqs) bound what is queued."""
        resent: list[list[int]] = []
        missing: list[list[int]] = []
        busy: list[list[int]] = []
        for first, last in args.merged:
            try:
                answer = await self._resend(first, last)
            except ValueError as err:
                raise CommandError("invalid_args", str(err)[:300]) from err
            resent += answer.get("resent", [])
            missing += answer.get("missing", [])
            busy += answer.get("busy", [])
        result = {"resent": _joined(resent), "missing": _joined(missing)}
        if busy:
            result["busy"] = _joined(busy)  # already queued in full: not queued again, HQ may ask later
        return result

    def _ping(self) -> dict[str, Any]:
        status = self._status()
        return {
            "pong": True,
            "version": __version__,
            "boot_id": BOOT_ID,
            "last_seq": status.get("last_seq"),
            "backlog": status.get("backlog"),
        }

    def _config_view(self) -> dict[str, Any]:
        # JSON mode renders every SecretStr (broker passwords, the API token) as '**********'.
        return {"config": self._config.model_dump(mode="json"), "config_hash": self._config_hash}

    async def _write(self, args: DeviceWrite) -> tuple[Status, dict[str, Any]]:
        """Write a device point through its driver; a refused write (unknown point, out of range) is
        invalid_args, a device that cannot be reached is failed."""
        writer = self._writers.get(args.device_id)
        if writer is None:
            raise CommandError("invalid_args", f"no writable device {args.device_id!r} on this gateway")
        try:
            async with asyncio.timeout(DEVICE_WRITE_TIMEOUT_S):
                await writer(args.device_id, args.point, args.value)
        except TimeoutError as err:
            raise CommandError(
                "failed", f"the write did not finish within {DEVICE_WRITE_TIMEOUT_S:g} s"
            ) from err
        except ValueError as err:  # the driver's refusal of an invalid write
            raise CommandError("invalid_args", str(err)[:300]) from err
        except DriverError as err:
            raise CommandError("failed", str(err)[:300]) from err
        return "ok", {"device_id": args.device_id, "point": args.point, "value": args.value}

    async def _adjust(self, request_id: str, args: StockAdjust) -> tuple[Status, dict[str, Any]]:
        """Commit a ``stock.adjusted`` event (the ledger moves stock in the same transaction); wait for COMMIT."""
        event = StockAdjusted(
            sku=args.sku,
            delta=args.delta,
            set=args.set,
            reason=args.reason,
            note=args.note,
            request_id=request_id,
        )
        key = command_key(request_id)
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seqs: list[int | None] = []

        def committed() -> None:  # on the loop, after the commit that settled the draft (or quarantined it)
            if not settled.done():
                settled.set_result(None)

        draft = Draft(
            "stock.adjusted",
            None,
            event.model_dump_json().encode(),
            model=event,
            dedup_key=key,
            ack=committed,
            driver="downlink",
            done=seqs.append,  # on the journal's writer thread, right after COMMIT
        )
        while not self._journal.submit(draft):  # over the journal's queue limit: wait until it drains
            room = asyncio.Event()
            self._journal.when_below(QUEUE_LIMIT, room.set)
            await room.wait()
        await settled
        if not seqs:
            raise CommandError(
                "failed", "the adjustment could not be applied; it is quarantined on the gateway"
            )
        seq = seqs[0]
        if seq is None:
            found = await self._journal.query("SELECT seq FROM events WHERE dedup_key=?", (key,))
            seq = found[0][0] if found else None
        rows = await self._journal.query("SELECT on_hand FROM stock WHERE sku=?", (args.sku,))
        on_hand = quantity_text(rows[0][0]) if rows else None
        return ("ok" if seqs[0] is not None else "duplicate"), {"seq": seq, "on_hand": on_hand}

    async def _store(
        self, request_id: str, document: Roster | Planogram | RuleSet
    ) -> tuple[Status, dict[str, int]]:
        """Replace a document; for rules, set the ledger's thresholds in the same transaction."""
        name: DocumentName
        if isinstance(document, RuleSet):
            name = "rules"
            rules = document

            def thresholds(conn: sqlite3.Connection) -> None:
                apply_rule_thresholds(conn, rules)

            work = store_work(name, document, request_id, command_key(request_id), thresholds)
        else:
            name = "roster" if isinstance(document, Roster) else "planogram"
            work = store_work(name, document, request_id, command_key(request_id))
        try:
            stored = await self._journal.transact(work)
        except (sqlite3.Error, OSError) as err:
            # transact rolled everything back: the document, its event and (for rules) the thresholds.
            raise CommandError("failed", f"not applied, nothing changed: {_reason(err)}") from err
        return ("duplicate" if stored.duplicate else "ok"), {"version": stored.version, "count": stored.count}


def _joined(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted ranges with adjacent ones joined ([[2, 3], [4, 6]] -> [[2, 6]]), as one range's answer reads."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(b, out[-1][1])
        else:
            out.append([a, b])
    return out


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:400]
