"""A fridge controller speaking Modbus: a pymodbus TCP server, or RTU on a pseudo-terminal pair.

:class:`FridgeModel` is pure: a thermostat (compressor on above setpoint + differential, off at the
setpoint), heat leaking in from the room (six times faster with the door open), defrost cycles (compressor
off, heater on) and a compressor failure (no more cooling: the temperature climbs). :class:`FridgeServer`
serves one model per unit id with the register map of a Modbus profile (``dixell-xr`` by default): the
metrics the model knows (``air_temperature``, ``evaporator_temperature``, ``setpoint``, ``compressor_on``,
``defrost_active``, ``door_open``, alarm bits) are kept up to date, the others hold 0. A client's write to
``setpoint`` changes the model; writing 1 to ``defrost_start`` starts a defrost. Time runs ``speed`` times
faster than the wall clock, so a night passes in a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tty
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.profile import ModbusProfile, Point
from drivers.modbus.registers import Decoded, bytes_to_registers, decode_point, encode_value
from drivers.profiles import get_profile

MAX_STEP_S: Final = 10.0
"""The longest simulated time one model step covers."""
TICK_S: Final = 0.05
"""Wall-clock seconds between two model steps and register refreshes."""


@dataclass
class FridgeModel:
    """One cabinet's temperatures and states; ``step(dt)`` advances it by ``dt`` simulated seconds."""

    setpoint: float = 3.0
    differential: float = 2.0
    ambient: float = 24.0
    air: float = 4.0
    evaporator: float = -4.0
    compressor_on: bool = False
    door_open: bool = False
    failed: bool = False
    evaporator_fitted: bool = True
    defrost_left_s: float = 0.0
    defrost_duration_s: float = 1200.0
    leak_per_s: float = 0.0005
    """Heat leak: degC per second per degC of difference with the room (door shut)."""
    cooling_per_s: float = 0.012
    heating_per_s: float = 0.004
    high_alarm_delta: float = 6.0
    low_alarm_delta: float = 5.0
    alarm_delay_s: float = 900.0
    """A temperature alarm sets only after this long beyond its limit (controllers' alarm delay, e.g. 15 min),
    so a door opened for a delivery does not alarm; it clears as soon as the temperature is back."""
    post_defrost_delay_s: float = 3600.0
    """No high-temperature alarm for this long after a defrost ends (controllers' post-defrost delay)."""
    high_for_s: float = 0.0
    low_for_s: float = 0.0
    since_defrost_s: float = 1e9

    @property
    def defrosting(self) -> bool:
        return self.defrost_left_s > 0

    def start_defrost(self) -> None:
        self.defrost_left_s = self.defrost_duration_s

    def step(self, dt: float) -> None:
        """Advance ``dt`` simulated seconds, in steps of at most :data:`MAX_STEP_S` (a stalled event loop under a
        compressed clock hands over hours at once; one Euler step that long would overshoot wildly)."""
        while dt > MAX_STEP_S:
            self._step(MAX_STEP_S)
            dt -= MAX_STEP_S
        self._step(dt)

    def _step(self, dt: float) -> None:
        self._physics(dt)
        self.since_defrost_s = 0.0 if self.defrosting else self.since_defrost_s + dt
        recovering = self.since_defrost_s < self.post_defrost_delay_s
        too_warm = not recovering and self.air > self.setpoint + self.high_alarm_delta
        self.high_for_s = self.high_for_s + dt if too_warm else 0.0
        self.low_for_s = self.low_for_s + dt if self.air < self.setpoint - self.low_alarm_delta else 0.0

    def _physics(self, dt: float) -> None:
        leak = self.leak_per_s * (6.0 if self.door_open else 1.0) * (self.ambient - self.air)
        if self.defrosting:
            self.compressor_on = False
            self.defrost_left_s = max(0.0, self.defrost_left_s - dt)
            self.air += (leak + self.heating_per_s) * dt
            self.evaporator = min(12.0, self.evaporator + 0.02 * dt)
            return
        if self.air > self.setpoint + self.differential:
            self.compressor_on = True
        elif self.air <= self.setpoint:
            self.compressor_on = False
        cooling = self.cooling_per_s if self.compressor_on and not self.failed else 0.0
        self.air += (leak - cooling) * dt
        target = self.air - 8.0 if cooling else self.air
        self.evaporator += (target - self.evaporator) * min(1.0, 0.01 * dt)

    def metrics(self) -> dict[str, float | None]:
        """Metric -> value (None: a probe that is not fitted, served as the profile's sentinel)."""
        return {
            "air_temperature": self.air,
            "evaporator_temperature": self.evaporator if self.evaporator_fitted else None,
            "setpoint": self.setpoint,
            "compressor_on": float(self.compressor_on),
            "defrost_active": float(self.defrosting),
            "fan_on": float(not self.door_open and not self.defrosting),
            "door_open": float(self.door_open),
            "high_temp_alarm": float(self.high_for_s >= self.alarm_delay_s),
            "low_temp_alarm": float(self.low_for_s >= self.alarm_delay_s),
            "probe2_fault": float(not self.evaporator_fitted),
            "defrost_start": 0.0,
        }


def _span(points: Sequence[Point]) -> tuple[int, int]:
    start = min(p.address for p in points)
    return start, max(p.address + p.width for p in points) - start


def sim_device(unit: int, profile: ModbusProfile) -> SimDevice:
    """A pymodbus device with separate coil, input, holding and input-register blocks covering the map."""
    blocks: list[list[SimData]] = []
    for function in (1, 2, 3, 4):
        points = [p for p in profile.points if p.function == function]
        if not points:
            blocks.append(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)]
                if function < 3
                else [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)]
            )
            continue
        start, count = _span(points)
        if function < 3:
            blocks.append([SimData(start, count=count, values=False, datatype=DataType.BITS)])
        else:
            blocks.append([SimData(start, count=count, values=0, datatype=DataType.REGISTERS)])
    return SimDevice(unit, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]))


def registers_for(point: Point, metrics: dict[str, float | None]) -> list[int] | None:
    """What ``point`` holds for these metrics (None: nothing the model knows, leave it)."""
    if point.bits:
        if not any(b.name in metrics for b in point.bits):
            return None
        raw = 0
        for bit in point.bits:
            on = bool(metrics.get(bit.name) or 0.0) != bit.invert
            raw |= int(on) << bit.bit
        return _raw_registers(point, raw)
    if point.name not in metrics:
        return None
    value = metrics[point.name]
    if value is None:
        if not point.sentinels:
            return None
        raw = min(point.sentinels)
        return _raw_registers(point, raw)
    if point.type != "float32" and point.type != "bool":
        value = round((value - point.offset) / point.scale) * point.scale + point.offset
    return list(encode_value(point, value))


def _raw_registers(point: Point, raw: int) -> list[int]:
    """The registers holding the unsigned ``raw`` (a bit field, a sentinel), in the point's byte and word order."""
    return bytes_to_registers(raw.to_bytes(2 * point.width, "big"), point.byte_order, point.word_order)


class PtyLine:
    """An RS-485 line between two pseudo-terminals: the server opens one end, the driver the other.

    Bytes are copied between the two pty masters on the event loop; ``cut`` drops them (an unplugged
    cable) and ``inject`` puts bytes on the driver's side (noise on the line)."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        server_master, server_slave = os.openpty()
        driver_master, driver_slave = os.openpty()
        self._fds = [server_master, server_slave, driver_master, driver_slave]
        for fd in self._fds:
            tty.setraw(fd)
        self._server_master = server_master
        self._driver_master = driver_master
        self.server_path = os.ttyname(server_slave)
        self.driver_path = os.ttyname(driver_slave)
        self.cut = False
        self.bytes_to_driver = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._server_master, self._pump, self._server_master, self._driver_master)
        self._loop.add_reader(self._driver_master, self._pump, self._driver_master, self._server_master)

    def _pump(self, source: int, target: int) -> None:
        try:
            data = os.read(source, 4096)
        except OSError:
            return
        if self.cut:
            return
        if target == self._driver_master:
            self.bytes_to_driver += len(data)
        with contextlib.suppress(OSError):
            os.write(target, data)

    def inject(self, data: bytes) -> None:
        """Noise: bytes the driver receives as if from the line."""
        os.write(self._driver_master, data)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._server_master)
            self._loop.remove_reader(self._driver_master)
            self._loop = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class FridgeServer:
    """One fridge model per unit id, served over Modbus TCP or RTU with a profile's register map."""

    def __init__(
        self,
        units: Sequence[int] = (1,),
        *,
        profile: str = "dixell-xr",
        speed: float = 1.0,
        models: dict[int, FridgeModel] | None = None,
    ) -> None:
        self.profile = get_profile(profile, ModbusProfile)
        self.units = list(units)
        self.speed = speed
        self.models = models or {unit: FridgeModel() for unit in self.units}
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self.line: PtyLine | None = None
        self.muted: set[int] = set()
        """Units that do not answer (a controller that hangs): their responses are dropped."""
        self._tcp = True
        self._tick: asyncio.Task[None] | None = None
        self._setpoint = self.profile.point("setpoint")
        self._defrost = self.profile.point("defrost_start")
        for model in self.models.values():
            model.step(0.0)

    def _devices(self) -> list[SimDevice]:
        return [sim_device(unit, self.profile) for unit in self.units]

    def _trace(self, sending: bool, packet: bytes) -> bytes:
        """Drop the responses of muted units (an empty write sends nothing)."""
        if sending and packet:
            unit = packet[6] if self._tcp and len(packet) > 6 else packet[0]
            if unit in self.muted:
                return b""
        return packet

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 5020) -> None:
        self._tcp = True
        self.server = ModbusTcpServer(self._devices(), address=(host, port), trace_packet=self._trace)
        await self._serve()

    async def start_rtu(self, baudrate: int = 19200, line: PtyLine | None = None) -> PtyLine:
        """Serve on a new pty line (or ``line``); the driver opens ``line.driver_path``."""
        self.line = line or PtyLine()
        self.line.start()
        self._tcp = False
        self.server = ModbusSerialServer(
            self._devices(), port=self.line.server_path, baudrate=baudrate, trace_packet=self._trace
        )
        await self._serve()
        return self.line

    async def _serve(self) -> None:
        assert self.server is not None  # set by the callers
        await self.server.serve_forever(background=True)
        for unit, model in self.models.items():
            await self._publish(unit, model)
        self._tick = asyncio.create_task(self._run(), name="fridge-tick")

    async def stop(self, close_line: bool = True) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None
        if close_line and self.line is not None:
            self.line.close()
            self.line = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            await self._refresh((now - last) * self.speed)
            last = now

    async def read_point(self, unit: int, name: str) -> float | None:
        """A point's value as the server's datastore holds it (what a client would read)."""
        point = self.profile.point(name)
        if point is None or self.server is None:
            return None
        data = await self.server.async_getValues(unit, point.function, point.address, point.width)
        if point.is_bit:
            return 1.0 if data[0] else 0.0
        decoded = Decoded()
        decode_point(point, [int(v) for v in data], decoded)
        return decoded.values.get(name)

    async def _refresh(self, dt: float) -> None:
        server = self.server
        if server is None:
            return
        for unit, model in self.models.items():
            if self._setpoint is not None:
                written = await self.read_point(unit, "setpoint")
                if written is not None and abs(written - model.setpoint) > 1e-9:
                    model.setpoint = written
            if self._defrost is not None and await self.read_point(unit, "defrost_start"):
                model.start_defrost()
            model.step(dt)
            await self._publish(unit, model)

    async def _publish(self, unit: int, model: FridgeModel) -> None:
        """Put the model's state into the unit's registers."""
        assert self.server is not None  # only called while serving
        metrics = model.metrics()
        for point in self.profile.points:
            words = registers_for(point, metrics)
            if words is None:
                continue
            values: list[int] | list[bool] = [bool(w) for w in words] if point.is_bit else words
            await self.server.async_setValues(unit, point.function, point.address, values)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate fridge", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--transport", choices=("tcp", "rtu"), default="tcp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5020)
    parser.add_argument("--baudrate", type=int, default=19200)
    parser.add_argument("--profile", default="dixell-xr")
    parser.add_argument("--units", default="1", help="Comma-separated unit ids, e.g. 1,2,3.")
    parser.add_argument("--speed", type=float, default=1.0, help="Simulated seconds per wall-clock second.")
    parser.add_argument("--setpoint", type=float, default=3.0)
    parser.add_argument(
        "--fail-after", type=float, default=None, help="Compressor fails after S simulated s."
    )
    parser.add_argument("--door-every", type=float, default=None, help="Open a door every S simulated s.")
    parser.add_argument("--door-for", type=float, default=60.0, help="How long the door stays open.")
    parser.add_argument("--defrost-every", type=float, default=None, help="Defrost every S simulated s.")
    parser.add_argument("--duration", type=float, default=None, help="Stop after S wall-clock seconds.")
    return parser.parse_args(list(argv))


async def _scenario(server: FridgeServer, args: argparse.Namespace) -> None:
    """Door openings, defrost cycles and the failure, on the simulated clock."""
    clock = 0.0
    next_door = args.door_every
    next_defrost = args.defrost_every
    door_closes: float | None = None
    while True:
        await asyncio.sleep(TICK_S)
        clock += TICK_S * server.speed
        for unit, model in server.models.items():
            if args.fail_after is not None and clock >= args.fail_after and not model.failed:
                model.failed = True
                print(f"t={clock:.0f}s: unit {unit}: compressor failed", flush=True)
            if next_door is not None and clock >= next_door:
                model.door_open = True
                door_closes = clock + args.door_for
            if door_closes is not None and clock >= door_closes:
                model.door_open = False
            if next_defrost is not None and clock >= next_defrost:
                model.start_defrost()
        if next_door is not None and clock >= next_door:
            next_door += args.door_every
        if door_closes is not None and clock >= door_closes:
            door_closes = None
        if next_defrost is not None and clock >= next_defrost:
            next_defrost += args.defrost_every


async def _main(args: argparse.Namespace) -> None:
    units = [int(u) for u in args.units.split(",") if u.strip()]
    server = FridgeServer(
        units,
        profile=args.profile,
        speed=args.speed,
        models={u: FridgeModel(setpoint=args.setpoint) for u in units},
    )
    if args.transport == "tcp":
        await server.start_tcp(args.host, args.port)
        print(f"fridge ({args.profile}) units {units} on modbus tcp {args.host}:{args.port}", flush=True)
    else:
        line = await server.start_rtu(args.baudrate)
        print(
            f"fridge ({args.profile}) units {units} on modbus rtu {args.baudrate} baud:"
            f" point the driver's serial_port at {line.driver_path}",
            flush=True,
        )
    scenario = asyncio.create_task(_scenario(server, args), name="fridge-scenario")
    try:
        if args.duration is None:
            await asyncio.Event().wait()
        await asyncio.sleep(args.duration)
    finally:
        scenario.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scenario
        await server.stop()


def main(argv: Sequence[str]) -> int:
    args = _parse(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0
