"""Scenario files (``firmware_configs/scenarios/*.yaml``): which simulated devices a store has, and a timeline;
the store's local rules (durations in store time), HQ's documents, and what to expect, including the alerts the
rules must raise and clear (:class:`AlertExpectation`, checked by :func:`alert_outcome`).

A scenario is data, not code: testers write new ones without touching Python. ``store-gateway demo --scenario
NAME`` runs one (see :mod:`simulators.scenario`); ``tests/simulators/test_scenarios.py`` runs each at a fast time scale.
A scenario file is read like the store config (:mod:`gateway.kernel.loader`): every problem at once, each with
``file:line:col``, the key path and a hint.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from cloud_bridge.documents import Planogram, Roster
from gateway.kernel.loader import DocumentError, DocumentKind, load_document
from gateway.kernel.model import Identifier, StrictModel
from gateway.kernel.rule_config import RuleDefinition, check_unique_ids
from simulators.catalog import CATALOG_BY_SKU

MAX_SCENARIO_BYTES: Final = 1024 * 1024
SCENARIO: Final = DocumentKind("scenario", "firmware_configs/scenarios/normal-day.yaml", MAX_SCENARIO_BYTES)


class ScenarioError(DocumentError, ValueError):
    """A scenario file that cannot be used; ``issues`` lists every problem, in file order, one line each.

    Also a ValueError, as the validation error it stands for is: callers that catch ValueError still do."""

    noun = "scenario"


class Tills(StrictModel):
    count: int = Field(default=3, ge=0, le=50, description="POS terminals pos-01, pos-02...")
    rate_per_s: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Sales and returns per second per till; 0: only the timeline's 'sales' and 'returns'.",
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
    skus: list[str] = Field(
        default_factory=list,
        description="Catalogue SKUs whose tags are in its field (a shelf's goods); empty: all 20.",
    )

    @model_validator(mode="after")
    def _known_skus(self) -> RfidReader:
        unknown = [s for s in self.skus if s not in CATALOG_BY_SKU]
        if unknown:
            raise ValueError(
                f"skus: not in the simulated catalogue: {', '.join(unknown)} (SKU-0001 ... SKU-0020)"
            )
        return self


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
    "checkin",
    "sales",
    "returns",
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
    sku: str | None = Field(
        default=None,
        description="'sales': the catalogue item sold (count units, one receipt); 'tags_leave' and"
        " 'tags_arrive' on an RFID reader: only tags of this item.",
    )
    employee: Identifier | None = Field(default=None, description="'checkin': who (E1000, E1001...).")
    direction: Literal["in", "out"] = Field(default="in", description="'checkin': in or out.")
    distance_m: float = Field(
        default=0, ge=0, le=100_000, description="'checkin': how far from the store's location the fix is."
    )

    @model_validator(mode="after")
    def _fields_fit_the_action(self) -> Step:
        if self.action == "checkin" and self.employee is None:
            raise ValueError("a 'checkin' step names its employee")
        if self.sku is not None and self.sku not in CATALOG_BY_SKU:
            raise ValueError(f"sku {self.sku!r} is not in the simulated catalogue (SKU-0001 ... SKU-0020)")
        return self


class ScenarioShift(StrictModel):
    start_s: float = Field(description="Scenario time the shift starts (may be negative: before the start).")
    end_s: float = Field(description="Scenario time the shift ends.")

    @model_validator(mode="after")
    def _ordered(self) -> ScenarioShift:
        if not self.start_s < self.end_s:
            raise ValueError("a shift ends after it starts")
        return self


class ScenarioStaff(StrictModel):
    staff_id: Identifier
    name: str = Field(min_length=1, max_length=200)
    role: str = Field(default="sales", min_length=1, max_length=64)
    shifts: list[ScenarioShift] = Field(default_factory=list, max_length=200)


class HqDocuments(StrictModel):
    """What the simulated HQ sends the gateway at scenario time 0, before the timeline plays."""

    planogram: Planogram | None = Field(
        default=None,
        description="HQ's planogram.set document, as HQ sends it (GTIN-14s of the shelves' goods).",
    )
    roster: list[ScenarioStaff] | None = Field(
        default=None, description="HQ's roster.set document, with shifts in scenario time (start_s, end_s)."
    )

    def roster_at(self, wall_start: float, time_scale: float) -> Roster | None:
        """The roster as HQ sends it: each shift at the wall-clock time its scenario time falls on."""
        if self.roster is None:
            return None

        def at(scenario_s: float) -> str:
            return datetime.fromtimestamp(wall_start + scenario_s / time_scale, UTC).isoformat()

        return Roster.model_validate(
            {
                "staff": [
                    {
                        "staff_id": member.staff_id,
                        "name": member.name,
                        "role": member.role,
                        "shifts": [{"start": at(s.start_s), "end": at(s.end_s)} for s in member.shifts],
                    }
                    for member in self.roster
                ]
            }
        )


class AlertExpectation(StrictModel):
    """An item of ``expect`` that the tests check: how many alerts of a rule were raised and cleared."""

    rule: str = Field(
        min_length=1, max_length=64, description="The rule's id or type (stock.low for the stock alerts)."
    )
    subject: str | None = Field(
        default=None,
        max_length=200,
        description="The alerts' subject (store, a device id, late:E1002...); none: any.",
    )
    raised: int = Field(ge=0, le=100_000, description="alert.raised events of the rule (and subject).")
    cleared: int = Field(default=0, ge=0, le=100_000, description="alert.cleared events of them.")

    def text(self) -> str:
        about = f" about {self.subject}" if self.subject is not None else ""
        return f"alerts of {self.rule}{about}: {self.raised} raised, {self.cleared} cleared"

    def matches(self, rule_id: str, rule_type: str, subject: str) -> bool:
        return self.rule in (rule_id, rule_type) and self.subject in (None, subject)


_RULES: Final = TypeAdapter(list[RuleDefinition])
_DURATION_SUFFIX: Final = "_s"
"""A rule's durations are its fields named ``*_s`` (for_s, window_s, after_s, ...): seconds."""


REAL_TIME_KEYS: Final = frozenset({"max_age_s"})
"""Durations measured against the devices' real polling (an action's interlock reading age): not scaled."""


def scale_durations(value: Any, time_scale: float) -> Any:
    """A rule (as JSON) with every duration (a number under a ``*_s`` key, nested ones too) divided by
    ``time_scale``: store seconds become the real seconds the gateway's timers run."""
    if isinstance(value, dict):
        return {
            key: (
                item / time_scale
                if key.endswith(_DURATION_SUFFIX)
                and key not in REAL_TIME_KEYS
                and isinstance(item, int | float)
                and not isinstance(item, bool)
                else scale_durations(item, time_scale)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scale_durations(item, time_scale) for item in value]
    return value


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
    rules: list[RuleDefinition] = Field(
        default_factory=list,
        description="The store's local rules (docs/RULES.md), their durations in store time: the gateway gets"
        " them divided by time_scale.",
    )
    hq: HqDocuments = Field(default_factory=HqDocuments, description="HQ's documents, sent at the start.")
    expect: list[str | AlertExpectation] = Field(
        default_factory=list,
        description="What a tester should see: text (shown by the demo), or {rule, subject, raised, cleared},"
        " the alerts the rules raise, which the tests check.",
    )

    def gateway_rules(self, time_scale: float | None = None) -> list[dict[str, Any]]:
        """The rules as the gateway's config takes them: every duration scaled to real time."""
        scale = self.time_scale if time_scale is None else time_scale
        return [
            scale_durations(rule.model_dump(mode="json", exclude_none=True), scale) for rule in self.rules
        ]

    def scale_problems(self, time_scale: float) -> list[str]:
        """Why the rules cannot run at ``time_scale`` (a duration below its rule's minimum once scaled)."""
        problems = []
        for n, rule in enumerate(self.gateway_rules(time_scale)):
            try:
                _RULES.validate_python([rule])
            except ValidationError as err:
                for error in err.errors():
                    where = ".".join(str(p) for p in error["loc"][2:])
                    problems.append(
                        f"rules[{n}].{where}: {error['input']!r} s of real time at time_scale {time_scale:g}:"
                        f" {error['msg']}"
                    )
        return problems

    def alert_expectations(self) -> list[AlertExpectation]:
        return [item for item in self.expect if isinstance(item, AlertExpectation)]

    def expect_text(self) -> list[str]:
        return [item if isinstance(item, str) else item.text() for item in self.expect]

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
        check_unique_ids(list(self.rules))
        for n, rule in enumerate(self.rules):
            if rule.notify or rule.escalate:
                raise ValueError(
                    f"rules[{n}]: a scenario's rules name no channels (notify, escalate): the demo sends every"
                    " alert to its own chat robot"
                )
        try:
            self.hq.roster_at(0, self.time_scale)
        except ValidationError as err:
            raise ValueError(
                f"hq.roster at time_scale {self.time_scale:g}: {err.errors()[0]['msg']}"
            ) from None
        problems = self.scale_problems(self.time_scale)
        if problems:
            raise ValueError(
                "the rules' durations are store time, divided by time_scale for the gateway: "
                + "; ".join(problems)
                + " (lower time_scale, or lengthen the duration)"
            )
        names = {"stock.low"} | {r.id for r in self.rules} | {r.type for r in self.rules}
        for n, item in enumerate(self.expect):
            if isinstance(item, AlertExpectation) and item.rule not in names:
                raise ValueError(
                    f"expect[{n}].rule: {item.rule!r} is not a rule of this scenario"
                    f" (rules: {', '.join(sorted(names))})"
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


def _alerts(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(kind, rule id, rule type, subject) of each alert.raised and alert.cleared envelope."""
    alerts: list[tuple[str, str, str, str]] = []
    for event in events:
        kind, data = event.get("kind"), event.get("data") or {}
        if kind == "alert.raised":
            rule_id = str((data.get("details") or {}).get("rule_id", data.get("rule")))
        elif kind == "alert.cleared":
            rule_id = str(data.get("alert_id", "")).partition("/")[0]
        else:
            continue
        alerts.append((kind, rule_id, str(data.get("rule")), str(data.get("subject"))))
    return alerts


def reached(expected: AlertExpectation, events: list[dict[str, Any]]) -> bool:
    """At least as many alerts raised and cleared as expected: what a test waits for before it checks."""
    got = [a[0] for a in _alerts(events) if expected.matches(a[1], a[2], a[3])]
    return got.count("alert.raised") >= expected.raised and got.count("alert.cleared") >= expected.cleared


def alert_outcome(scenario: Scenario, events: list[dict[str, Any]]) -> list[str]:
    """What the alerts in ``events`` (envelopes, as the journal and HQ hold them) make of the scenario's alert
    expectations: one line per expectation that does not hold, and one per rule of the scenario whose alerts no
    expectation names. Empty: every expectation holds."""
    alerts = _alerts(events)
    problems = []
    expectations = scenario.alert_expectations()
    for expected in expectations:
        got = [a[0] for a in alerts if expected.matches(a[1], a[2], a[3])]
        raised, cleared = got.count("alert.raised"), got.count("alert.cleared")
        if (raised, cleared) != (expected.raised, expected.cleared):
            problems.append(f"{expected.text()}; got {raised} raised, {cleared} cleared")
    for kind, rule_id, rule_type, subject in alerts:
        ours = any(rule_id == r.id for r in scenario.rules)
        if ours and not any(e.matches(rule_id, rule_type, subject) for e in expectations):
            problems.append(f"unexpected {kind} of {rule_id} about {subject}")
    return problems
