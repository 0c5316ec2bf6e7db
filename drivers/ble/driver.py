"""The BLE driver: one shared bleak scanner, advertisements matched to devices by MAC, decoded, deduplicated.

bleak calls :meth:`BleDriver.on_advertisement` on the event loop for every advertisement it hears; tests call it
the same way with real ``BLEDevice`` / ``AdvertisementData`` objects. BlueZ repeats an advertisement (same bytes,
new RSSI) many times a second, so a repeat of the bytes last taken from a device, or of its frame counter, is
skipped (``storegw_messages_duplicate``). Unknown MACs (every phone in the shop) are counted and ignored.

Encrypted frames carry an authenticated counter, and a replayed one is dropped (``storegw_messages_dropped``,
reason ``replayed``), not quarantined: BTHome's 32-bit counter must increase; pvvx's 8-bit counter must be at most
``PVVX_WINDOW`` ahead of the last (mod 256). A device that rebooted (counter back near 0) or was out of range for
long is resynchronised once its frames have been behind for ``RESYNC_AFTER_S`` with none in order in between
(bthome-ble instead accepts any lower counter below 100; a replay of such an early frame would pass there).
Advertisements that do not decode are quarantined as one row per device per ``GARBAGE_REPORT_S`` (counts by
reason, the first bytes kept), so one mis-keyed sensor cannot fill the quarantine.

Without an adapter or D-Bus (a container without the system bus socket, a Pi with Bluetooth off) the driver
reports one clear error in ``/health`` (``driver_errors``), logs it once at WARNING, and retries slowly; the rest of
the gateway runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback
from bleak.exc import BleakBluetoothNotAvailableError, BleakError

from drivers.base import DecodeError, DriverContext
from drivers.ble.config import BleDeviceConfig, BleDriverConfig, BleProfile
from drivers.ble.decode import decode_advertisement, payload_of
from drivers.ble.formats import RUUVI_COMPANY_ID, BleFormat, mac_bytes
from drivers.devices import Device
from drivers.limits import DeviceLimits
from drivers.profiles import get_profile
from drivers.sink import GarbageBatch
from gateway.kernel.supervise import Backoff, QuietLog

_LOGGER = logging.getLogger(__name__)

SILENT_RESTART_S: Final = 300.0
"""No advertisement from anyone for this long while scanning: the scan died (bluetoothd restarted): restart it."""
GARBAGE_REPORT_S: Final = 1.0
"""Undecodable advertisements of one device are quarantined as one row per this many seconds."""
PVVX_WINDOW: Final = 32
"""An encrypted pvvx frame's 8-bit counter may be this far ahead of the last one taken (missed frames)."""
RESYNC_AFTER_S: Final = 120.0
"""Encrypted frames behind the last counter for this long, with none in order: the device restarted: follow it."""
OR_PATTERNS: Final[tuple[OrPatternLike, ...]] = (
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xd2\xfc"),  # BTHome
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\x1a\x18"),  # ATC1441 / pvvx
    OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, RUUVI_COMPANY_ID.to_bytes(2, "little")),
)
"""What BlueZ's advertisement monitor passes on in passive mode (it needs at least one pattern)."""


def _adapter_errors() -> tuple[type[BaseException], ...]:
    try:
        from dbus_fast.errors import DBusFastError
    except ImportError:  # not Linux: bleak has another backend
        return (BleakError, OSError, EOFError)
    return (BleakError, OSError, EOFError, DBusFastError)


ADAPTER_ERRORS: Final = _adapter_errors()


class Scanner(Protocol):
    """What the driver uses of a ``BleakScanner``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ScannerFactory(Protocol):
    """How the driver makes its scanner: ``BleakScanner`` itself, or a stand-in in tests."""

    def __call__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        *,
        scanning_mode: Literal["active", "passive"],
        bluez: BlueZScannerArgs,
    ) -> Scanner: ...


def describe_adapter_error(err: BaseException) -> str:
    """One line a technician can act on, for an error starting the scanner."""
    if isinstance(err, FileNotFoundError):
        hint = (
            "the D-Bus system bus socket is missing: run bluetoothd and dbus, and in Docker mount"
            " /run/dbus/system_bus_socket (see docker/compose.yaml)"
        )
    elif isinstance(err, PermissionError):
        hint = "D-Bus refused us: allow the gateway's user to use BlueZ (group 'bluetooth')"
    elif isinstance(err, BleakBluetoothNotAvailableError):
        hint = f"{err.reason.name.lower()}: plug in or power on an adapter ('bluetoothctl power on')"
    else:
        hint = "check 'bluetoothctl list' and 'systemctl status bluetooth'"
    text = str(err) or type(err).__name__
    return f"no Bluetooth adapter: {text} ({hint})"


@dataclass(slots=True)
class _Tracked:
    """A configured sensor and what the driver remembers of it between advertisements."""

    device: Device
    fmt: BleFormat
    mac: bytes
    key: bytes | None
    reed_switch: bool
    min_interval_s: float
    last_raw: bytes = b""
    last_raw_at: float = float("-inf")
    last_counter: int | None = None
    last_taken_at: float = float("-inf")
    behind_since: float | None = None
    """When encrypted frames started arriving behind ``last_counter`` (None: in order)."""
    garbage: GarbageBatch = field(kw_only=True)
    """Its undecodable advertisements, quarantined as one row a second."""


class BleDriver:
    """One driver instance: its scanner's lifecycle and the advertisement callback."""

    def __init__(
        self, config: BleDriverConfig, ctx: DriverContext, scanner_factory: ScannerFactory = BleakScanner
    ) -> None:
        self.name = config.name
        self._config = config
        self._ctx = ctx
        self.scanner_factory = scanner_factory
        """Makes the scanner at each (re)start: bleak's, or a simulated radio (the demo) set before ``run()``."""
        self._sink = ctx.sink(config.name)
        self._monotonic = ctx.devices.monotonic
        metrics = ctx.metrics
        self._repeats = metrics.duplicates.labels(config.name)
        self._unknown = metrics.dropped.labels(config.name, "unknown_device")
        self._too_soon = metrics.dropped.labels(config.name, "min_interval")
        self._replayed = metrics.dropped.labels(config.name, "replayed")
        self._by_mac = {d.mac: self._track(d) for d in config.devices}
        self.unknown_heard = 0
        """Advertisements from MACs that are not configured (a store hears every phone around)."""
        self.scanning_mode: str | None = None
        """The mode the scanner runs in once started ('passive', or 'active' after a fallback)."""
        self._accepting = True
        self._last_heard = self._monotonic()
        self.silent_restart_s = SILENT_RESTART_S
        """Restart the scan after this long without any advertisement (tests shorten it)."""
        self._silence = QuietLog(_LOGGER, f"{self.name}: Bluetooth advertisements")
        self._passive_refused = False
        ctx.set_state(self.name, False, "starting the Bluetooth scanner")

    def _track(self, config: BleDeviceConfig) -> _Tracked:
        limits = DeviceLimits.model_validate(config.model_dump(include=set(DeviceLimits.model_fields)))
        device = self._ctx.devices.add(config.id, self.name, limits, config.profile)
        profile = get_profile(config.profile, BleProfile)
        return _Tracked(
            device,
            profile.format,
            mac_bytes(config.mac),
            config.key,
            config.reed_switch,
            config.min_interval_s,
            garbage=GarbageBatch(self._sink, device, "advertisement(s)", "items", GARBAGE_REPORT_S),
        )

    def pause(self) -> None:
        self._accepting = False
        self.flush_garbage()

    def flush_garbage(self) -> None:
        """Quarantine what is held of every device's undecodable advertisements now."""
        for tracked in self._by_mac.values():
            tracked.garbage.flush()

    async def run(self) -> None:
        """Scan until cancelled; without an adapter, say so once and retry with a backoff up to ``retry_max_s``.

        A restart after a silent spell (:data:`SILENT_RESTART_S`) is planned: the driver stays 'connected'."""
        backoff = Backoff(base=5.0, cap=self._config.retry_max_s)
        quiet = QuietLog(_LOGGER, f"{self.name}: Bluetooth")
        try:
            while True:
                try:
                    scanner = await self._start()
                except ADAPTER_ERRORS as err:
                    self._start_failed(quiet, describe_adapter_error(err))
                    await asyncio.sleep(backoff.next_delay())
                    continue
                except Exception as err:  # bleak or dbus_fast failing in a way we do not know: retry, quietly
                    message = f"the Bluetooth scanner did not start: {type(err).__name__}: {err}"
                    if not quiet.down:
                        _LOGGER.exception("%s: %s (retrying quietly)", self.name, message)
                        quiet.down = True
                    self._start_failed(quiet, message)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                first = quiet.down or not self._ctx.state(self.name).connected
                quiet.recovered()
                self._ctx.set_state(self.name, True)
                log = _LOGGER.info if first else _LOGGER.debug
                log("%s: scanning (%s) for %d devices", self.name, self.scanning_mode, len(self._by_mac))
                try:
                    await self._until_silent()
                except BaseException:
                    self._ctx.set_state(self.name, False, "the Bluetooth scan stopped")
                    raise
                finally:
                    await self._stop(scanner)
        finally:
            self.flush_garbage()

    def _start_failed(self, quiet: QuietLog, message: str) -> None:
        self._ctx.set_state(self.name, False, message)
        quiet.failed(message)

    async def _stop(self, scanner: Scanner) -> None:
        try:
            await scanner.stop()
        except Exception as err:  # the scan is gone either way; the next start reports what is wrong
            _LOGGER.debug("%s: stopping the Bluetooth scanner: %r", self.name, err)

    async def _start(self) -> Scanner:
        bluez: BlueZScannerArgs = {"or_patterns": list(OR_PATTERNS)}
        if self._config.adapter is not None:
            bluez["adapter"] = self._config.adapter
        if self._config.scanning_mode == "passive":
            try:
                scanner = self.scanner_factory(self.on_advertisement, scanning_mode="passive", bluez=bluez)
                await scanner.start()
            except BleakBluetoothNotAvailableError:
                raise
            except BleakError as err:
                log = _LOGGER.debug if self._passive_refused else _LOGGER.warning
                self._passive_refused = True
                log("%s: passive scanning is not available (%s): scanning actively", self.name, err)
            else:
                self.scanning_mode = "passive"
                return scanner
        active: BlueZScannerArgs = {"adapter": bluez["adapter"]} if "adapter" in bluez else {}
        scanner = self.scanner_factory(self.on_advertisement, scanning_mode="active", bluez=active)
        await scanner.start()
        self.scanning_mode = "active"
        return scanner

    async def _until_silent(self) -> None:
        self._last_heard = self._monotonic()
        while True:
            await asyncio.sleep(self.silent_restart_s / 5)
            silent = self._monotonic() - self._last_heard
            if silent >= self.silent_restart_s:
                self._silence.failed(f"none for {silent:.0f} s: restarting the scan")
                return

    def on_advertisement(self, ble_device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback (plain, on the event loop): one advertisement from one address."""
        if not self._accepting:
            return
        now = self._monotonic()
        self._last_heard = now
        if self._silence.down:
            self._silence.recovered()
        tracked = self._by_mac.get(ble_device.address.upper())
        if tracked is None:
            self.unknown_heard += 1
            self._unknown.inc()
            return
        raw = payload_of(tracked.fmt, adv.service_data, adv.manufacturer_data)
        if not raw:
            return  # a scan response or another format's advertisement from the same sensor
        if raw == tracked.last_raw and now - tracked.last_raw_at < self._config.repeat_window_s:
            self._repeats.inc()
            return
        tracked.last_raw = raw
        tracked.last_raw_at = now
        device = tracked.device
        try:
            reading = decode_advertisement(
                tracked.fmt,
                tracked.mac,
                adv.service_data,
                adv.manufacturer_data,
                tracked.key,
                reed_switch=tracked.reed_switch,
            )
        except DecodeError as err:
            tracked.garbage.add(err.reason, raw, detail=err.detail)
            return
        except Exception as err:  # a decoder bug: quarantine this advertisement, keep scanning
            _LOGGER.exception("%s: decoding an advertisement of %s failed", self.name, device.id)
            tracked.garbage.add("internal_error", raw, detail=repr(err)[:300])
            return
        if reading.counter is not None:
            if reading.counter == tracked.last_counter:
                self._repeats.inc()
                return
            if tracked.key is not None and not self._in_order(tracked, reading.counter, now):
                self._replayed.inc()
                return
            tracked.last_counter = reading.counter
        if now - tracked.last_taken_at < tracked.min_interval_s:
            self._too_soon.inc()
            return
        tracked.last_taken_at = now
        reading = reading.model_copy(update={"rssi_dbm": max(-127, min(20, adv.rssi))})
        self._sink.emit(device, "sensor.sample", reading, size=len(raw), raw=raw)

    def _in_order(self, tracked: _Tracked, counter: int, now: float) -> bool:
        """Whether an encrypted frame's (authenticated) counter is ahead of the last one; else it is a replay,
        unless frames have been behind for RESYNC_AFTER_S with none in order (the device restarted)."""
        last = tracked.last_counter
        if last is None:
            return True
        ahead = 0 < (counter - last) % 256 <= PVVX_WINDOW if tracked.fmt == "pvvx" else counter > last
        if ahead:
            tracked.behind_since = None
            return True
        if tracked.behind_since is None:
            tracked.behind_since = now
        if now - tracked.behind_since < RESYNC_AFTER_S:
            _LOGGER.debug(
                "%s: %s sent counter %d after %d: replayed", self.name, tracked.device.id, counter, last
            )
            return False
        _LOGGER.info(
            "%s: %s has sent counters behind %d for %.0f s: following it from %d (restarted)",
            self.name,
            tracked.device.id,
            last,
            now - tracked.behind_since,
            counter,
        )
        tracked.behind_since = None
        return True
