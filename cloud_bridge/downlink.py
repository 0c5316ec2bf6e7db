"""The HQ downlink: commands from HQ, answered on the responses topic (docs/OUTBOX.md, "Downlink commands").

Its own MQTT connection to HQ's broker with a persistent session (``clean_start`` false, client id
``<store>-<gw>-downlink``), so commands HQ sends while the gateway is offline wait at the broker and arrive
when it returns. Commands are handled one at a time, in the order they arrive. A command is acknowledged
(PUBACK) only after its response is published and acknowledged in turn, and after what it changed is committed:
a crash in between makes the broker deliver it again, and the idempotent commands answer ``duplicate``.

Every command must be signed by one of HQ's keys pinned in ``hq.command_keys`` and be inside its validity
(:mod:`cloud_bridge.signing`). The request ids of the commands carried out are kept in their own small SQLite
file (``hq-commands.db`` in the data directory, :class:`CommandLedger`) until their ``not_after`` has passed,
so a replay is answered ``duplicate`` whatever the journal's retention has done with the events they made.

Parsing and validation are pure (:mod:`cloud_bridge.commands`). The downlink carries out ``ping``,
``config.get`` and ``resend`` itself and dispatches the others to the handlers the domains register
(:class:`cloud_bridge.commands.Handler`): the stock ledger and the documents (:mod:`gateway.ledger.commands`),
the devices (:mod:`drivers.commands`). Logs name the request id, command and outcome, never arguments or
document bodies (a roster holds staff names).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from cloud_bridge.commands import (
    CommandError,
    Handler,
    Outcome,
    Refusal,
    Request,
    Resend,
    Status,
    Trust,
    build_response,
    metric_command,
    parse_command,
    refusal_response,
)
from cloud_bridge.signing import CLOCK_SKEW_S, MAX_VALIDITY_S, load_public_key
from cloud_bridge.topics import commands_topic, responses_topic
from gateway import __version__
from gateway.config import GatewayConfig
from gateway.kernel.clock import BOOT_ID, ClockState
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from gateway.kernel.supervise import Backoff, reconnect_forever, tcp_reachable

_LOGGER = logging.getLogger(__name__)

INBOX_HIGH: Final = 32
"""Commands received and waiting: above this we stop reading the socket (TCP holds the rest at the broker)."""

Resender = Callable[[int, int], Awaitable[dict[str, list[list[int]]]]]


LEDGER_FILE: Final = "hq-commands.db"
MAX_STORED_RESULT_BYTES: Final = 4096
"""A result up to this size is kept with its request id and given again with a ``duplicate`` answer."""


class WallClock(Protocol):
    """Whether the wall clock is synchronised (:class:`gateway.kernel.clock.ClockState`)."""

    def synced(self) -> bool: ...


class CommandLedger:
    """The request ids of the commands this gateway carried out, each kept until its ``not_after`` is a day
    past (a replay inside its validity is answered ``duplicate``; after it, the command is expired anyway),
    and the *time floor*: the latest time the gateway can vouch for (its synchronised clock, or the newest
    ``issued_at`` HQ signed), which stands in for the wall clock while it is not synchronised.

    Its own SQLite file, apart from the journal: event TTLs, eviction and journal salvage never touch it.
    Only verified commands are written to it, so its size follows HQ's command rate, not an attacker's.
    Methods run on worker threads (``asyncio.to_thread``); a lock keeps :meth:`close` from closing the
    connection under a record still being written when the downlink is cancelled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.floor: int | None = None

    def open(self) -> None:
        with self._lock:
            if self._conn is None:
                self._open()

    def _open(self) -> None:
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as err:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            _LOGGER.error(
                "downlink: %s cannot be read (%s): moved to %s; replays of commands already carried out are"
                " recognised again only from now on",
                self.path,
                err,
                aside.name,
            )
            self.path.rename(aside)
            self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            # Created 0600 (request ids, stored results): SQLite would use the process's umask.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS commands (request_id TEXT PRIMARY KEY, command TEXT NOT NULL,"
                " not_after INTEGER NOT NULL, result BLOB)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS commands_not_after ON commands (not_after)")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE name='time_floor'").fetchone()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        self.floor = None if row is None else int(row[0])
        return conn

    def seen(self, request_id: str) -> tuple[str, Any] | None:
        """(command, the result first answered or None) of a request id already carried out."""
        with self._lock:
            return self._seen(request_id)

    def _seen(self, request_id: str) -> tuple[str, Any] | None:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the command ledger is closed")
        row = self._conn.execute(
            "SELECT command, result FROM commands WHERE request_id=?", (request_id,)
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), None if row[1] is None else orjson.loads(row[1])

    def raise_floor(self, at: float) -> None:
        """The floor only goes up (in memory; written with the next record)."""
        if self.floor is None or int(at) > self.floor:
            self.floor = int(at)

    def record(self, request_id: str, command: str, not_after: int, result: Any) -> None:
        """Keep a carried-out command (and the floor), and drop those a day past their not_after."""
        with self._lock:
            self._record(request_id, command, not_after, result)

    def _record(self, request_id: str, command: str, not_after: int, result: Any) -> None:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the command ledger is closed")
        stored = orjson.dumps(result)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT OR REPLACE INTO commands (request_id, command, not_after, result) VALUES (?, ?, ?, ?)",
                (request_id, command, not_after, stored if len(stored) <= MAX_STORED_RESULT_BYTES else None),
            )
            if self.floor is not None:
                self._conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('time_floor', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value=max(value, excluded.value)",
                    (self.floor,),
                )
                self._conn.execute(
                    "DELETE FROM commands WHERE not_after < ?", (self.floor - CLOCK_SKEW_S - MAX_VALIDITY_S,)
                )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


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
        handlers: Mapping[str, Handler] | None = None,
        *,
        clock: WallClock | None = None,
    ) -> None:
        self._config = config
        self._keys = {k.id: load_public_key(k.public_key) for k in config.hq.command_keys}
        self._scopes = {k.id: frozenset(k.commands) for k in config.hq.command_keys if k.commands is not None}
        self._clock: WallClock = clock or ClockState()
        self.ledger = CommandLedger(config.data_dir / LEDGER_FILE)
        self._handlers: dict[str, Handler] = {
            "ping": Handler(self._ping),
            "config.get": Handler(self._config_get),
            "resend": Handler(self._resend_all),
            **(handlers or {}),
        }
        """Command -> what carries it out: the downlink's own, and those the domains register (the composition
        root, :func:`gateway.runtime.command_handlers`)."""
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
        if not self._keys:
            _LOGGER.warning(
                "downlink: no HQ command keys are configured (hq.command_keys): every HQ command is refused"
                " (docs/OUTBOX.md, 'Signed commands')"
            )
        else:
            _LOGGER.info("downlink: HQ command keys %s", ", ".join(sorted(self._keys)))
        try:
            await reconnect_forever(
                "HQ broker (commands)",
                self._session,
                _LOGGER,
                (MqttError, OSError),
                Backoff(cap=self._hq.reconnect_max_s),
                probe=lambda: tcp_reachable(self._hq.host, self._hq.port),
            )
        finally:
            self.close()

    def close(self) -> None:
        """Close the command ledger (``run`` does it when it ends)."""
        self.ledger.close()

    @property
    def command_keys(self) -> list[str]:
        """The ids of HQ's pinned command keys; empty: every command is refused (for /health)."""
        return sorted(self._keys)

    async def _trust(self) -> Trust:
        """The keys, and the time commands are judged by: the wall clock when synchronised (which also raises
        the floor), else the ledger's floor (None before any: expiry cannot be judged yet)."""
        await asyncio.to_thread(self.ledger.open)
        synced = self._clock.synced()
        if synced:
            now = time.time()
            floor = self.ledger.floor
            self.ledger.raise_floor(now)
            # Never far below a time already trusted: a clock set back (a spoofed NTP answer) must not make old
            # captured commands current again. Within a command's validity of it, the ledger (kept a day past
            # every not_after) still answers a replay; the slack lets a floor an HQ clock a little ahead raised
            # stay harmless.
            return Trust(self._keys, max(now, (floor or 0) - MAX_VALIDITY_S), True, self._scopes)
        if self.ledger.floor is None:
            # No command carried out yet (a new or lost ledger): the newest event the journal stamped with a
            # synchronised clock is a time already trusted, so a captured command older than that is refused.
            newest = await self._journal_synced_time()
            if newest is not None:
                self.ledger.raise_floor(newest)
        return Trust(self._keys, self.ledger.floor, False, self._scopes)

    async def _journal_synced_time(self) -> float | None:
        recorded_at = await self._journal.last_synced_recorded_at()
        if recorded_at is None:
            return None
        try:
            return datetime.fromisoformat(recorded_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

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
            trust = await self._trust()
            parsed = parse_command(
                payload, topic, self._hq.topic_prefix, self._store_id, self._gateway_id, trust
            )
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
            seen = await asyncio.to_thread(self.ledger.seen, parsed.request_id)
        except sqlite3.Error as err:
            _LOGGER.exception("downlink: the command ledger cannot be read")
            return self._refuse(Refusal(parsed.request_id, parsed.command, "failed", _reason(err)))
        if seen is not None:
            # Carried out before (a replay, or HQ sending it again): never twice, whatever the command.
            return self._answer(parsed, "duplicate", seen[1])
        handler = self._handlers.get(parsed.command)
        if handler is None:
            message = f"this gateway does not carry out {parsed.command}"
            return self._refuse(Refusal(parsed.request_id, parsed.command, "unknown_command", message))
        if handler.record_first:
            # It commits nothing to the journal, so nothing else would stop its replay: on the record first
            # (at most once: a crash after it ran answers a replay "duplicate" with this result).
            try:
                await asyncio.to_thread(
                    self.ledger.record, parsed.request_id, parsed.command, parsed.not_after, {"started": True}
                )
            except sqlite3.Error as err:
                _LOGGER.exception("downlink: the command ledger cannot be written")
                return self._refuse(Refusal(parsed.request_id, parsed.command, "failed", _reason(err)))
        try:
            status, result = await handler.run(parsed)
        except CommandError as err:
            return self._refuse(Refusal(parsed.request_id, parsed.command, err.code, str(err)))
        except Exception as err:  # a bug or a failing disk: answered and logged, never fatal to the downlink
            _LOGGER.exception("downlink: %s %s failed", parsed.command, parsed.request_id)
            return self._refuse(Refusal(parsed.request_id, parsed.command, "failed", _reason(err)))
        self.ledger.raise_floor(parsed.issued_at)
        try:
            await asyncio.to_thread(
                self.ledger.record, parsed.request_id, parsed.command, parsed.not_after, result
            )
        except sqlite3.Error:
            # Carried out already: answered, but a replay is then caught only by the journal's dedup key.
            _LOGGER.exception("downlink: %s %s could not be recorded", parsed.command, parsed.request_id)
        return self._answer(parsed, status, result)

    def _answer(self, parsed: Request, status: Status, result: Any) -> bytes:
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

    async def _resend_all(self, request: Request) -> Outcome:
        """Every range of one command in one go, answered once: ``resent`` and ``missing`` list the ranges of
        all of them (merged), so HQ learns the whole outcome from one response. The uplink queues each range;
        the command's bounds (ranges, seqs) bound what is queued."""
        resent: list[list[int]] = []
        missing: list[list[int]] = []
        busy: list[list[int]] = []
        assert isinstance(request.args, Resend)
        for first, last in request.args.merged:
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
        return "ok", result

    async def _ping(self, _request: Request) -> Outcome:
        status = self._status()
        return "ok", {
            "pong": True,
            "version": __version__,
            "boot_id": BOOT_ID,
            "last_seq": status.get("last_seq"),
            "backlog": status.get("backlog"),
        }

    async def _config_get(self, _request: Request) -> Outcome:
        # JSON mode renders every SecretStr (broker passwords, the API token) as '**********'.
        return "ok", {"config": self._config.model_dump(mode="json"), "config_hash": self._config_hash}


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
