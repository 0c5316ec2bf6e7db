"""Config of the Modbus driver: one TCP connection or one RTU bus, and the controllers on it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from drivers.limits import DeviceLimits
from drivers.modbus.profile import MetricName, ModbusProfile, Writable
from drivers.profiles import check_profile, get_profile
from gateway.kernel.model import ID_PATTERN, StrictModel

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext


Limit = Annotated[float, Field(strict=True)]
"""A YAML number (not "5", not true), like the values HQ may write."""


class WriteLimits(StrictModel):
    """One device's own range for a writable point: inside the profile's range, never wider."""

    min: Limit | None = Field(
        default=None, description="Lowest value this device accepts; at least the profile's min."
    )
    max: Limit | None = Field(
        default=None, description="Highest value this device accepts; at most the profile's max."
    )


class ModbusDeviceConfig(DeviceLimits):
    """One controller on the bus or behind the TCP gateway."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Device id used in events.")
    unit: int = Field(ge=0, le=255, description="Modbus unit id (slave address; 1-247 on RTU).")
    profile: str = Field(description="Register map profile, e.g. 'dixell-xr'.")
    poll_intervals: dict[str, Annotated[float, Field(gt=0, le=86_400)]] = Field(
        default_factory=dict, description="Per-group interval overrides in seconds, e.g. {temperatures: 30}."
    )
    rate_limit_per_s: float = Field(
        default=5, gt=0, le=100_000, description="Samples per second accepted from this device."
    )
    rate_burst: int = Field(default=20, ge=1, le=1_000_000, description="Samples accepted in a burst.")
    writable: dict[MetricName, WriteLimits] = Field(
        default_factory=dict,
        description="Per writable point, a narrower range than the profile's for this device,"
        " e.g. {setpoint: {min: 2, max: 6}}.",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return check_profile(value, ModbusProfile)

    @model_validator(mode="after")
    def _fits_profile(self) -> ModbusDeviceConfig:
        """Every group and point named here is in the profile, and every range lies inside the profile's:
        all the problems at once, each at its own key."""
        profile = get_profile(self.profile, ModbusProfile)
        problems = list(self._unknown_groups(profile)) + list(self._wider_writes(profile))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def _unknown_groups(self, profile: ModbusProfile) -> Iterator[InitErrorDetails]:
        unknown = sorted(set(self.poll_intervals) - set(profile.groups))
        if unknown:
            yield _problem(
                ("poll_intervals",),
                self.poll_intervals,
                f"poll_intervals: no group {', '.join(unknown)} in profile {self.profile}"
                f" (groups: {', '.join(profile.groups)})",
            )

    def _wider_writes(self, profile: ModbusProfile) -> Iterator[InitErrorDetails]:
        names = ", ".join(p.name for p in profile.points if p.write is not None) or "none"
        for name, narrow in self.writable.items():
            where = ("writable", name)
            given = narrow.model_dump(exclude_none=True)
            point = profile.point(name)
            if point is None or point.write is None:
                what = "no point" if point is None else "no writable point"
                yield _problem(where, given, f"{what} {name} in profile {self.profile} (writable: {names})")
                continue
            if not given:
                yield _problem(where, given, "give min, max or both")
                continue
            lo, hi = point.write.min, point.write.max
            outside = False
            for key, value in given.items():
                if not lo <= value <= hi:
                    outside = True
                    yield _problem(
                        (*where, key),
                        value,
                        f"outside {lo:g}..{hi:g}, the range profile {self.profile} gives {name}:"
                        " a device may only narrow it",
                    )
            if not outside and narrow.min is not None and narrow.max is not None and narrow.min > narrow.max:
                yield _problem(where, given, "min is above max")

    def write_limits(self) -> dict[str, Writable]:
        """This device's range of each point it narrows (the profile's bound where it gives only one)."""
        profile = get_profile(self.profile, ModbusProfile)
        limits: dict[str, Writable] = {}
        for name, narrow in self.writable.items():
            point = profile.point(name)
            assert point is not None  # checked by _fits_profile
            assert point.write is not None
            limits[name] = Writable(
                min=point.write.min if narrow.min is None else narrow.min,
                max=point.write.max if narrow.max is None else narrow.max,
            )
        return limits


def _problem(loc: tuple[str, ...], given: Any, message: str) -> InitErrorDetails:
    """A validation error at ``loc`` under the device (the config loader turns it into file:line)."""
    return {"type": PydanticCustomError("profile_mismatch", message), "loc": loc, "input": given}


class ModbusDriverConfig(StrictModel):
    """Polls Modbus controllers over TCP or one RTU (RS-485) bus; one driver instance per bus."""

    type: Literal["modbus"] = Field(
        default="modbus",
        description="Driver family; selects this driver's settings. Always write it in YAML.",
    )
    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        default="modbus", description="Driver instance name, used in metrics and logs."
    )
    transport: Literal["tcp", "rtu"] = Field(description="'tcp' (Modbus TCP) or 'rtu' (serial RS-485).")
    host: str | None = Field(default=None, max_length=253, description="TCP: controller or gateway host.")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port.")
    serial_port: str | None = Field(
        default=None, max_length=500, description="RTU: a stable path, e.g. /dev/serial/by-id/usb-FTDI-...."
    )
    baudrate: int = Field(default=9600, ge=300, le=1_000_000, description="RTU baud rate.")
    parity: Literal["N", "E", "O"] = Field(default="N", description="RTU parity.")
    bytesize: Literal[7, 8] = Field(default=8, description="RTU data bits.")
    stopbits: Literal[1, 2] = Field(default=1, description="RTU stop bits.")
    inter_frame_gap_s: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="RTU silence between frames; default 3.5 character times (1.75 ms above 19200 baud).",
    )
    timeout_s: float = Field(default=1.0, gt=0, le=30, description="Response timeout per request.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries after a timeout before giving up.")
    retry_backoff_s: float = Field(default=0.1, ge=0, le=10, description="Wait before each retry.")
    reconnect_max_s: float = Field(default=30, gt=0, le=3600, description="Longest reconnect backoff.")
    devices: list[ModbusDeviceConfig] = Field(min_length=1, max_length=247, description="Controllers.")

    @model_validator(mode="after")
    def _transport_fields(self) -> ModbusDriverConfig:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport 'tcp' needs 'host'")
        if self.transport == "rtu":
            if not self.serial_port:
                raise ValueError("transport 'rtu' needs 'serial_port'")
            bad = [d.id for d in self.devices if not 1 <= d.unit <= 247]
            if bad:
                raise ValueError(f"RTU unit ids are 1-247: {', '.join(bad)}")
        for label, ids in (
            ("device ids", [d.id for d in self.devices]),
            ("units", [str(d.unit) for d in self.devices]),
        ):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"duplicate {label}: {', '.join(dupes)}")
        return self

    @property
    def frame_gap_s(self) -> float:
        """Modbus over Serial Line v1.02, 2.5.1.1: 3.5 character times, fixed at 1.75 ms above 19200 baud."""
        if self.inter_frame_gap_s is not None:
            return self.inter_frame_gap_s
        if self.baudrate > 19200:
            return 0.00175
        bits_per_char = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return 3.5 * bits_per_char / self.baudrate

    def create(self, ctx: DriverContext) -> Driver:
        from drivers.modbus.driver import ModbusDriver

        return ModbusDriver(self, ctx)
