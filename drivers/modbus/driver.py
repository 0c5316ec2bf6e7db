"""The Modbus polling driver: one TCP connection or one RTU bus, the controllers on it, their polling groups.

Reconnects are ours, not pymodbus's. pymodbus 3.16's own reconnect (``reconnect_delay`` > 0) starts only
after a connection that was once up is lost: a first ``connect()`` that fails is never retried, the delay
doubles up to ``reconnect_delay_max`` (300 s by default), a serial line is never reopened after its adapter
went away, and a peer that stops answering (half-open TCP, a hung serial gateway) keeps the transport "up".
So every client is made with ``reconnect_delay=0`` and ``retries=0``; we retry each request ourselves (on
the bus lock, with a backoff), and on a connection error, or when nothing on the link answered for
several requests in a row, we close the client and build a new one under :func:`reconnect_forever`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.base import DecodeError, DriverContext, DriverError
from drivers.devices import Device
from drivers.limits import DeviceLimits
from drivers.modbus.bus import BusLock, bus_for
from drivers.modbus.config import ModbusDeviceConfig, ModbusDriverConfig
from drivers.modbus.profile import ModbusProfile, Writable
from drivers.modbus.registers import (
    Decoded,
    ReadBlock,
    WriteRefusedError,
    decode_block,
    encode_write,
    plan_reads,
)
from drivers.profiles import get_profile
from gateway.kernel.events import SensorSample
from gateway.kernel.supervise import Backoff, reconnect_forever, tcp_reachable

_LOGGER = logging.getLogger(__name__)

Client = AsyncModbusTcpClient | AsyncModbusSerialClient

EXCEPTION_NAMES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
"""Modbus Application Protocol v1.1b, section 7: exception codes."""
CONFIG_ERROR_CODES: Final = frozenset({1, 2, 3})
"""Exceptions that will not go away by asking again: the profile does not fit this controller."""
DEAD_LINK_MIN_FAILURES: Final = 3
NO_PYMODBUS_DISCONNECT: Final = 1 << 30
"""pymodbus closes a connection after ``retries + 3`` unanswered requests in a row, counted over every unit
on it; one muted controller behind a TCP gateway would then cut off the healthy ones. Our own dead-link
rule (:data:`DEAD_LINK_MIN_FAILURES`, per link) decides instead."""


class LinkDownError(DriverError):
    """The connection or serial port is gone, or nothing on it answers: reconnect."""


class NoAnswerError(DriverError):
    """One device did not answer (timeout after the retries) or answered with a Modbus exception."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        """The Modbus exception code, None for no (valid) answer."""


class WrongAnswerError(ModbusException):
    """An answer that is not to the request just sent (an RTU reply arriving after its timeout)."""


@dataclass
class ModbusStats:
    """Counters of one driver instance (also in ``storegw_messages_dropped``)."""

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    exceptions: int = 0
    bad_responses: int = 0
    noise_bytes: int = 0
    """RTU: bytes on the line that were not part of an answer (noise, a second master, a wrong baud rate)."""
    skipped_backlogged: int = 0
    reconnects: int = 0
    writes: int = 0
    latencies_s: list[float] = field(default_factory=list)


@dataclass
class _Group:
    name: str
    interval_s: float
    blocks: list[ReadBlock]
    due: float = 0.0
    failing: bool = False
    misconfigured: bool = False
    """A Modbus exception 1-3 was reported for this group (once; it is still polled)."""


@dataclass
class _Polled:
    config: ModbusDeviceConfig
    profile: ModbusProfile
    device: Device
    groups: list[_Group]
    write_limits: dict[str, Writable]
    """The device's own narrower ranges (its config's ``writable``), by point."""


class ModbusDriver:
    """Polls every configured device's groups on one link and writes points on request."""

    def __init__(self, config: ModbusDriverConfig, ctx: DriverContext) -> None:
        self.name = config.name
        self._config = config
        self._ctx = ctx
        self._sink = ctx.sink(config.name)
        self._dropped = ctx.metrics.dropped
        self.stats = ModbusStats()
        self.keep_latencies = False
        """The benchmark turns this on to collect per-request latencies."""
        key = config.serial_port if config.transport == "rtu" else f"tcp:{config.host}:{config.port}"
        self._bus: BusLock = bus_for(str(key), config.frame_gap_s if config.transport == "rtu" else 0.0)
        self._client: Client | None = None
        self._paused = False
        self._failures_in_a_row = 0
        self._silent_units: set[int] = set()
        """Units that failed since anything on the link last answered: the link is dead when it is all of them."""
        self._outage_reported = False
        self._rx_seen = 0
        self._rx_last = 0
        self._answered = False
        self._up: Callable[[], None] | None = None
        self._crash_logged = False
        self._polled: list[_Polled] = []
        now = time.monotonic()
        for dev in config.devices:
            profile = get_profile(dev.profile, ModbusProfile)
            limits = DeviceLimits(
                rate_limit_per_s=dev.rate_limit_per_s,
                rate_burst=dev.rate_burst,
                max_payload_bytes=dev.max_payload_bytes,
                offline_after_s=dev.offline_after_s,
            )
            device = ctx.devices.add(dev.id, config.name, limits, dev.profile)
            groups = []
            for group_name, group in profile.groups.items():
                points = [p for p in profile.points if p.group == group_name]
                if not points:
                    continue
                blocks = plan_reads(
                    points,
                    max_registers=profile.max_registers_per_read,
                    max_bits=profile.max_bits_per_read,
                    max_gap=profile.effective_gap(),
                )
                interval = dev.poll_intervals.get(group_name, group.interval_s)
                groups.append(_Group(group_name, interval, blocks, now))
            self._polled.append(_Polled(dev, profile, device, groups, dev.write_limits()))
            ctx.device_writers[dev.id] = self.write
        # pymodbus logs every timeout at ERROR through its own logger; this driver reports each failure itself
        # (quietly while an outage lasts), so only pymodbus's critical messages are let through.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    @property
    def where(self) -> str:
        cfg = self._config
        return f"{cfg.host}:{cfg.port}" if cfg.transport == "tcp" else f"{cfg.serial_port}"

    async def run(self) -> None:
        """Poll until cancelled, reconnecting after any outage."""
        cfg = self._config
        probe: Callable[[], Awaitable[bool]] | None = None
        if cfg.transport == "tcp" and cfg.host is not None:
            host, port = cfg.host, cfg.port

            async def probe() -> bool:
                return await tcp_reachable(host, port)

        try:
            await reconnect_forever(
                f"Modbus {cfg.transport} {self.where} ({self.name})",
                self._session,
                _LOGGER,
                (ModbusException, DriverError, OSError),
                Backoff(base=0.2, cap=cfg.reconnect_max_s),
                probe=probe,
            )
        finally:
            self._close()

    def pause(self) -> None:
        """Shutdown: no more polls (a poll in progress still commits)."""
        self._paused = True

    def _make_client(self) -> Client:
        cfg = self._config
        if cfg.transport == "tcp":
            assert cfg.host is not None  # the config validator requires it
            return AsyncModbusTcpClient(
                cfg.host,
                port=cfg.port,
                name=self.name,
                timeout=cfg.timeout_s,
                retries=0,
                reconnect_delay=0,
            )
        assert cfg.serial_port is not None  # the config validator requires it
        return AsyncModbusSerialClient(
            cfg.serial_port,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            name=self.name,
            timeout=cfg.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace_packet,
        )

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """pymodbus hands every received buffer (what has accumulated since the request) to this hook."""
        if not sending:
            # The buffer grows until pymodbus cuts a frame (or garbage) off its front: count what is new.
            grown = len(data) - self._rx_last
            self._rx_seen += grown if grown > 0 else len(data)
            self._rx_last = len(data)
        return data

    def _count_noise(self, extra: int) -> None:
        """Bytes received (approximately: a partly consumed buffer is undercounted) beyond the answer."""
        self._rx_seen = 0
        self._rx_last = 0
        if extra > 0:
            self.stats.noise_bytes += extra
            self._dropped.labels(self.name, "line_noise").inc()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _session(self, up: Callable[[], None]) -> str:
        self._up = up
        try:
            return await self._connected_session()
        except (ModbusException, DriverError, OSError):
            raise
        except Exception as err:
            # A bug or an unexpected library error (pyserial raises ValueError for a baud rate or RS-485 setting
            # the adapter refuses): never let it stop the gateway; report, back off, try again.
            if not self._crash_logged:
                self._crash_logged = True
                _LOGGER.exception("%s: unexpected error on %s", self.name, self.where)
            reason = f"unexpected error on {self.where}: {type(err).__name__}: {err}"[:200]
            self._report_outage(reason)
            raise LinkDownError(reason) from err
        finally:
            self._up = None

    async def _connected_session(self) -> str:
        self._answered = False
        try:
            client = self._make_client()
            client.set_max_no_responses(NO_PYMODBUS_DISCONNECT)
            self._client = client
            if not await client.connect():
                self._report_outage(f"cannot connect to {self.where}")
                raise LinkDownError(f"cannot connect to {self.where}")
            _LOGGER.info("%s: connected to %s", self.name, self.where)
            return await self._poll_forever()
        finally:
            self._ctx.set_state(self.name, False, f"not connected to {self.where}")
            self._close()
            self.stats.reconnects += 1

    def _first_answer(self) -> None:
        """The link is up once something on it answered, not when the connection opened (a peer that accepts
        and then drops every connection must keep the backoff growing)."""
        self._answered = True
        self._failures_in_a_row = 0
        self._silent_units.clear()
        self._outage_reported = False
        self._crash_logged = False
        self._ctx.set_state(self.name, True)
        if self._up is not None:
            self._up()

    def _report_outage(self, reason: str) -> None:
        """Each device goes to error once per outage (not at every reconnect attempt)."""
        if self._outage_reported:
            return
        self._outage_reported = True
        for polled in self._polled:
            for group in polled.groups:
                group.failing = True
            self._sink.failed(polled.device, reason)

    async def _poll_forever(self) -> str:
        loop = asyncio.get_running_loop()
        while True:
            polled, group = min(((p, g) for p in self._polled for g in p.groups), key=lambda pg: pg[1].due)
            wait = group.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._paused:
                await asyncio.Event().wait()
            now = loop.time()
            group.due = max(group.due + group.interval_s, now)
            if self._sink.backlogged:
                self.stats.skipped_backlogged += 1
                self._dropped.labels(self.name, "backlogged").inc()
                continue
            try:
                await self._poll(polled, group)
            except LinkDownError as err:
                self._report_outage(str(err))
                return str(err)

    async def _poll(self, polled: _Polled, group: _Group) -> None:
        decoded = Decoded()
        raw = bytearray()
        for block in group.blocks:
            try:
                data = await self._read(polled.config.unit, block)
            except NoAnswerError as err:
                self._group_failed(polled, group, err)
                return
            raw += _raw_bytes(block, data)
            try:
                decode_block(block, data, decoded)
            except DecodeError as err:
                self.stats.bad_responses += 1
                group.failing = False
                self._sink.reject(polled.device, err.reason, err.detail, bytes(raw))
                return
        group.failing = False
        group.misconfigured = False
        try:
            sample = SensorSample(
                values=decoded.values,
                units=decoded.units,
                faults=decoded.faults,
                source=polled.profile.profile,
            )
        except ValidationError as err:
            self._sink.reject(polled.device, "invalid_sample", str(err)[:500], bytes(raw))
            return
        self._sink.emit(polled.device, "sensor.sample", sample, size=len(raw), raw=bytes(raw))

    def _group_failed(self, polled: _Polled, group: _Group, err: NoAnswerError) -> None:
        """The device is in error only when every one of its groups fails; an exception 1-3 (the profile
        does not fit the controller) is reported once, and the device, which answered, stays online."""
        if err.code in CONFIG_ERROR_CODES:
            group.failing = False
            if not group.misconfigured:
                group.misconfigured = True
                _LOGGER.warning("%s: %s, group %s: %s", self.name, polled.config.id, group.name, err)
                self._sink.reject(polled.device, "modbus_exception", f"{group.name}: {err}", b"")
            self._sink.reachable(polled.device)
            return
        group.failing = True
        if all(g.failing for g in polled.groups):
            self._sink.failed(polled.device, f"{group.name}: {err}")

    async def _read(self, unit: int, block: ReadBlock) -> Sequence[int] | Sequence[bool]:
        client = self._client
        readers: dict[int, Callable[..., Awaitable[Any]]] = {}
        if client is not None:
            readers = {
                1: client.read_coils,
                2: client.read_discrete_inputs,
                3: client.read_holding_registers,
                4: client.read_input_registers,
            }
        reader = readers[block.function] if client is not None else None

        async def call() -> Any:
            if reader is None:
                raise LinkDownError(f"not connected to {self.where}")
            response = await reader(block.start, count=block.count, device_id=unit)
            if not response.isError() and response.function_code != block.function:
                raise WrongAnswerError(
                    f"answer with function {response.function_code} to a request with function {block.function}"
                )
            return response

        size = 5 + ((block.count + 7) // 8 if block.function in (1, 2) else 2 * block.count)
        response = await self._exchange(
            unit, call, f"read {block.count} at {block.start} (fc {block.function})", size
        )
        if block.function in (1, 2):
            bits: Sequence[bool] = response.bits
            return bits
        registers: Sequence[int] = response.registers
        return registers

    async def _exchange(
        self,
        unit: int,
        call: Callable[[], Awaitable[Any]],
        what: str,
        answer_bytes: int,
        *,
        idempotent: bool = True,
    ) -> Any:
        """One request with retries, each on the bus lock; LinkDownError when the link itself has failed.
        ``answer_bytes`` is the RTU answer's size: what else arrives during the turn is counted as noise.
        A request that is not ``idempotent`` (a write) is not sent again after a timeout: it may have been
        carried out."""
        cfg = self._config
        last = "no response"
        retries = cfg.retries
        for attempt in range(retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(cfg.retry_backoff_s * attempt)
            client = self._client
            if client is None or not client.connected:
                raise LinkDownError(f"connection to {self.where} lost")
            async with self._bus.turn():
                self.stats.requests += 1
                self._count_noise(self._rx_seen)  # what arrived while nobody asked
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(cfg.timeout_s * 2 + 1):
                        response = await call()
                except ConnectionException as err:
                    raise LinkDownError(f"connection to {self.where} lost: {err}") from err
                except (ModbusIOException, TimeoutError) as err:
                    last = f"no response from unit {unit} within {cfg.timeout_s:g} s ({type(err).__name__})"
                    self.stats.timeouts += 1
                    self._dropped.labels(self.name, "timeout").inc()
                    if cfg.transport == "rtu":
                        await self._await_silence()
                    self._count_noise(self._rx_seen)
                    if not idempotent:
                        retries = attempt
                        last += "; outcome unknown (not retried: it may have been carried out)"
                        break
                    continue
                except ModbusException as err:
                    last = f"bad response from unit {unit}: {err}"
                    self.stats.bad_responses += 1
                    self._count_noise(self._rx_seen)
                    continue
                finally:
                    _raise_lost_cancellation()
                if self.keep_latencies:
                    self.stats.latencies_s.append(time.perf_counter() - started)
                self._count_noise(self._rx_seen - (5 if response.isError() else answer_bytes))
            self._failures_in_a_row = 0  # the device answered: the link works
            self._silent_units.clear()
            if not self._answered:
                self._first_answer()
            if response.isError():
                self.stats.exceptions += 1
                code = getattr(response, "exception_code", 0)
                name = EXCEPTION_NAMES.get(code, "unknown")
                raise NoAnswerError(f"{what}: Modbus exception {code} ({name})", code)
            return response
        self._failures_in_a_row += 1
        self._silent_units.add(unit)
        every_unit = {p.config.unit for p in self._polled}
        if self._failures_in_a_row >= DEAD_LINK_MIN_FAILURES and self._silent_units >= every_unit:
            raise LinkDownError(
                f"nothing on {self.where} answered {self._failures_in_a_row} requests in a row"
            )
        raise NoAnswerError(f"{what}: {last} after {retries} retries")

    async def _await_silence(self) -> None:
        """After an RTU timeout a late answer may still be on its way: wait (still holding the bus) until the
        line has been silent for a while, at most one more timeout, so it is not taken for the next answer."""
        cfg = self._config
        quiet = min(cfg.timeout_s, max(4 * cfg.frame_gap_s, 0.05))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout_s
        while True:
            seen = self._rx_seen
            await asyncio.sleep(quiet)
            if self._rx_seen == seen or loop.time() >= deadline:
                return

    async def write(self, device_id: str, point_name: str, value: object) -> None:
        """Write one point of one device (HQ commands, rules). WriteRefusedError for an invalid write (``value``
        is checked here, strictly, against the point's type, the profile's range and the device's own),
        DriverError when the device cannot be reached or refuses it."""
        polled = next((p for p in self._polled if p.config.id == device_id), None)
        if polled is None:
            raise WriteRefusedError("unknown_device", f"{device_id} is not a device of {self.name}")
        point = polled.profile.point(point_name)
        if point is None:
            writable = sorted(p.name for p in polled.profile.points if p.write is not None)
            raise WriteRefusedError(
                "unknown_point", f"{device_id} has no point {point_name!r}; writable: {', '.join(writable)}"
            )
        request = encode_write(point, value, polled.write_limits.get(point_name))
        client = self._client
        unit = polled.config.unit
        if client is None:
            raise DriverError(f"{device_id}: not connected to {self.where}")

        async def call() -> Any:
            if request.function == 5:
                return await client.write_coil(request.address, bool(request.values[0]), device_id=unit)
            if request.function == 6:
                return await client.write_register(request.address, request.values[0], device_id=unit)
            return await client.write_registers(request.address, list(request.values), device_id=unit)

        try:
            await self._exchange(unit, call, f"write {point_name}", 8, idempotent=False)
        except LinkDownError as err:
            raise DriverError(f"{device_id}: {err}") from err
        except NoAnswerError as err:
            raise DriverError(f"{device_id}: {err}") from err
        self.stats.writes += 1
        _LOGGER.info("%s: wrote %s = %s on %s", self.name, point_name, value, device_id)


def _raise_lost_cancellation() -> None:
    """Re-raise a cancellation that ``asyncio.wait_for`` swallowed.

    pymodbus waits for each response with ``asyncio.wait_for``; on Python 3.11, a cancel that arrives just as
    the response does is lost (CPython gh-86296, fixed in 3.12), and a fast-polling driver would then never
    stop. The task still counts the request (``Task.cancelling()``), so it is raised here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _raw_bytes(block: ReadBlock, data: Sequence[int] | Sequence[bool]) -> bytes:
    """What came off the wire for a block, for the quarantine and the payload limit."""
    if block.function in (1, 2):
        return bytes(1 if b else 0 for b in data[: block.count])
    return b"".join((int(w) & 0xFFFF).to_bytes(2, "big") for w in data[: block.count])
