"""Scenario files (``firmware_configs/scenarios/*.yaml``): which simulated devices a store has, and a timeline.

A scenario is data, not code: testers write new ones without touching Python. ``store-gateway demo --scenario
NAME`` runs one (see :mod:`simulators.scenario`); ``tests/simulators/test_scenarios.py`` runs each at a fast time scale.
A scenario file is read like the store config (:mod:`gateway.kernel.loader`): every problem at once, each with
``file:line:col``, the key path and a hint.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from gateway.kernel.loader import DocumentError, DocumentKind, load_document
from gateway.kernel.model import Identifier, StrictModel

MAX_SCENARIO_BYTES: Final = 1024 * 1024
SCENARIO: Final = DocumentKind("scenario", "firmware_configs/scenarios/normal-day.yaml", MAX_SCENARIO_BYTES)


class ScenarioError(DocumentError, ValueError):
    """A scenario file that cannot be used; ``issues`` lists every problem, in file order, one line each.

    Also a ValueError, as the validation error it stands for is: callers that catch ValueError still do."""

    noun = "scenario"


class Tills(StrictModel):
    count: int = Field(default=3, ge=0, le=50, description="POS terminals pos-01, pos-02...")
    rate_per_s: float = Field(
        default=1.0, gt=0, le=1000, description="Sales and returns per second per till."
    )
    return_ratio: float = Field(default=0.1, ge=0, le=1)
    rate_limit_per_s: float | None = Field(
        default=None,
        gt=0,
        description="The tills' rate limit in the gateway config (default: the profile's).",
    )
    rate_burst: int | None = Field(default=None, ge=1)

    def ids(self) -> list[str]:
        return [f"pos-{n:02d}" for n in range(1, self.count + 1)]


class Fridge(StrictModel):
    id: Identifier
    profile: str = Field(default="dixell-xr", description="Modbus profile the simulated controller serves.")
    transport: Literal["tcp", "rtu"] = "tcp"
    unit: int = Field(default=1, ge=1, le=247)
    setpoint_c: float = Field(default=3.0, ge=-40, le=20)


class BleSensor(StrictModel):
    id: Identifier
    format: Literal["bthome-v2", "ruuvi-rawv2", "pvvx-lywsd03mmc", "atc1441-lywsd03mmc"]
    mac: Annotated[str, Field(pattern=r"^([0-9A-F]{2}:){5}[0-9A-F]{2}$")]
    encrypted: bool = Field(default=False, description="BTHome and pvvx only: AES-CCM with a bindkey.")
    temperature_c: float = Field(default=4.0, ge=-40, le=60)
    interval_s: float = Field(default=5.0, gt=0, le=3600, description="Seconds between advertisements.")
    inside: Identifier | None = Field(
        default=None, description="The simulated fridge this logger sits in: it reads that cabinet's air."
    )


class RfidReader(StrictModel):
    id: Identifier
    tags: int = Field(default=50, ge=0, le=5000, description="Tags in the reader's field at the start.")


class Shelf(StrictModel):
    id: Identifier
    tags: int = Field(default=30, ge=0, le=5000)


class Kiosk(StrictModel):
    id: Identifier
    staff: int = Field(default=8, ge=0, le=500, description="Employees who check in during the scenario.")


class Devices(StrictModel):
    tills: Tills = Field(default_factory=Tills)
    fridges: list[Fridge] = Field(default_factory=list)
    ble: list[BleSensor] = Field(default_factory=list)
    rfid_readers: list[RfidReader] = Field(default_factory=list)
    shelves: list[Shelf] = Field(default_factory=list)
    kiosks: list[Kiosk] = Field(default_factory=list)

    def ids(self) -> list[str]:
        groups: list[list[str]] = [
            self.tills.ids(),
            [f.id for f in self.fridges],
            [b.id for b in self.ble],
            [r.id for r in self.rfid_readers],
            [s.id for s in self.shelves],
            [k.id for k in self.kiosks],
        ]
        return [i for group in groups for i in group]


Action = Literal[
    "door_open",
    "door_close",
    "defrost",
    "compressor_failure",
    "compressor_repair",
    "unplug",
    "plug",
    "tags_leave",
    "tags_arrive",
    "delivery",
    "garbage",
    "flood",
    "checkin_wave",
]


class Step(StrictModel):
    at_s: float = Field(ge=0, description="Scenario time (simulated seconds from the start).")
    action: Action
    device: Identifier | None = Field(
        default=None, description="The device acted on; none for store-wide ones."
    )
    count: int = Field(
        default=1, ge=1, le=100_000, description="Tags, cases delivered, garbage messages, check-ins..."
    )
    rate_per_s: float | None = Field(default=None, gt=0, le=100_000, description="For 'flood'.")
    for_s: float | None = Field(default=None, gt=0, description="For 'flood' and 'door_open': how long.")


class Scenario(StrictModel):
    scenario: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="Its name: the file's stem.")
    description: str = Field(max_length=2000)
    time_scale: float = Field(
        default=1.0,
        gt=0,
        le=10_000,
        description="Simulated seconds per real second (fridge thermal dynamics).",
    )
    duration_s: float = Field(gt=0, description="Scenario length in simulated seconds.")
    devices: Devices = Field(default_factory=Devices)
    steps: list[Step] = Field(default_factory=list)
    expect: list[str] = Field(
        default_factory=list,
        description="What a tester should see, e.g. 'device.status error for rfid-1' (shown by the demo).",
    )

    @model_validator(mode="after")
    def _steps_name_known_devices(self) -> Scenario:
        known = set(self.devices.ids())
        for n, step in enumerate(self.steps):
            if step.device is not None and step.device not in known:
                raise ValueError(
                    f"steps[{n}]: unknown device {step.device!r} (known: {', '.join(sorted(known))})"
                )
            if step.at_s > self.duration_s:
                raise ValueError(f"steps[{n}]: at_s {step.at_s:g} is after the end ({self.duration_s:g} s)")
        fridges = {f.id for f in self.devices.fridges}
        for n, sensor in enumerate(self.devices.ble):
            if sensor.inside is not None and sensor.inside not in fridges:
                raise ValueError(
                    f"devices.ble[{n}].inside: {sensor.inside!r} is not a fridge of this scenario"
                    f" (fridges: {', '.join(sorted(fridges)) or 'none'})"
                )
        return self


def scenario_dir() -> Path:
    return Path(str(resources.files("firmware_configs") / "scenarios"))


def available() -> list[str]:
    return sorted(p.stem for p in scenario_dir().glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a scenario file by path; :class:`ScenarioError` lists every problem in it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = scenario_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no scenario {name_or_path!r} (shipped: {', '.join(available())})")
    return load_document(path, Scenario, SCENARIO, error=ScenarioError)
