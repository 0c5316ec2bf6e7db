"""Config of the serial driver (devices on RS-232/RS-485/USB adapters) and the model of serial profiles."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Annotated, ClassVar, Final, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from drivers.limits import DeviceLimits
from drivers.profiles import ProfileBase, ProfileError, check_profile, get_profile
from gateway.kernel.model import ID_PATTERN, StrictModel

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext

_LOGGER = logging.getLogger(__name__)

Parity = Literal["N", "E", "O", "M", "S"]


def _stopbits(value: float) -> float:
    if value not in (1, 1.5, 2):
        raise ValueError("stop bits are 1, 1.5 or 2")
    return value


StopBits = Annotated[float, AfterValidator(_stopbits)]
_HEX = r"^([0-9A-Fa-f]{2})*$"


class LineFraming(StrictModel):
    kind: Literal["line"] = Field(description="Lines ended by CR, LF or CRLF.")
    max_line: int = Field(default=256, ge=8, le=4096, description="Longer lines are quarantined.")


class StxEtxFraming(StrictModel):
    kind: Literal["stx_etx"] = Field(description="STX payload ETX [BCC], no DLE escaping.")
    max_payload: int = Field(default=256, ge=1, le=4096, description="Longer frames are quarantined.")
    bcc: bool = Field(default=False, description="A BCC byte (XOR of payload and ETX) follows ETX.")


class LengthCrcFraming(StrictModel):
    kind: Literal["length_crc"] = Field(description="A length field, the body, then a CRC-16.")
    crc: Literal["modbus", "mcrf4xx"] = Field(description="CRC-16/MODBUS or CRC-16/MCRF4XX.")
    header: Annotated[str, Field(pattern=_HEX, max_length=16)] = Field(
        default="", description="Sync bytes every frame starts with, as hex (may be empty)."
    )
    len_offset: int = Field(default=0, ge=0, le=16, description="Offset of the length field in the frame.")
    len_width: Literal[1, 2] = Field(default=1, description="Bytes in the length field.")
    len_order: Literal["big", "little"] = Field(default="big", description="Byte order of the length field.")
    len_adjust: int = Field(
        default=0,
        ge=-16,
        le=16,
        description="Whole frame size = length field + this (1 when Len excludes itself).",
    )
    crc_order: Literal["big", "little"] = Field(default="little", description="Byte order of the CRC.")
    min_frame: int = Field(default=4, ge=3, le=65_537, description="Smallest valid frame, in bytes.")
    max_frame: int = Field(default=256, ge=4, le=65_537, description="Largest valid frame, in bytes.")


class FixedFraming(StrictModel):
    kind: Literal["fixed"] = Field(description="Frames of one fixed size.")
    size: int = Field(ge=1, le=4096, description="Bytes per frame, header included.")
    header: Annotated[str, Field(pattern=_HEX, max_length=16)] = Field(
        default="", description="Sync bytes every frame starts with, as hex (may be empty: no resync)."
    )


Framing = Annotated[
    LineFraming | StxEtxFraming | LengthCrcFraming | FixedFraming, Field(discriminator="kind")
]


class ScaleLine(StrictModel):
    pattern: str = Field(
        max_length=500, description="Regex for a whole line: a 'weight' group, optional 'unit' and 'status'."
    )
    default_unit: Literal["kg", "g", "lb", "oz"] = Field(
        default="kg", description="Unit when the line has none."
    )
    stable: list[Annotated[str, Field(max_length=16)]] = Field(
        default_factory=list, max_length=16, description="'status' values that mean a stable reading."
    )
    overload: list[Annotated[str, Field(max_length=16)]] = Field(
        default_factory=list, max_length=16, description="'status' values that mean overload (quarantined)."
    )
    only_stable: bool = Field(default=True, description="Emit only stable readings.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "weight" not in compiled.groupindex:
            raise ValueError("the pattern needs a named group 'weight'")
        return value


class SerialProfile(ProfileBase):
    """A kind of serial device: line settings, framing, and which codec reads the frames."""

    family: Literal["serial"] = "serial"
    codec: Literal["chafon", "barcode", "scale"] = Field(
        description="chafon: UHF RFID reader polled for inventories; barcode/scale: passive, one reading per frame."
    )
    framing: Framing
    baudrate: int = Field(default=9600, ge=50, le=4_000_000, description="Default line speed.")
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Parity = "N"
    stopbits: StopBits = 1
    poll_interval_s: float | None = Field(
        default=None, gt=0, le=3600, description="Polled devices: default time between polls."
    )
    response_timeout_s: float = Field(default=1.0, gt=0, le=60, description="Polled devices: answer within.")
    scale: ScaleLine | None = Field(default=None, description="codec scale: how a line reads.")
    rate_limit_per_s: float | None = Field(
        default=None, gt=0, le=100_000, description="Default device limit."
    )
    rate_burst: int | None = Field(default=None, ge=1, le=1_000_000, description="Default device burst.")

    @model_validator(mode="after")
    def _codec_fits(self) -> SerialProfile:
        if self.codec == "chafon" and (
            not isinstance(self.framing, LengthCrcFraming) or self.framing.crc != "mcrf4xx"
        ):
            raise ValueError("codec chafon needs framing length_crc with crc mcrf4xx")
        if self.codec == "chafon" and self.poll_interval_s is None:
            raise ValueError("codec chafon is polled: give poll_interval_s")
        if self.codec == "scale" and self.scale is None:
            raise ValueError("codec scale needs 'scale' (the line format)")
        return self


OLD_ID_KEY: Final = "device_id"
"""The serial driver's old name of a device's ``id`` (every other device list says ``id``); still read."""


class SerialDevice(DeviceLimits):
    """One device on its own serial port."""

    DEPRECATED_KEYS: ClassVar[dict[str, str]] = {OLD_ID_KEY: "id"}
    """Old key -> new key; the config loader reads the old one with a warning that names file:line."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Device id used in events.")
    port: str = Field(
        min_length=1,
        max_length=500,
        description="Serial port; use the stable /dev/serial/by-id/... path, it survives replugging.",
    )
    profile: str = Field(description="A serial profile in firmware_configs/profiles (codec and framing).")
    baudrate: int | None = Field(default=None, ge=50, le=4_000_000, description="Overrides the profile's.")
    bytesize: Literal[5, 6, 7, 8] | None = Field(default=None, description="Overrides the profile's.")
    parity: Parity | None = Field(default=None, description="Overrides the profile's.")
    stopbits: StopBits | None = Field(default=None, description="Overrides the profile's.")
    poll_interval_s: float | None = Field(default=None, gt=0, le=3600, description="Overrides the profile's.")
    response_timeout_s: float | None = Field(
        default=None, gt=0, le=60, description="Overrides the profile's."
    )
    error_after_timeouts: int = Field(
        default=3, ge=1, le=1000, description="Polled devices: consecutive timeouts before status 'error'."
    )
    window_s: float = Field(default=5.0, gt=0, le=3600, description="RFID: one rfid.inventory per window.")
    depart_after_s: float = Field(
        default=30.0, gt=0, le=86_400, description="RFID: unseen this long: departed."
    )
    max_tags: int = Field(default=5000, ge=1, le=5000, description="RFID: tags per window (more: truncated).")

    @model_validator(mode="before")
    @classmethod
    def _old_id_key(cls, data: object) -> object:
        """``device_id`` is read as ``id`` (with a warning); both at once is an error. The config loader
        renames it itself, naming file:line; this covers configs built in code."""
        if not isinstance(data, dict) or OLD_ID_KEY not in data:
            return data
        if "id" in data:
            raise ValueError(f"'{OLD_ID_KEY}' is the old name of 'id', which is given too: keep only 'id'")
        renamed = {("id" if k == OLD_ID_KEY else k): v for k, v in data.items()}
        _LOGGER.warning("serial device %r: '%s' is deprecated: rename it to 'id'", renamed["id"], OLD_ID_KEY)
        return renamed

    @model_validator(mode="before")
    @classmethod
    def _profile_limits(cls, data: object) -> object:
        """The profile's rate limit and burst are the device's defaults."""
        if not isinstance(data, dict) or not isinstance(data.get("profile"), str):
            return data
        try:
            profile = get_profile(data["profile"], SerialProfile)
        except ProfileError:
            return data  # reported by the field validator, with its hint
        filled = dict(data)
        if profile.rate_limit_per_s is not None:
            filled.setdefault("rate_limit_per_s", profile.rate_limit_per_s)
        if profile.rate_burst is not None:
            filled.setdefault("rate_burst", profile.rate_burst)
        return filled

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return check_profile(value, SerialProfile)

    @property
    def profile_model(self) -> SerialProfile:
        return get_profile(self.profile, SerialProfile)


class SerialDriverConfig(StrictModel):
    """Reads devices on serial ports: RFID readers (polled), barcode scanners and scales (passive)."""

    type: Literal["serial"] = Field(
        default="serial",
        description="Driver family; selects this driver's settings. Always write it in YAML.",
    )
    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        default="serial", description="Driver instance name, used in metrics and logs."
    )
    devices: list[SerialDevice] = Field(min_length=1, max_length=64, description="One entry per serial port.")
    reopen_backoff_cap_s: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait between attempts to reopen a vanished port."
    )

    @model_validator(mode="after")
    def _unique(self) -> SerialDriverConfig:
        for what, values in (
            ("id", [d.id for d in self.devices]),
            ("port", [d.port for d in self.devices]),
        ):
            seen = {v for v in values if values.count(v) > 1}
            if seen:
                raise ValueError(f"each {what} once: {', '.join(sorted(seen))} repeated")
        return self

    def create(self, ctx: DriverContext) -> Driver:
        from drivers.serial.driver import SerialDriver

        return SerialDriver(self, ctx)
