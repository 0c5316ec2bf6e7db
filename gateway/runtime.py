"""The gateway runtime: wires journal, drivers, uplink and local API under one root TaskGroup.

Shutdown order (SIGTERM/SIGINT): stop taking device messages, commit and acknowledge what is in hand, give
the uplink a moment to deliver, leave a retained 'offline' status at HQ, close. Exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cloud_bridge.commands import Handler
from cloud_bridge.downlink import Downlink
from cloud_bridge.uplink import Uplink
from drivers.base import Driver, DriverContext
from drivers.commands import DeviceWriter, device_handlers
from drivers.devices import DeviceRegistry
from gateway import __version__
from gateway.config import GatewayConfig
from gateway.config_loader import check_config
from gateway.kernel.clock import ClockState
from gateway.kernel.clock_watch import ClockWatcher
from gateway.kernel.config import API_TOKEN_USER, ApiUser
from gateway.kernel.consumer import Consumer, ConsumerState
from gateway.kernel.journal import STALL_S, Draft, Journal, JournalCorruptError, JournalError
from gateway.kernel.journal.datadir import DataDirBusyError, DataDirLock
from gateway.kernel.journal.reader import oldest_pending
from gateway.kernel.logs import register_secret
from gateway.kernel.metrics import Metrics, Scraped
from gateway.kernel.outbox import CLASSES
from gateway.kernel.sd_notify import Notifier
from gateway.ledger.commands import ledger_handlers
from gateway.ledger.documents import engine_rules, planogram, roster
from gateway.ledger.stock import StockLedger, utc_day
from rules.clock import RuleClock
from rules.commands import rule_handlers
from rules.engine import RuleEngine
from rules.haccp import HaccpLog
from rules.report import DailyReport

_LOGGER = logging.getLogger(__name__)

EXIT_JOURNAL_CORRUPT: Final = 3
"""Exit code after the journal was found damaged while running: the supervisor restarts the gateway, and the
start-up path moves the file aside, salvages it and goes on (docs/OUTBOX.md, "Corrupt journal")."""
SHUTDOWN_DRAIN_S: Final = 3.0
"""How long a clean shutdown waits for HQ to acknowledge what is committed."""
SHUTDOWN_FLUSH_S: Final = 10.0
"""How long a clean shutdown waits for the journal to commit what is in hand."""
READY_WAIT_S: Final = 20.0
"""At start, systemd hears READY=1 once the store broker's intake is connected, or after this long without it."""
WEDGED_S: Final = STALL_S
"""A journal writer stuck (or failing to commit) this long stops the systemd watchdog's pings."""


def journal_path(data_dir: Path) -> Path:
    return data_dir / "journal.db"


class Gateway:
    """One running gateway. ``run(stop)`` returns after ``stop`` is set and the shutdown is complete."""

    def __init__(
        self,
        config: GatewayConfig,
        config_hash: str | None = None,
        *,
        new_journal: bool = False,
        clock: ClockState | None = None,
        config_path: Path | None = None,
    ) -> None:
        """``clock``: whether the wall clock is synchronised (default: ask the kernel); a simulated store
        (the demo, the scenario tests) trusts its machine's clock."""
        self.config = config
        self.config_path = config_path
        """The file the config came from (the local page's admin checks it again); None: made in code."""
        self.lock = DataDirLock(config.data_dir)
        self.config_hash = config_hash
        self.metrics = Metrics()
        self.clock = clock or ClockState()
        # Sales count for velocity by UTC day only while the clock is synchronised (the day is known then)
        ledger = StockLedger(
            config.stock, self.metrics, today=lambda: utc_day() if self.clock.synced() else None
        )
        self.rules = RuleEngine(
            [config.stock.low_alert, *config.rules],
            RuleClock(self.clock.synced),
            hq_rules=engine_rules,
            planogram=planogram,
            hours=config.store.store_hours(),
            roster=roster,
            location=config.store.location,
            velocity=ledger.velocity,
        )
        self.journal = Journal(
            journal_path(config.data_dir),
            config.store.id,
            config.gateway_id,
            config.journal,
            self.metrics,
            processors=[
                ledger,
                self.rules,
                HaccpLog(config.haccp, lambda: self.rules.rules),
                DailyReport(
                    config.report,
                    config.store.timezone,
                    synced=self.clock.synced,
                    rules=lambda: list(self.rules.rules.values()),
                ),
            ],
            clock=self.clock,
            outbox=config.outbox,
        )
        self.journal.new_journal = new_journal
        self.devices = DeviceRegistry(self.journal.submit)
        self.drivers_ctx = DriverContext(self.journal, self.metrics, self.devices, config, clock=self.clock)
        if config.api.enabled:
            from rules.alerts import alerts_router  # FastAPI is imported only when the API is on
            from rules.attendance_api import attendance_router
            from rules.haccp_api import haccp_router
            from rules.report_api import report_router

            self.drivers_ctx.api_routers.append(alerts_router(self.journal, self.rules))
            self.drivers_ctx.api_routers.append(attendance_router(self.journal, self.rules))
            self.drivers_ctx.api_routers.append(report_router(self.journal.path))
            self.drivers_ctx.api_routers.append(
                haccp_router(
                    self.journal.path,
                    store_id=config.store.id,
                    store_name=config.store.name,
                    timezone=config.store.timezone,
                    config=config.haccp,
                    rules=lambda: list(self.rules.rules.values()),
                )
            )
        self.intakes: list[Driver] = [d.create(self.drivers_ctx) for d in config.drivers]
        self.uplink = Uplink(config, self.journal, self.metrics, config_hash)
        self.downlink = Downlink(
            config,
            self.journal,
            self.metrics,
            config_hash,
            self.uplink.resend,
            self.health,
            command_handlers(self.journal, self.drivers_ctx.device_writers),
            clock=self.clock,
        )
        self.started = asyncio.Event()
        self._api_bound: list[int] = []
        self._api_started = asyncio.Event()
        self._started_at = time.monotonic()
        self.consumers: dict[str, tuple[Consumer, ConsumerState]] = {}
        """The chat channels' and the rules' actions' consumers, by name, with their progress (for /health)."""
        self.notifier = Notifier.from_env()
        """systemd's notify socket (``Type=notify``, ``WatchdogSec=``), when systemd started the gateway."""
        self.metrics.downlink_connected.set_function(lambda: 1.0 if self.downlink.connected else 0.0)
        self.metrics.registry.register(Scraped(self._scraped))
        for broker in (config.store_broker, config.hq):
            if broker.password is not None:
                register_secret(broker.password.get_secret_value())
        if config.api.token is not None:
            register_secret(config.api.token.get_secret_value())
        for channel in config.notifications.channels:  # a robot's URL holds its token
            register_secret(channel.url.get_secret_value())
            if channel.secret is not None:
                register_secret(channel.secret.get_secret_value())

    @property
    def warnings(self) -> list[str]:
        """Settings that weaken security, said at start and in /health for as long as they are in force."""
        found = []
        hq = self.config.hq
        if hq.tls is None:
            found.append("hq_plain_tcp: events and commands travel to HQ unencrypted (set hq.tls)")
        elif hq.tls.insecure_skip_verify:
            found.append("hq_tls_unverified: HQ's certificate is not checked (hq.tls.insecure_skip_verify)")
        if not self.downlink.command_keys:
            found.append("no_hq_command_keys: every HQ command is refused (set hq.command_keys)")
        return found

    def health(self) -> dict[str, Any]:
        states = self.drivers_ctx.states
        drivers = {i.name: states[i.name].connected if i.name in states else False for i in self.intakes}
        errors = {name: s.error for name, s in states.items() if s.error}
        # The store broker carries every till: without it the gateway is not doing its job (503, and Docker's
        # health check says so). A missing BLE adapter, an unplugged bus or a silent controller is a device
        # problem, not the gateway's: restarting it would not help. Those are reported, with status "ok".
        ok = all(drivers[c.name] for c in self.config.drivers if c.type == "mqtt")
        # A journal that cannot commit acknowledges nothing: every till waits. A blip (a busy SD card) is not
        # worth a 503; STALL_S of failures is.
        stall = self.journal.stall
        now = time.monotonic()
        # The chat channels and the rules' actions: one held up (a robot down, the store broker away) is reported,
        # with status "ok": restarting the gateway would not bring the robot back.
        consumers = {
            name: state.report(now, getattr(consumer, "problem", None))
            for name, (consumer, state) in self.consumers.items()
        }
        reason = None
        if stall is not None and (stall[1] >= STALL_S or stall[0] == "journal_corrupt"):
            reason = stall[0]
        return {
            "status": "ok" if ok and reason is None else "degraded",
            "reason": reason,
            "journal_failing_s": None if stall is None else round(stall[1], 1),
            "version": __version__,
            "store_id": self.config.store.id,
            "gateway_id": self.config.gateway_id,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "last_seq": self.journal.last_seq,
            "delivered_seq": self.journal.delivered_seq,
            "backlog": self.journal.backlog,
            "outbox": {
                CLASSES[c]: {
                    "pending": s.pending_events,
                    "stored": s.stored_events,
                    "bytes": s.stored_bytes,
                    "evicted": s.evicted_events,
                }
                for c, s in self.journal.state.items()
            },
            "disk_low": self.journal.disk_low,
            "warnings": self.warnings,
            "hq_connected": self.uplink.connected,
            "hq_commands_connected": self.downlink.connected,
            "hq_command_keys": self.downlink.command_keys,
            "drivers": drivers,
            "device_drivers_ok": all(drivers[c.name] for c in self.config.drivers if c.type != "mqtt"),
            "driver_errors": errors,
            "devices": {
                status: sum(1 for d in self.devices if d.health.status == status)
                for status in ("unknown", "online", "offline", "error", "rate_limited")
            },
            "consumers_ok": not any(report["behind"] for report in consumers.values()),
            "consumers": consumers,
        }

    def _status_draft(self, status: str) -> Draft:
        data = {"status": status, "version": __version__, "config_hash": self.config_hash}
        return Draft("gateway.status", None, orjson.dumps(data))

    async def run(self, stop: asyncio.Event) -> None:
        try:
            self.lock.acquire()
        except DataDirBusyError as err:
            raise JournalError(str(err)) from err
        except OSError as err:
            raise JournalError(f"cannot lock the data directory {self.config.data_dir}: {err}") from err
        try:
            await self._run_locked(stop)
        except BaseExceptionGroup as group:
            corrupt, rest = group.split(JournalCorruptError)
            if corrupt is None or rest is not None:
                raise
            # Replacing the database under the uplink, the drivers and the stock ledger in this process would
            # touch every component's state; a restart runs the one tested replacement path instead. Nothing
            # uncommitted was acknowledged, so the devices' broker redelivers it to the next process.
            _LOGGER.critical(
                "journal damaged while running: exiting with code %d to be restarted", EXIT_JOURNAL_CORRUPT
            )
            self.lock.note_damaged(self.journal.corrupt or "damaged", self.journal.damage_id or "")
            raise SystemExit(EXIT_JOURNAL_CORRUPT) from group
        finally:
            self.lock.release()

    async def _run_locked(self, stop: asyncio.Event) -> None:
        for warning in self.warnings:
            _LOGGER.warning("insecure setting: %s", warning)
        self.journal.used_before = self.lock.used
        self.journal.damage_hint = self.lock.damaged
        self.journal.on_damage_handled = self.lock.clear_damaged
        await self.journal.open()
        # Only once a journal is open: a first start cut short before leaves the directory fresh.
        self.lock.mark_used()
        _LOGGER.info(
            "journal %s: last seq %d, delivered to HQ up to %d",
            self.journal.path,
            self.journal.last_seq,
            self.journal.delivered_seq,
        )
        if self.journal.replaced is not None:
            self.journal.submit(self.journal.replaced_draft())
        self.journal.submit(self._status_draft("online"))
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self.journal.run(), name="journal-writer")
                uplink = tg.create_task(self.uplink.run(), name="uplink")
                downlink = tg.create_task(self.downlink.run(), name="downlink")
                integrity = tg.create_task(self.journal.watch_integrity(), name="journal-integrity")
                clock = tg.create_task(
                    ClockWatcher(self.clock, self.journal.submit).run(), name="clock-watch"
                )
                drivers = [tg.create_task(i.run(), name=f"driver-{i.name}") for i in self.intakes]
                watchdog = tg.create_task(self.devices.run(), name="device-watchdog")
                api = tg.create_task(self._serve_api(), name="local-api") if self.config.api.enabled else None
                notify = (
                    tg.create_task(self._notify(), name="notifications")
                    if self.config.notifications.channels
                    else None
                )
                actions = tg.create_task(self._actions(), name="actions")
                systemd = tg.create_task(self._systemd(), name="systemd-notify")
                self.started.set()
                await stop.wait()
                _LOGGER.info("stopping: taking no more device messages")
                systemd.cancel()
                self.notifier.stopping("stopping: flushing to HQ")
                for intake in self.intakes:
                    intake.pause()
                downlink.cancel()  # a command in progress still commits below; it is answered again next start
                await self._flush_for_shutdown()
                for task in drivers:
                    task.cancel()
                watchdog.cancel()
                self.journal.submit(self._status_draft("offline"))
                await self._flush_for_shutdown()
                delivered = await self.uplink.drain(SHUTDOWN_DRAIN_S)
                _LOGGER.info(
                    "stopping: HQ has everything up to seq %d%s",
                    self.journal.delivered_seq,
                    ""
                    if delivered
                    else f" (seq {self.journal.last_seq} is the last committed; it goes next start)",
                )
                self.uplink.stopping = True
                uplink.cancel()
                clock.cancel()
                integrity.cancel()
                if api is not None:
                    api.cancel()
                if notify is not None:  # what is not sent yet goes next start (each channel's cursor)
                    notify.cancel()
                actions.cancel()  # what has not run yet runs next start (each action type's cursor)
                writer.cancel()
        finally:
            await self.journal.close()
        _LOGGER.info("stopped cleanly")

    def _scraped(self) -> list[Metric]:
        """The metrics worked out at each scrape: the rules' evaluations and errors, the outbox's oldest waiting
        event by class (an age by the wall clock, which the event's ``recorded_at`` is too)."""
        evaluations = CounterMetricFamily(
            "storegw_rule_evaluations", "Rules the committed events met (an event and a rule: one)."
        )
        evaluations.add_metric([], self.rules.evaluations)
        errors = CounterMetricFamily(
            "storegw_rule_errors", "Events (or timers) a rule failed on, by rule id.", labels=["rule_id"]
        )
        for rule_id, count in list(self.rules.errors.items()):  # the writer's thread may add one meanwhile
            errors.add_metric([rule_id], count)
        age = GaugeMetricFamily(
            "storegw_outbox_oldest_age_seconds",
            "Age of the oldest event not yet delivered to HQ, by class (absent: nothing waits).",
            labels=["class"],
        )
        try:
            waiting = oldest_pending(self.journal.path.absolute().as_uri() + "?mode=ro")
        except sqlite3.Error:  # not there yet, or busy past the timeout: this scrape shows no ages
            waiting = {}
        now = time.time()
        for cls, recorded_at in waiting.items():
            at = datetime.fromisoformat(recorded_at.replace("Z", "+00:00")).timestamp()
            age.add_metric([CLASSES[cls]], max(0.0, now - at))
        return [evaluations, errors, age]

    async def _systemd(self) -> None:
        """systemd's ``Type=notify``: READY=1 once the journal has committed (the writer works), the API listens
        and the store broker's intake is connected (or READY_WAIT_S has passed: the other devices' intakes work
        without it; STATUS says so until it connects). A full disk at start is ready too: a restart would not free
        space, and /health tells. Then, with ``WatchdogSec=``, WATCHDOG=1 every quarter of it for as long as the
        event loop runs this and the journal's writer is healthy (:meth:`wedged`)."""
        notifier = self.notifier
        if not notifier.enabled:
            return
        flushed = asyncio.ensure_future(self.journal.flush())
        try:
            while not flushed.done():
                await asyncio.wait({flushed}, timeout=1.0)
                failing = self.journal.failing_now()
                if failing is not None and failing[0] == "disk_full":
                    break
        finally:
            flushed.cancel()
        if self.config.api.enabled:
            await self._api_started.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WAIT_S):
                while self._systemd_status() != "running":
                    self.drivers_ctx.state_changed.clear()
                    await self.drivers_ctx.state_changed.wait()
        status = self._systemd_status()
        notifier.ready(status)
        _LOGGER.info("told systemd: ready (%s)", status)
        interval = max(0.05, notifier.watchdog_s / 4) if notifier.watchdog_s is not None else 1.0
        sick: str | None = None
        while True:
            await asyncio.sleep(interval)
            problem = self.wedged()
            if problem is None:
                if sick is not None:
                    _LOGGER.warning("the journal's writer is healthy again: pinging systemd's watchdog again")
                    sick = None
                now = self._systemd_status()
                if now != status:
                    status = now
                    notifier.status(status)
                if notifier.watchdog_s is not None:
                    notifier.ping()
            elif problem[0] != sick:
                sick = problem[0]
                status = f"not pinging the watchdog: {problem[1]}"
                _LOGGER.error(
                    "%s: no more pings to systemd's watchdog, which restarts the gateway", problem[1]
                )
                notifier.status(status)

    def _systemd_status(self) -> str:
        """The one line ``systemctl status`` shows while the gateway is well."""
        failing = self.journal.failing_now()
        if failing is not None and failing[0] == "disk_full":
            return "running; the disk is full (see /health)"
        states = self.drivers_ctx.states
        waiting = [
            c.name
            for c in self.config.drivers
            if c.type == "mqtt" and not (c.name in states and states[c.name].connected)
        ]
        return "running" if not waiting else f"running; store broker not connected ({', '.join(waiting)})"

    def wedged(self) -> tuple[str, str] | None:
        """Why the journal's writer is not healthy (a kind, and words for the log), or None: it has been in one step
        (a commit, a housekeeping step) for WEDGED_S, or commits have been failing, or items waiting with no commit
        taking them, for WEDGED_S right now. A full disk is not: a restart would not free space, and the journal
        already frees what it may. The event loop's own health is that the caller runs at all."""
        idle = time.monotonic() - self.journal.beat
        if idle >= WEDGED_S:
            return "writer", f"the journal's writer has been in one step for {idle:.0f} s"
        failing = self.journal.failing_now()
        if failing is not None and failing[0] != "disk_full" and failing[1] >= WEDGED_S:
            return failing[0], f"the journal has not committed for {failing[1]:.0f} s ({failing[0]})"
        return None

    async def _flush_for_shutdown(self) -> None:
        """Commit and acknowledge what is in hand, but never hang a shutdown on a failing disk."""
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                await self.journal.flush()
        except TimeoutError:
            _LOGGER.error(
                "stopping: %d items could not be committed within %.0f s; the devices will resend them",
                self.journal.pending,
                SHUTDOWN_FLUSH_S,
            )

    @property
    def api_port(self) -> int | None:
        """The local API's bound port, once it is listening (the config may say 0: any free port)."""
        return self._api_bound[0] if self._api_bound else None

    async def wait_api(self, within_s: float = 10.0) -> int:
        async with asyncio.timeout(within_s):
            await self._api_started.wait()
        assert self._api_bound
        return self._api_bound[0]

    def _watch(self, consumer: Consumer) -> ConsumerState:
        """A consumer's progress, as /health reports it."""
        state = ConsumerState()
        self.consumers[consumer.name] = (consumer, state)
        return state

    async def _notify(self) -> None:
        """One consumer per channel (rules/notify.py): each sends its alerts in order, each once."""
        import httpx

        from gateway.kernel.consumer import run_consumer
        from rules.notify import ChannelConsumer

        notifications = self.config.notifications
        # A channel removed from the config forgets where it was: configured again later, it starts with the
        # alerts from then on, not with everything since it was removed.
        await self.journal.forget_cursors("notify-", {f"notify-{c.id}" for c in notifications.channels})
        async with httpx.AsyncClient() as client, asyncio.TaskGroup() as tg:
            for channel in notifications.channels:
                consumer = ChannelConsumer(
                    channel,
                    self.rules,
                    self.journal,
                    client,
                    language=notifications.language,
                    store=self.config.store.name,
                    synced=self.clock.synced,
                )
                state = self._watch(consumer)
                tg.create_task(run_consumer(self.journal, consumer, state), name=f"notify-{channel.id}")

    async def _actions(self) -> None:
        """One consumer per action type (rules/actions.py): the MQTT messages to the store broker, the Modbus
        writes through the drivers' writers; each after its alert committed, at most once per episode."""
        from gateway.kernel.consumer import run_consumer
        from rules.actions import ActionConsumer, BrokerPublisher

        config = self.config
        publisher = BrokerPublisher(config.store_broker, config.client_id("actions", config.store_broker))
        store = config.store.id
        try:
            async with asyncio.TaskGroup() as tg:
                mqtt = ActionConsumer(
                    "mqtt_publish", self.rules, self.journal, publisher=publisher, store_id=store
                )
                modbus = ActionConsumer(
                    "modbus_write",
                    self.rules,
                    self.journal,
                    writers=self.drivers_ctx.device_writers,
                    store_id=store,
                )
                for consumer in (mqtt, modbus):
                    state = self._watch(consumer)
                    tg.create_task(run_consumer(self.journal, consumer, state), name=consumer.name)
        finally:
            await publisher.close()

    async def _serve_api(self) -> None:
        from gateway.api import create_app, serve_api  # FastAPI is imported only when the API is on
        from gateway.api.session import Sessions, load_key, token_sha256
        from gateway.api.ui import UiSources, ui_router

        token = self.config.api.token
        assert token is not None  # the config model requires it when the API is enabled
        # The page's logins: the configured users, and the API token as an admin.
        users = [
            *self.config.api.users,
            ApiUser(name=API_TOKEN_USER, role="admin", token_sha256=token_sha256(token.get_secret_value())),
        ]
        sessions = Sessions(load_key(self.config.data_dir), lambda: users)
        path = self.config_path
        page = UiSources(
            journal=self.journal,
            engine=self.rules,
            health=self.health,
            devices=self.devices.snapshot,
            clock_synced=self.clock.synced,
            check_config=None if path is None else functools.partial(check_config, path),
            store_name=self.config.store.name or "",
        )
        app = create_app(
            self.journal.path,
            token.get_secret_value(),
            self.metrics,
            self.health,
            devices=self.devices.snapshot,
            routers=[*self.drivers_ctx.api_routers, ui_router(page, sessions)],
            session=sessions.check,
            kind_class=self.journal.kind_class,
        )
        await serve_api(app, self.config.api.host, self.config.api.port, self._api_started, self._api_bound)


def command_handlers(journal: Journal, writers: Mapping[str, DeviceWriter]) -> dict[str, Handler]:
    """The HQ commands the domains carry out, for the downlink to dispatch: the ledger's (stock, documents), the
    devices' (writes through their drivers) and the rules' (acknowledging an alert)."""
    return {**ledger_handlers(journal), **device_handlers(writers, journal), **rule_handlers(journal)}
