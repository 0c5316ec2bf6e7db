"""The serial driver: one task per port, each reopening its port when the USB adapter comes back.

Per device: open the port (a stable ``/dev/serial/by-id/...`` path survives replugging), feed what arrives
to the profile's framer, and hand frames to its codec: a Chafon RFID reader is polled for inventories and
its reads aggregated by :class:`drivers.rfid.InventoryTracker` into ``rfid.inventory``; a scale's stable
weights become ``sensor.sample`` (on a change, and every SCALE_HEARTBEAT_S while the same); barcode scans
become ``barcode.scanned``. Garbage is quarantined at most once per second per device, aggregated.
A port that vanishes (EIO, ENXIO, SerialException) is reported with ``sink.failed`` and reopened with
full-jitter backoff, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Final

import serial_asyncio_fast

from drivers.base import DriverContext
from drivers.devices import Device
from drivers.rfid import InventoryTracker, merge_inventories
from drivers.serial import chafon
from drivers.serial.config import (
    FixedFraming,
    LengthCrcFraming,
    LineFraming,
    SerialDevice,
    SerialDriverConfig,
    SerialProfile,
    StxEtxFraming,
)
from drivers.serial.framing import (
    FixedFramer,
    Frame,
    FrameError,
    Framer,
    LengthCrcFramer,
    LineFramer,
    StxEtxFramer,
)
from drivers.serial.lines import Barcode, ScaleFormat, parse_barcode, parse_scale
from drivers.sink import DeviceSink, GarbageBatch
from gateway.kernel.events import BarcodeScanned, RfidInventory, SensorSample
from gateway.kernel.supervise import Backoff, QuietLog

_LOGGER = logging.getLogger(__name__)

GARBAGE_REPORT_S: Final = 1.0
"""Garbage of one device is quarantined at most this often, as one aggregated entry."""
NOT_ANSWERING: Final = "reader not answering polls"
"""The error of a polled reader after ``error_after_timeouts`` polls in a row without an answer."""
SCALE_HEARTBEAT_S: Final = 60.0
"""A streaming scale repeats its reading several times a second: the same reading is sent again this often."""
STABLE_OPEN_S: Final = 10.0
"""A port open this long (or one good frame) counts as recovered: the reopen backoff and the quiet log reset."""
PORT_ERRORS: Final = (OSError, ValueError)
"""What opening or reading a port raises when it is missing, gone (pyserial's SerialException is an OSError)
or misconfigured."""


def make_framer(profile: SerialProfile) -> Framer:
    """The framer a profile describes."""
    framing = profile.framing
    if isinstance(framing, LineFraming):
        return LineFramer(framing.max_line)
    if isinstance(framing, StxEtxFraming):
        return StxEtxFramer(framing.max_payload, framing.bcc)
    if isinstance(framing, LengthCrcFraming):
        return LengthCrcFramer(
            framing.crc,
            header=bytes.fromhex(framing.header),
            len_offset=framing.len_offset,
            len_width=framing.len_width,
            len_order=framing.len_order,
            len_adjust=framing.len_adjust,
            crc_order=framing.crc_order,
            min_frame=framing.min_frame,
            max_frame=framing.max_frame,
        )
    assert isinstance(framing, FixedFraming)
    return FixedFramer(framing.size, bytes.fromhex(framing.header))


class SerialDriver:
    """One driver instance: a task per configured port."""

    def __init__(self, config: SerialDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._ctx = ctx
        sink = ctx.sink(config.name)
        self.ports = [
            _Port(
                self,
                d,
                ctx.devices.add(d.id, config.name, d, d.profile),
                sink,
                config.reopen_backoff_cap_s,
            )
            for d in config.devices
        ]
        self.accepting = True

    async def run(self) -> None:
        self.port_changed()
        async with asyncio.TaskGroup() as tg:
            for port in self.ports:
                tg.create_task(port.run(), name=f"serial-{self.name}-{port.device.id}")

    def pause(self) -> None:
        self.accepting = False

    def port_changed(self) -> None:
        down = [f"{p.device.id}: {p.error}" for p in self.ports if not p.open]
        self._ctx.set_state(self.name, not down, "; ".join(down)[:500] or None)


class _Protocol(asyncio.Protocol):
    def __init__(self, port: _Port) -> None:
        self._port = port
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._port.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _Port:
    """One device on one serial port: open, read, poll, reopen."""

    def __init__(
        self,
        driver: SerialDriver,
        config: SerialDevice,
        device: Device,
        sink: DeviceSink,
        backoff_cap_s: float,
    ) -> None:
        self.driver = driver
        self.config = config
        self.device = device
        self.sink = sink
        self.profile = profile = config.profile_model
        self.framer = make_framer(profile)
        self.open = False
        self.error: str | None = "not opened yet"
        self._backoff = Backoff(base=0.5, cap=backoff_cap_s)
        self._stable = False
        self._quiet = QuietLog(_LOGGER, f"serial port {config.port} ({config.id})")
        self._transport: asyncio.Transport | None = None
        self._garbage = GarbageBatch(sink, self.device, "bytes", "bytes", GARBAGE_REPORT_S)
        self.timeouts = 0
        """Polls without an answer, since start."""
        self.consecutive_timeouts = 0
        """Polls without an answer in a row (0 once the reader answers)."""
        self._answered = asyncio.Event()
        self._answered_in_window = False
        self._scale_last: tuple[float, bool] | None = None
        self._scale_sent_at = 0.0
        self._held: RfidInventory | None = None
        """A window not sent (reader silent, journal full, rate-limited): merged into the next one."""
        self._held_bytes = 0
        self._answering_since: float | None = None
        """When the reader started answering (None: since the port opened, or since it went silent)."""
        self._window_bytes = 0
        self._last_emit: float | None = None
        self.tracker = (
            InventoryTracker(config.window_s, config.depart_after_s, config.max_tags)
            if profile.codec == "chafon"
            else None
        )
        self._scale = (
            ScaleFormat(
                re.compile(profile.scale.pattern),
                profile.scale.default_unit,
                frozenset(profile.scale.stable),
                frozenset(profile.scale.overload),
            )
            if profile.scale is not None
            else None
        )

    async def run(self) -> None:
        """Open the port, serve it until it goes away, report it, back off, reopen: until cancelled."""
        while True:
            try:
                reason = await self._session()
            except PORT_ERRORS as err:
                reason = str(err) or type(err).__name__
            except Exception as err:  # termios.error, or anything unforeseen: this port fails, not the driver
                _LOGGER.debug("%s: port failure", self.device.id, exc_info=True)
                reason = f"{type(err).__name__}: {err}"
            self._quiet.failed(reason)
            self.open = False
            self.error = reason[:300]
            self.driver.port_changed()
            self.sink.failed(self.device, f"serial port {self.config.port}: {reason}")
            await asyncio.sleep(self._backoff.next_delay())

    async def _session(self) -> str:
        loop = asyncio.get_running_loop()
        profile, config = self.profile, self.config
        protocol = _Protocol(self)
        transport, _ = await serial_asyncio_fast.create_serial_connection(
            loop,
            lambda: protocol,
            config.port,
            baudrate=config.baudrate or profile.baudrate,
            bytesize=config.bytesize or profile.bytesize,
            parity=config.parity or profile.parity,
            stopbits=config.stopbits or profile.stopbits,
            exclusive=True,  # a second process on the same reader would garble both conversations
        )
        self._transport = transport
        self.framer.flush()
        self._answering_since = None
        self.open = True
        self.error = None
        self._stable = False
        stable_timer = loop.call_later(STABLE_OPEN_S, self._port_stable)
        self.driver.port_changed()
        self.sink.reachable(self.device)
        _LOGGER.info("%s: opened %s", config.id, config.port)
        # A polled reader proves itself by answering; a passive scanner or scale has nothing to say while
        # idle, so its open port is its liveness.
        helper = self._poll(transport) if self.tracker is not None else self._keep_alive()
        task = asyncio.create_task(helper, name=f"serial-port-{config.id}")
        try:
            exc = await protocol.lost
            return f"port lost: {exc}" if exc else "port closed"
        finally:
            stable_timer.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._transport = None
            self._garbage.flush()
            transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(protocol.lost)

    def _port_stable(self) -> None:
        """The port has been open a while or gave a good frame: a later loss starts the backoff afresh."""
        if not self._stable:
            self._stable = True
            self._backoff.reset()
            self._quiet.recovered()

    async def _keep_alive(self) -> None:
        """Passive devices: reachable while the port is open (idle silence is not 'offline')."""
        every = self.device.limits.offline_after_s / 2
        while True:
            self.sink.reachable(self.device)
            await asyncio.sleep(every)

    async def _poll(self, transport: asyncio.Transport) -> None:
        """Chafon: one inventory per poll interval; answers are handled in :meth:`on_data`."""
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval_s or self.profile.poll_interval_s or 1.0
        timeout = self.config.response_timeout_s or self.profile.response_timeout_s
        command = chafon.encode_inventory()
        while True:
            if self.driver.accepting:
                self._answered.clear()
                transport.write(command)
                try:
                    async with asyncio.timeout(timeout):
                        await self._answered.wait()
                except TimeoutError:
                    self._timed_out(timeout)
                else:
                    self.consecutive_timeouts = 0
            self._maybe_close_window(loop.time())
            await asyncio.sleep(interval)

    def _timed_out(self, timeout: float) -> None:
        self.timeouts += 1
        self.consecutive_timeouts += 1
        for item in self.framer.flush():  # a half answer will not be completed: it is garbage
            if isinstance(item, FrameError):
                self._garbage.add(item.reason, item.raw, item.size)
        limit = self.config.error_after_timeouts
        _LOGGER.debug(
            "%s: no answer within %.1f s (%d in a row)", self.device.id, timeout, self.consecutive_timeouts
        )
        if self.consecutive_timeouts >= limit:
            self._answering_since = None
            # Fixed text: the device reports 'error' once per spell; the running count is in health.errors
            # (one per unanswered poll from here on) and in `timeouts` / `consecutive_timeouts`.
            self.sink.failed(self.device, NOT_ANSWERING)

    def _maybe_close_window(self, now: float) -> None:
        tracker = self.tracker
        if tracker is None or not tracker.due(now):
            return
        answered, self._answered_in_window = self._answered_in_window, False
        size, self._window_bytes = self._window_bytes, 0
        since = self._answering_since
        # Departures only after a whole depart_after_s of a reader answering: a silent or just (re)opened
        # reader has not read the tags, which does not make them gone.
        departures = answered and since is not None and now - since >= tracker.depart_after_s
        inventory = tracker.close_window(now, departures=departures)
        held, self._held = self._held, None
        if held is not None:
            inventory = held if inventory is None else merge_inventories(held, inventory, tracker.max_tags)
            size += self._held_bytes
        if not answered or self.consecutive_timeouts >= self.config.error_after_timeouts:
            # Reads from before the reader went silent are real but sending them now would call it online:
            # they go out, merged, with the first window it answers in.
            self._held, self._held_bytes = inventory, size
            return
        if inventory is None:
            # Nothing read and nothing left: still say the reader is alive, but not every window.
            quiet_for = now - (self._last_emit if self._last_emit is not None else now - 1e9)
            if not answered or quiet_for < self.device.limits.offline_after_s / 2:
                return
            inventory = RfidInventory(window_s=min(3600.0, quiet_for), reads=0, tags=[])
        self._last_emit = now
        sent = self.sink.emit(
            self.device, "rfid.inventory", inventory, size=min(size, self.device.limits.max_payload_bytes)
        )
        if not sent and (inventory.tags or inventory.appeared or inventory.departed or inventory.truncated):
            self._held, self._held_bytes = (
                inventory,
                size,
            )  # journal full or rate-limited: into the next window

    def on_data(self, data: bytes) -> None:
        if not self.driver.accepting:
            return
        for item in self.framer.feed(data):
            if isinstance(item, FrameError):
                self._garbage.add(item.reason, item.raw, item.size)
            else:
                self._port_stable()
                try:
                    self._on_frame(item)
                except Exception:  # a codec bug: quarantine-worthy, never fatal to the port
                    _LOGGER.exception("%s: handling a frame failed", self.device.id)
                    self._garbage.add("internal_error", item.raw)

    def _on_frame(self, frame: Frame) -> None:
        codec = self.profile.codec
        if codec == "chafon":
            self._on_chafon(frame)
        elif codec == "scale":
            assert self._scale is not None
            reading = parse_scale(frame.payload, self._scale)
            if isinstance(reading, Exception):
                self._garbage.add(reading.reason, frame.raw)
                return
            assert self.profile.scale is not None
            if not reading.stable and self.profile.scale.only_stable:
                return
            now = asyncio.get_running_loop().time()
            key = (reading.weight_kg, reading.stable)
            if key == self._scale_last and now - self._scale_sent_at < SCALE_HEARTBEAT_S:
                return  # the same reading again: only a change or the heartbeat goes out
            sample = SensorSample(
                values={"weight": reading.weight_kg, "stable": 1.0 if reading.stable else 0.0},
                units={"weight": "kg"},
                source=self.profile.profile,
            )
            if self.sink.emit(self.device, "sensor.sample", sample, size=len(frame.raw), raw=frame.raw):
                self._scale_last, self._scale_sent_at = key, now
        else:
            scan = parse_barcode(frame.payload)
            if isinstance(scan, Exception):
                self._garbage.add(scan.reason, frame.raw)
                return
            self._on_barcode(scan, frame.raw)

    def _on_barcode(self, scan: Barcode, raw: bytes) -> None:
        event = BarcodeScanned(code=scan.code, gtin=scan.gtin)
        self.sink.emit(self.device, "barcode.scanned", event, size=len(raw), raw=raw)

    def _on_chafon(self, frame: Frame) -> None:
        response = chafon.decode_response(frame.payload)
        if isinstance(response, Exception):
            self._garbage.add(response.reason, frame.raw)
            return
        if response.command != chafon.CMD_INVENTORY:
            self._garbage.add("unexpected_command", frame.raw)
            return
        self.sink.reachable(self.device)  # it answered, even if with "no tag" or a reader status
        inventory = chafon.decode_inventory(response)
        self._window_bytes += len(frame.raw)
        self._answered_in_window = True
        now = asyncio.get_running_loop().time()
        if self._answering_since is None:
            self._answering_since = now
        if isinstance(inventory, Exception):
            self._garbage.add(inventory.reason, frame.raw)
            self._answered.set()
            return
        tracker = self.tracker
        assert tracker is not None
        for epc in inventory.epcs:
            tracker.read(epc.hex().upper(), None, None, now)
        if not inventory.more:
            self._answered.set()
