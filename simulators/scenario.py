"""Run a scenario (``firmware_configs/scenarios/*.yaml``) against a gateway: every device speaks its real protocol.

:class:`ScenarioRun` builds the simulated store before the gateway starts: fridge controllers as pymodbus
servers (Modbus TCP on a loopback port, or RTU over a pseudo-terminal line), RFID readers on pseudo-terminals
behind a stable link (as ``/dev/serial/by-id`` would be), and the gateway config that reads them all
(:meth:`ScenarioRun.gateway_config`). Then :meth:`ScenarioRun.run` drives the devices and plays the timeline:
tills, check-in kiosks and RFID shelves publish to the store broker (MQTT); BLE sensors' advertisement bytes go
through the BLE driver's detection callback, the path bleak would use (there is no radio here).

Step times are store time (simulated seconds); real time is ``at_s / time_scale``. Device rates are real time.
The scenario's rules get their durations in store time too: the gateway's config has them divided by
``time_scale`` (:meth:`Scenario.gateway_rules`), since the gateway's timers run on its real clock. HQ's
documents (planogram, roster) are sent at scenario time 0, through the simulated HQ, before the timeline plays.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from drivers.ble.driver import BleDriver
from drivers.ble.formats import BleFormat
from drivers.epc import encode_sgtin96
from drivers.modbus.profile import ModbusProfile
from drivers.profiles import get_profile
from gateway.kernel.config import BrokerConfig, Location
from gateway.kernel.mqtt_client import MqttClient
from simulators.ble import SimulatedSensor
from simulators.catalog import CATALOG, CATALOG_BY_SKU
from simulators.fridge import FridgeModel, FridgeServer, PtyLine
from simulators.hq import SimulatedHq
from simulators.kiosk import DEFAULT_TOPIC_TEMPLATE as KIOSK_TOPIC
from simulators.kiosk import STORE_LAT as KIOSK_LAT
from simulators.kiosk import STORE_LON as KIOSK_LON
from simulators.kiosk import Kiosk
from simulators.pos import DEFAULT_TOPIC_TEMPLATE as TILL_TOPIC
from simulators.pos import PosMessage, PosTerminal, garbage_messages, run_terminals
from simulators.rfid_reader import PtyReader, TagField, catalog_epcs
from simulators.rfid_shelf import DEFAULT_TOPIC_TEMPLATE as SHELF_TOPIC
from simulators.rfid_shelf import Shelf
from simulators.scenario_model import BleSensor, Fridge, Scenario, Step

_LOGGER = logging.getLogger(__name__)

BLE_FORMATS: Final[dict[str, BleFormat]] = {
    "bthome-v2": "bthome.v2",
    "ruuvi-rawv2": "ruuvi.rawv2",
    "pvvx-lywsd03mmc": "pvvx",
    "atc1441-lywsd03mmc": "atc1441",
}
FREEZER_BELOW_C: Final = -5.0
"""A simulated cabinet with a setpoint below this behaves as a freezer."""
CASE_SERIAL_BASE: Final = 10_000_000
"""Serials of delivered cases' tags start here, far from the item tags' serials."""
CASE_UNITS: Final = 12
"""Units in one delivered case (one RFID tag on the case)."""
SHELF_SCAN_S: Final = 2.0
"""Real seconds between two scans of a simulated RFID shelf."""
GARBAGE_SKIPPED: Final = frozenset({"too_large"})
"""Garbage floods leave out the 10 MB message (one is enough to show the size limit, 2,000 would be 20 GB)."""


def free_port() -> int:
    """A free TCP port on loopback for a simulated Modbus controller."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bindkey(device_id: str) -> bytes:
    """The simulated sensor's AES key: derived from its id, so the gateway config and the sensor agree."""
    return random.Random(f"bindkey-{device_id}").randbytes(16)


@dataclass
class _FridgeRig:
    spec: Fridge
    server: FridgeServer
    port: int = 0
    line: PtyLine | None = None

    @property
    def model(self) -> FridgeModel:
        return self.server.models[self.spec.unit]


@dataclass
class StepLog:
    """What the runner did, for the demo's display and the tests."""

    at_s: float
    action: str
    device: str | None
    detail: str = ""


@dataclass
class ScenarioRun:
    """One scenario against one gateway; ``prepare()`` before building the gateway, ``close()`` after it."""

    scenario: Scenario
    store_broker: BrokerConfig
    work_dir: Path
    on_step: Callable[[StepLog], None] | None = None
    on_till: Callable[[PosMessage], None] | None = None
    """Called for each till message the store broker acknowledged (the demo's live view)."""
    hq: SimulatedHq | None = None
    """Books deliveries (``delivery`` steps) as HQ receiving; without it they only move tags."""
    started_at: float | None = None
    """The event loop's clock (the monotonic clock) when ``run()`` began playing: scenario time 0."""
    modbus_timeout_s: float = 0.5
    """The gateway's Modbus timeout for the simulated controllers. Short, so an unplugged one is seen fast; the
    demo, whose controllers share one event loop with the gateway starting up, gives them longer."""
    seed: int = 1
    store_location: Location | None = None
    """Where the store is (its config's ``store.location``): the kiosks check staff in around it."""
    log: list[StepLog] = field(default_factory=list)
    published: dict[str, int] = field(default_factory=dict)
    """Messages acknowledged by the store broker, by device kind (tills, kiosk, shelf, garbage, flood)."""
    _fridges: dict[str, _FridgeRig] = field(default_factory=dict)
    _readers: dict[str, PtyReader] = field(default_factory=dict)
    _tag_skus: dict[bytes, str] = field(default_factory=dict)
    _delivered: dict[str, list[bytes]] = field(default_factory=dict)
    """The cases of each reader's last delivery."""
    _cases: int = 0
    _shelves: dict[str, Shelf] = field(default_factory=dict)
    _kiosks: dict[str, Kiosk] = field(default_factory=dict)
    _terminals: dict[str, PosTerminal] = field(default_factory=dict)
    _clients: int = 0
    _sensors: dict[str, tuple[BleSensor, SimulatedSensor]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    # --- before the gateway ------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start the device peers the gateway connects to (Modbus servers, serial lines)."""
        devices = self.scenario.devices
        for spec in devices.fridges:
            model = FridgeModel(setpoint=spec.setpoint_c, air=spec.setpoint_c + 1.0)
            if spec.setpoint_c < FREEZER_BELOW_C:
                # A freezer: better insulated, a stronger compressor, a gentler defrost heater.
                model.leak_per_s, model.cooling_per_s, model.heating_per_s = 0.0002, 0.03, 0.002
            server = FridgeServer(
                [spec.unit], profile=spec.profile, speed=self.scenario.time_scale, models={spec.unit: model}
            )
            rig = _FridgeRig(spec, server)
            if spec.transport == "tcp":
                rig.port = free_port()
                await server.start_tcp("127.0.0.1", rig.port)
            else:
                rig.line = await server.start_rtu(baudrate=19200)
            self._fridges[spec.id] = rig
        for device_id in devices.tills.ids():
            self._terminals[device_id] = PosTerminal(
                device_id, seed=f"{self.seed}:{device_id}", return_ratio=devices.tills.return_ratio
            )
        for n, reader_spec in enumerate(devices.rfid_readers):
            items = [CATALOG_BY_SKU[sku] for sku in reader_spec.skus] or list(CATALOG)
            population = catalog_epcs(
                reader_spec.tags + reader_spec.tags // 2 + 10, seed=self.seed + n, items=items
            )
            self._tag_skus.update(
                (epc, items[i % len(items)].sku) for i, epc in enumerate(population)
            )  # catalog_epcs gives item i % len(items) the i-th EPC
            tag_field = TagField(
                population, present_ratio=reader_spec.tags / max(1, len(population)), seed=self.seed
            )
            reader = PtyReader(tag_field, link=self.work_dir / f"serial-by-id-{reader_spec.id}")
            reader.open()
            self._readers[reader_spec.id] = reader
        for n, shelf_spec in enumerate(devices.shelves):
            self._shelves[shelf_spec.id] = Shelf(
                shelf_spec.id, tags=shelf_spec.tags, leave=0.0, arrive=0.0, seed=self.seed + n
            )
        for n, ble_spec in enumerate(devices.ble):
            mac = bytes.fromhex(ble_spec.mac.replace(":", ""))
            key = bindkey(ble_spec.id) if ble_spec.encrypted else None
            rng = random.Random(self.seed + n)
            fmt = BLE_FORMATS[ble_spec.format]
            sensor = SimulatedSensor(mac, fmt, key, rng, ble_spec.temperature_c, ble_spec.temperature_c)
            self._sensors[ble_spec.id] = (ble_spec, sensor)

    def gateway_config(self) -> dict[str, Any]:
        """The ``drivers`` and ``devices`` sections that read this scenario's store, and its ``rules`` with their
        durations in real time (merge into a config)."""
        devices = self.scenario.devices
        tills = devices.tills
        mqtt_routes: list[dict[str, Any]] = []
        top_devices: list[dict[str, Any]] = []
        if tills.count:
            mqtt_routes += [
                {"pattern": TILL_TOPIC.replace("{action}", "sale"), "kind": "pos.sale"},
                {"pattern": TILL_TOPIC.replace("{action}", "return"), "kind": "pos.return"},
            ]
            limits = {
                key: value
                for key, value in (
                    ("rate_limit_per_s", tills.rate_limit_per_s),
                    ("rate_burst", tills.rate_burst),
                )
                if value is not None
            }
            top_devices += [{"id": d, "profile": "pos-terminal", **limits} for d in tills.ids()]
        if devices.kiosks:
            mqtt_routes.append({"pattern": KIOSK_TOPIC, "profile": "checkin-kiosk"})
            top_devices += [{"id": k.id, "profile": "checkin-kiosk"} for k in devices.kiosks]
        if devices.shelves:
            mqtt_routes.append({"pattern": SHELF_TOPIC, "profile": "rfid-shelf-mqtt"})
            top_devices += [{"id": s.id, "profile": "rfid-shelf-mqtt"} for s in devices.shelves]
        drivers: list[dict[str, Any]] = []
        if mqtt_routes:
            drivers.append({"type": "mqtt", "name": "store-mqtt", "routes": mqtt_routes})
        for rig in self._fridges.values():
            spec = rig.spec
            bus: dict[str, Any] = (
                {"transport": "tcp", "host": "127.0.0.1", "port": rig.port}
                if rig.line is None
                else {"transport": "rtu", "serial_port": rig.line.driver_path, "baudrate": 19200}
            )
            drivers.append(
                {
                    "type": "modbus",
                    "name": f"modbus-{spec.id}",
                    **bus,
                    "timeout_s": self.modbus_timeout_s,
                    "retries": 1,
                    "reconnect_max_s": 2,
                    "devices": [
                        {
                            "id": spec.id,
                            "unit": spec.unit,
                            "profile": spec.profile,
                            "poll_intervals": self._fast_polls(spec.profile),
                        }
                    ],
                }
            )
        if self._readers:
            drivers.append(
                {
                    "type": "serial",
                    "name": "serial",
                    "devices": [
                        {
                            "id": rid,
                            "port": str(reader.link),
                            "profile": "chafon-cf-ru5102",
                            "window_s": 2,
                            "depart_after_s": 6,
                        }
                        for rid, reader in self._readers.items()
                    ],
                }
            )
        if self._sensors:
            drivers.append(
                {
                    "type": "ble",
                    "name": "ble",
                    "devices": [
                        {
                            "id": spec.id,
                            "mac": spec.mac,
                            "profile": spec.format,
                            **({"bindkey": bindkey(spec.id).hex()} if spec.encrypted else {}),
                        }
                        for spec, _ in self._sensors.values()
                    ],
                }
            )
        sections: dict[str, Any] = {"drivers": drivers, "devices": top_devices}
        if self.scenario.rules:
            sections["rules"] = self.scenario.gateway_rules()
        return sections

    def _fast_polls(self, profile: str) -> dict[str, float]:
        """Poll every group at least every 2 real seconds, so a compressed night shows its curve."""
        groups = get_profile(profile, ModbusProfile).groups
        return {name: min(2.0, group.interval_s) for name, group in groups.items()}

    # --- with the gateway running ------------------------------------------------------------------------

    async def run(self, ble: BleDriver | None = None, stop: asyncio.Event | None = None) -> list[StepLog]:
        """Play the scenario to its end (or until ``stop``); ``ble`` receives the sensors' advertisements."""
        scale = self.scenario.time_scale
        end_real = self.scenario.duration_s / scale
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        start = self.started_at = loop.time()
        where = self.store_location  # known once the gateway's config is: after prepare()
        location = (KIOSK_LAT, KIOSK_LON) if where is None else (where.latitude, where.longitude)
        for n, kiosk_spec in enumerate(self.scenario.devices.kiosks):
            self._kiosks[kiosk_spec.id] = Kiosk(
                kiosk_spec.id, staff=kiosk_spec.staff, seed=self.seed + n, location=location
            )
        sending = asyncio.create_task(self._send_documents(time.time()), name="scenario-hq-documents")
        stopping = asyncio.create_task(stop.wait(), name="scenario-stop")
        try:
            await asyncio.wait((sending, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not sending.done():
                sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending  # raises what went wrong (a document the gateway refused)
        tills = self.scenario.devices.tills
        if tills.count and tills.rate_per_s > 0:
            self._spawn(
                run_terminals(
                    self.store_broker,
                    tills.ids(),
                    duration_s=end_real,
                    rate_per_s=tills.rate_per_s,
                    return_ratio=tills.return_ratio,
                    seed=self.seed,
                    on_publish=self._count_till,
                    terminals=list(self._terminals.values()),
                ),
                "scenario-tills",
            )
        if self._shelves:
            self._spawn(self._scan_shelves(end_real), "scenario-shelves")
        if ble is not None and self._sensors:
            self._spawn(self._advertise(ble, end_real), "scenario-ble")
        try:
            for step in sorted(self.scenario.steps, key=lambda s: s.at_s):
                delay = start + step.at_s / scale - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                if stop.is_set():
                    break
                await self._act(step)
            remaining = start + end_real - loop.time()
            if remaining > 0 and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await stop.wait()
        finally:
            await self._cancel_tasks()
        return self.log

    async def _send_documents(self, wall_start: float) -> None:
        """HQ's planogram and roster (shifts placed on the wall clock from ``wall_start``, scenario time 0)."""
        documents = self.scenario.hq
        roster = documents.roster_at(wall_start, self.scenario.time_scale)
        sent: list[tuple[str, dict[str, Any]]] = []
        if documents.planogram is not None:
            sent.append(("planogram.set", documents.planogram.model_dump(mode="json")))
        if roster is not None:
            sent.append(("roster.set", roster.model_dump(mode="json")))
        for command, args in sent:
            if self.hq is None:
                self._log(0, command, None, "no simulated HQ: not sent")
                continue
            result = await self.hq.command(command, args)
            self._log(0, command, None, f"stored by the gateway ({result.get('count')} entries)")

    async def close(self) -> None:
        await self._cancel_tasks()
        for rig in self._fridges.values():
            await rig.server.stop()
        for reader in self._readers.values():
            reader.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _count(self, what: str, n: int = 1) -> None:
        self.published[what] = self.published.get(what, 0) + n

    def _count_till(self, message: PosMessage) -> None:
        self._count("tills")
        if self.on_till is not None:
            self.on_till(message)

    def _note(self, step: Step, detail: str = "") -> None:
        self._log(step.at_s, step.action, step.device, detail)

    def _log(self, at_s: float, action: str, device: str | None, detail: str) -> None:
        entry = StepLog(at_s, action, device, detail)
        self.log.append(entry)
        _LOGGER.info(
            "scenario %s at %g s: %s %s %s", self.scenario.scenario, at_s, action, device or "", detail
        )
        if self.on_step is not None:
            self.on_step(entry)

    async def _act(self, step: Step) -> None:
        device = step.device
        action = step.action
        if device in self._fridges:
            await self._act_fridge(self._fridges[device], step)
        elif device in self._readers:
            self._act_reader(self._readers[device], step)
        elif device in self._shelves:
            self._act_shelf(self._shelves[device], step)
        elif device in self._kiosks and action == "checkin_wave":
            self._spawn(self._checkins(self._kiosks[device], step.count), f"scenario-checkins-{device}")
            self._note(step, f"{step.count} check-ins")
        elif device in self._kiosks and action == "checkin" and step.employee is not None:
            kiosk = self._kiosks[device]
            topic = KIOSK_TOPIC.format(device_id=kiosk.device_id)
            payload = kiosk.checkin_payload(step.employee, step.direction, step.distance_m)
            self._spawn(self._publish_all("kiosk", [(topic, payload)]), f"scenario-checkin-{device}")
            self._note(step, f"{step.employee} checks {step.direction} {step.distance_m:g} m from the store")
        elif action in ("sales", "returns") and (device or "pos-01") in self._terminals:
            self._spawn(self._receipts(step), f"scenario-{action}-{device}")
        elif action == "garbage":
            sender = device or "pos-01"
            self._spawn(self._garbage(sender, step.count), "scenario-garbage")
            self._note(step, f"{step.count} undecodable messages from {sender}")
        elif action == "flood" and device is not None:
            rate = step.rate_per_s or 100.0
            seconds = (step.for_s or 10.0) / self.scenario.time_scale
            self._spawn(self._flood(device, rate, seconds), f"scenario-flood-{device}")
            self._note(step, f"{rate:g} sales/s for {seconds:g} s (real time)")
        else:
            self._note(step, "not applicable to this device: skipped")

    async def _act_fridge(self, rig: _FridgeRig, step: Step) -> None:
        model = rig.model
        action = step.action
        if action == "door_open":
            model.door_open = True
            if step.for_s:
                self._spawn(
                    self._close_door_later(model, step.for_s / self.scenario.time_scale), "scenario-door"
                )
        elif action == "door_close":
            model.door_open = False
        elif action == "defrost":
            model.start_defrost()
        elif action == "compressor_failure":
            model.failed = True
        elif action == "compressor_repair":
            model.failed = False
        elif action == "unplug":
            if rig.line is not None:
                rig.line.cut = True
            else:
                await rig.server.stop()
        elif action == "plug":
            if rig.line is not None:
                rig.line.cut = False
            else:
                await rig.server.start_tcp("127.0.0.1", rig.port)
        else:
            self._note(step, "not applicable to a fridge: skipped")
            return
        self._note(step, f"air {model.air:.1f} °C")

    @staticmethod
    async def _close_door_later(model: FridgeModel, after_s: float) -> None:
        await asyncio.sleep(after_s)
        model.door_open = False

    def _act_reader(self, reader: PtyReader, step: Step) -> None:
        tag_field = reader.field

        def of_step(epc: bytes) -> bool:
            return step.sku is None or self._tag_skus.get(epc) == step.sku

        if step.action == "unplug":
            reader.close()
        elif step.action == "plug":
            reader.open()
        elif step.action == "tags_leave":
            leaving = [epc for epc in sorted(tag_field.present) if of_step(epc)][: step.count]
            tag_field.present.difference_update(leaving)
        elif step.action == "tags_arrive":
            absent = [epc for epc in tag_field.population if epc not in tag_field.present and of_step(epc)]
            tag_field.present.update(absent[: step.count])
        elif step.action == "delivery":
            arriving = self._deliver_cases(step.device or "", tag_field, step.count)
            if self.hq is not None:
                units: dict[str, int] = {}
                for epc in arriving:
                    sku = self._tag_skus[epc]
                    units[sku] = units.get(sku, 0) + CASE_UNITS
                self.hq.deliver(units, f"delivery of {len(arriving)} case(s) at {step.device}")
        else:
            self._note(step, "not applicable to an RFID reader: skipped")
            return
        self._note(step, f"{len(tag_field.present)} tags in the field")

    def _deliver_cases(self, reader: str, tag_field: TagField, count: int) -> list[bytes]:
        """New cases, each with its own tag, arrive in the reader's field; the previous delivery's cases have
        been unpacked by now and leave it (so the field stays bounded however long the demo runs)."""
        for epc in self._delivered.pop(reader, []):
            tag_field.present.discard(epc)
            tag_field.population.remove(epc)
            del self._tag_skus[epc]
        arriving = []
        for _ in range(count):
            self._cases += 1
            item = CATALOG[self._cases % len(CATALOG)]
            epc = encode_sgtin96("0" + item.gtin.zfill(13), CASE_SERIAL_BASE + self._cases)
            self._tag_skus[epc] = item.sku
            tag_field.population.append(epc)
            arriving.append(epc)
        tag_field.present.update(arriving)
        self._delivered[reader] = arriving
        return arriving

    def _act_shelf(self, shelf: Shelf, step: Step) -> None:
        if step.action == "tags_leave":
            shelf.present.difference_update(sorted(shelf.present)[: step.count])
        elif step.action == "tags_arrive":
            for _ in range(step.count):
                shelf.present.add(shelf._new_epc())
        else:
            self._note(step, "not applicable to a shelf: skipped")
            return
        self._note(step, f"{len(shelf.present)} tags on the shelf")

    async def _client(self, role: str) -> MqttClient:
        self._clients += 1  # steps at the same time each have their own connection: ids must differ
        client = MqttClient(self.store_broker, f"sim-scenario-{role}-{self._clients}", clean_start=True)
        await client.connect()
        return client

    async def _publish_all(self, role: str, messages: list[tuple[str, bytes]], rate_per_s: float = 0) -> None:
        client = await self._client(role)
        try:
            window: list[asyncio.Future[None]] = []
            for topic, payload in messages:
                window.append(client.publish(topic, payload, qos=1))
                if len(window) >= 100:
                    await asyncio.gather(*window)
                    self._count(role, len(window))
                    window = []
                if rate_per_s:
                    await asyncio.sleep(1 / rate_per_s)
            await asyncio.gather(*window)
            self._count(role, len(window))
        finally:
            await client.disconnect()

    async def _receipts(self, step: Step) -> None:
        """A till's ``sales`` (``count`` receipts, or one of ``count`` units of ``sku``) or ``returns`` (``count``
        returns of its earlier sales)."""
        terminal = self._terminals[step.device or "pos-01"]
        if step.action == "returns":
            messages = [terminal.make_return() for _ in range(step.count)]
        elif step.sku is not None:
            messages = [terminal.make_sale([(CATALOG_BY_SKU[step.sku], step.count)])]
        else:
            messages = [terminal.make_sale() for _ in range(step.count)]
        returns = sum(m.action == "return" for m in messages)
        self._note(step, f"{len(messages) - returns} sale(s), {returns} return(s) from {terminal.device_id}")
        client = await self._client(f"receipts-{terminal.device_id}")
        try:
            for message in messages:
                topic = TILL_TOPIC.format(device_id=message.device_id, action=message.action)
                await client.publish(topic, message.payload, qos=1)
                self._count_till(message)
        finally:
            await client.disconnect()

    async def _checkins(self, kiosk: Kiosk, count: int) -> None:
        topic = KIOSK_TOPIC.format(device_id=kiosk.device_id)
        await self._publish_all("kiosk", [(topic, kiosk.next_payload()) for _ in range(count)], rate_per_s=20)

    async def _garbage(self, device: str, count: int) -> None:
        catalogue = [m for m in garbage_messages() if m.reason not in GARBAGE_SKIPPED]
        picked = itertools.islice(itertools.cycle(catalogue), count)
        topic = TILL_TOPIC.replace("{device_id}", device)
        await self._publish_all("garbage", [(topic.format(action=m.action), m.payload) for m in picked])

    async def _flood(self, device: str, rate_per_s: float, seconds: float) -> None:
        terminal = PosTerminal(device, seed=self.seed, return_ratio=0.0)
        total = int(rate_per_s * seconds)
        topic = TILL_TOPIC.replace("{device_id}", device).format(action="sale")
        await self._publish_all(
            "flood", [(topic, terminal.make_sale().payload) for _ in range(total)], rate_per_s
        )

    async def _scan_shelves(self, end_real: float) -> None:
        client = await self._client("shelves")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + end_real
        try:
            while loop.time() < deadline:
                for shelf in self._shelves.values():
                    topic = SHELF_TOPIC.format(device_id=shelf.device_id)
                    await client.publish(topic, shelf.next_payload(), qos=1)
                    self._count("shelf")
                await asyncio.sleep(SHELF_SCAN_S)
        finally:
            await client.disconnect()

    async def _advertise(self, ble: BleDriver, end_real: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + end_real
        next_at = {device_id: loop.time() for device_id in self._sensors}
        while loop.time() < deadline:
            now = loop.time()
            for device_id, (spec, sensor) in self._sensors.items():
                if now >= next_at[device_id]:
                    if spec.inside is not None:
                        cabinet = self._fridges[spec.inside].model
                        sensor.follow(cabinet.air, cabinet.door_open)
                    else:
                        sensor.step(spec.interval_s * self.scenario.time_scale)
                    ble.on_advertisement(*sensor.advert().to_bleak())
                    self._count("ble")
                    next_at[device_id] = now + spec.interval_s
            await asyncio.sleep(max(0.05, min(next_at.values()) - loop.time()))
