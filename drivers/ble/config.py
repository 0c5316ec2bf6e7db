"""Config of the BLE driver: one shared scanner, and the sensors it listens to, matched by MAC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from drivers.ble.formats import MAC_PATTERN, BleFormat
from drivers.limits import DeviceLimits
from drivers.profiles import ProfileBase, check_profile, get_profile
from gateway.kernel.model import ID_PATTERN, StrictModel

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext


class BleProfile(ProfileBase):
    """A BLE sensor profile: which advertisement format its devices send."""

    family: Literal["ble"] = Field(default="ble", description="Always 'ble'.")
    format: BleFormat = Field(description="Advertisement format the decoder reads.")
    encryption: Literal["none", "optional"] = Field(
        default="none",
        description="'optional': devices may be given a bindkey (the format can be encrypted).",
    )


class BleDeviceConfig(DeviceLimits):
    """One BLE sensor."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Device id used in events.")
    mac: Annotated[str, Field(pattern=MAC_PATTERN)] = Field(
        description="The sensor's Bluetooth address, 'A4:C1:38:8D:18:B2'."
    )
    profile: str = Field(
        description="A BLE profile in firmware_configs/profiles (bthome-v2, ruuvi-rawv2, ...)."
    )
    bindkey: SecretStr | None = Field(
        default=None,
        description="AES-128 key, 32 hex digits, for encrypted frames. Write {env: NAME} or {file: PATH}. With a"
        " bindkey, unencrypted frames from this MAC are refused.",
    )
    reed_switch: bool = Field(
        default=False,
        description="A reed switch (door contact) is wired to the sensor: report it as 'opening' (pvvx only).",
    )
    min_interval_s: float = Field(
        default=0,
        ge=0,
        le=86_400,
        description="Keep at most one reading per this many seconds (0: every new one).",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return check_profile(value, BleProfile)

    @field_validator("mac")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("bindkey")
    @classmethod
    def _sixteen_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            if len(text) != 32 or any(c not in "0123456789abcdefABCDEF" for c in text):
                raise ValueError("a bindkey is 32 hex digits (16 bytes)")
        return value

    @model_validator(mode="after")
    def _key_fits_profile(self) -> BleDeviceConfig:
        profile = get_profile(self.profile, BleProfile)
        if self.bindkey is not None and profile.encryption == "none":
            raise ValueError(f"profile {self.profile!r} has no encrypted format: remove the bindkey")
        if self.reed_switch and profile.format != "pvvx":
            raise ValueError(f"profile {self.profile!r} reports no reed switch input: remove reed_switch")
        return self

    @property
    def key(self) -> bytes | None:
        return None if self.bindkey is None else bytes.fromhex(self.bindkey.get_secret_value())


class BleDriverConfig(StrictModel):
    """Listens to BLE advertisements with one scanner (passive where the adapter allows) and decodes them."""

    type: Literal["ble"] = Field(
        default="ble", description="Driver family; selects this driver's settings. Always write it in YAML."
    )
    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        default="ble", description="Driver instance name, used in metrics and logs."
    )
    adapter: Annotated[str, Field(pattern=r"^hci[0-9]{1,2}$")] | None = Field(
        default=None, description="BlueZ adapter, for example 'hci0'; default: the first powered one."
    )
    scanning_mode: Literal["passive", "active"] = Field(
        default="passive",
        description="'passive' only listens (no scan requests; needs BlueZ >= 5.56 with --experimental); if"
        " the adapter cannot, the driver falls back to active and logs it.",
    )
    repeat_window_s: float = Field(
        default=60,
        gt=0,
        le=3600,
        description="An advertisement identical to the last one taken from a device is skipped for this long.",
    )
    retry_max_s: float = Field(
        default=300, ge=1, le=3600, description="Longest wait between attempts to start the scanner."
    )
    devices: list[BleDeviceConfig] = Field(min_length=1, description="The sensors, matched by MAC.")

    @model_validator(mode="after")
    def _unique(self) -> BleDriverConfig:
        for label, keys in (("id", [d.id for d in self.devices]), ("mac", [d.mac for d in self.devices])):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                raise ValueError(f"devices: duplicate {label}(s) {', '.join(dupes)}")
        return self

    def create(self, ctx: DriverContext) -> Driver:
        from drivers.ble.driver import BleDriver

        return BleDriver(self, ctx)
