"""The BLE driver: one shared bleak scanner, advertisements matched to devices by MAC, decoded, deduplicated.

bleak calls :meth:`BleDriver.on_advertisement` on the event loop for every advertisement it hears; tests call it
the same way with real ``BLEDevice`` / ``AdvertisementData`` objects. BlueZ repeats an advertisement (same bytes,
new RSSI) many times a second, so a repeat of the bytes last taken from a device, or of its frame counter, is
skipped (``storegw_messages_duplicate``). Unknown MACs (every phone in the shop) are counted and ignored.

Without an adapter or D-Bus (a container without the system bus socket, a Pi with Bluetooth off) the driver
reports one clear error in ``/health`` (``driver_errors``), logs it once at WARNING, and retries slowly; the rest of
the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakError

from drivers.base import DecodeError, DriverContext
from drivers.ble.config import BleDeviceConfig, BleDriverConfig, BleProfile
from drivers.ble.decode import decode_advertisement, payload_of
from drivers.ble.formats import RUUVI_COMPANY_ID, BleFormat, mac_bytes
from drivers.devices import Device
from drivers.limits import DeviceLimits
from drivers.profiles import get_profile
from gateway.supervise import Backoff, QuietLog

_LOGGER = logging.getLogger(__name__)

SILENT_RESTART_S: Final = 300.0
"""No advertisement from anyone for this long while scanning: the scan died (bluetoothd restarted): restart it."""
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
    min_interval_s: float
    last_raw: bytes = b""
    last_raw_at: float = float("-inf")
    last_counter: int | None = None
    last_taken_at: float = float("-inf")


class BleDriver:
    """One driver instance: its scanner's lifecycle and the advertisement callback."""

    def __init__(self, config: BleDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._config = config
        self._ctx = ctx
        self._sink = ctx.sink(config.name)
        self._monotonic = ctx.devices.monotonic
        metrics = ctx.metrics
        self._repeats = metrics.duplicates.labels(config.name)
        self._unknown = metrics.dropped.labels(config.name, "unknown_device")
        self._rate_limited = metrics.dropped.labels(config.name, "rate_limited")
        self._too_soon = metrics.dropped.labels(config.name, "min_interval")
        self._by_mac = {d.mac: self._track(d) for d in config.devices}
        self.unknown_heard = 0
        """Advertisements from MACs that are not configured (a store hears every phone around)."""
        self.scanning_mode: str | None = None
        """The mode the scanner runs in once started ('passive', or 'active' after a fallback)."""
        self._accepting = True
        self._last_heard = self._monotonic()
        ctx.set_state(self.name, False, "starting the Bluetooth scanner")

    def _track(self, config: BleDeviceConfig) -> _Tracked:
        limits = DeviceLimits.model_validate(config.model_dump(include=set(DeviceLimits.model_fields)))
        device = self._ctx.devices.add(config.id, self.name, limits, config.profile)
        profile = get_profile(config.profile, BleProfile)
        return _Tracked(device, profile.format, mac_bytes(config.mac), config.key, config.min_interval_s)

    def pause(self) -> None:
        self._accepting = False

    async def run(self) -> None:
        """Scan until cancelled; without an adapter, say so once and retry with a backoff up to ``retry_max_s``."""
        backoff = Backoff(base=5.0, cap=self._config.retry_max_s)
        quiet = QuietLog(_LOGGER, f"{self.name}: Bluetooth")
        while True:
            try:
                scanner = await self._start()
            except ADAPTER_ERRORS as err:
                message = describe_adapter_error(err)
                self._ctx.set_state(self.name, False, message)
                quiet.failed(message)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            quiet.recovered()
            self._ctx.set_state(self.name, True)
            _LOGGER.info("%s: scanning (%s) for %d devices", self.name, self.scanning_mode, len(self._by_mac))
            try:
                await self._until_silent()
            finally:
                self._ctx.set_state(self.name, False, "the Bluetooth scan stopped")
                with contextlib.suppress(*ADAPTER_ERRORS):
                    await scanner.stop()

    async def _start(self) -> BleakScanner:
        bluez: BlueZScannerArgs = {"or_patterns": list(OR_PATTERNS)}
        if self._config.adapter is not None:
            bluez["adapter"] = self._config.adapter
        if self._config.scanning_mode == "passive":
            try:
                scanner = BleakScanner(self.on_advertisement, scanning_mode="passive", bluez=bluez)
                await scanner.start()
            except BleakBluetoothNotAvailableError:
                raise
            except BleakError as err:
                _LOGGER.warning(
                    "%s: passive scanning is not available (%s): scanning actively", self.name, err
                )
            else:
                self.scanning_mode = "passive"
                return scanner
        active: BlueZScannerArgs = {"adapter": bluez["adapter"]} if "adapter" in bluez else {}
        scanner = BleakScanner(self.on_advertisement, scanning_mode="active", bluez=active)
        await scanner.start()
        self.scanning_mode = "active"
        return scanner

    async def _until_silent(self) -> None:
        self._last_heard = self._monotonic()
        while True:
            await asyncio.sleep(SILENT_RESTART_S / 5)
            silent = self._monotonic() - self._last_heard
            if silent >= SILENT_RESTART_S:
                _LOGGER.warning(
                    "%s: no advertisement at all for %.0f s: restarting the scan", self.name, silent
                )
                return

    def on_advertisement(self, ble_device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback (plain, on the event loop): one advertisement from one address."""
        if not self._accepting:
            return
        now = self._monotonic()
        self._last_heard = now
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
                tracked.fmt, tracked.mac, adv.service_data, adv.manufacturer_data, tracked.key
            )
        except DecodeError as err:
            self._reject(tracked, err.reason, err.detail, raw)
            return
        except Exception as err:  # a decoder bug: quarantine this advertisement, keep scanning
            _LOGGER.exception("%s: decoding an advertisement of %s failed", self.name, device.id)
            self._reject(tracked, "internal_error", repr(err)[:300], raw)
            return
        if reading.counter is not None and reading.counter == tracked.last_counter:
            self._repeats.inc()
            return
        if now - tracked.last_taken_at < tracked.min_interval_s:
            self._too_soon.inc()
            return
        tracked.last_counter = reading.counter
        tracked.last_taken_at = now
        reading = reading.model_copy(update={"rssi_dbm": max(-127, min(20, adv.rssi))})
        self._sink.emit(device, "sensor.sample", reading, size=len(raw), raw=raw)

    def _reject(self, tracked: _Tracked, reason: str, detail: str, raw: bytes) -> None:
        """Quarantine what a known device sent, within its rate limit (a garbage flood is dropped, counted)."""
        verdict = tracked.device.admit(len(raw))
        if verdict == "rate_limited":
            self._rate_limited.inc()
            return
        self._sink.reject(tracked.device, reason, detail, raw)
