"""What the BLE decoders share: the sample they build and the errors they raise."""

from __future__ import annotations

from typing import Final

from pydantic import ValidationError

from drivers.errors import DecodeError
from gateway.kernel.events import SensorSample

BINDKEY_BYTES: Final = 16
BATTERY_RANGE: Final = (0.0, 100.0)


def need_key(bindkey: bytes | None, what: str) -> bytes:
    """The device's AES-128 key, or a DecodeError saying the config has none (or a wrong-sized one)."""
    if bindkey is None:
        raise DecodeError("bindkey_missing", f"{what} frame is encrypted and the device has no bindkey")
    if len(bindkey) != BINDKEY_BYTES:
        raise DecodeError("bindkey_invalid", f"a bindkey is {BINDKEY_BYTES} bytes, got {len(bindkey)}")
    return bindkey


def sample(
    source: str,
    values: dict[str, float],
    units: dict[str, str],
    *,
    faults: dict[str, str] | None = None,
    counter: int | None = None,
    battery_pct: float | None = None,
) -> SensorSample:
    """A validated ``SensorSample``. A battery outside 0-100 % is a fault of ``battery_pct`` (the other readings
    are kept); anything else the model refuses is a DecodeError."""
    faults = dict(faults or {})
    if battery_pct is not None and not BATTERY_RANGE[0] <= battery_pct <= BATTERY_RANGE[1]:
        faults["battery_pct"] = f"out of range: {battery_pct:g} % (0-100)"
        values = {k: v for k, v in values.items() if k != "battery_pct"}
        battery_pct = None
    try:
        return SensorSample(
            values=values,
            units={k: units[k] for k in values if k in units},
            faults=faults,
            source=source,
            counter=counter,
            battery_pct=battery_pct,
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DecodeError("invalid_value", f"{source}: {where}: {first['msg']}") from None
