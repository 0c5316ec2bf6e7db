"""The whole configuration file: one YAML file, validated by these pydantic models (``extra="forbid"``).

This is the composition root of the config: each section is owned by the layer that uses it (the kernel's in
:mod:`gateway.kernel.config`, the drivers' in :mod:`drivers.registry`, the ledger's, the HQ link's) and only this
module assembles them. The JSON Schema (``store-gateway config-schema``) is generated from it; never write it
twice. Loading, line numbers, secrets and error reporting live in :mod:`gateway.config_loader`.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from cloud_bridge.config import HqConfig
from drivers.mqtt.devices import DeviceConfig
from drivers.registry import DriverConfig
from gateway.kernel.config import ApiConfig, BrokerConfig, JournalConfig, LogConfig, OutboxConfig, StoreConfig
from gateway.kernel.model import Identifier, StrictModel
from gateway.kernel.rule_config import Notifications, RuleDefinition, check_unique_ids
from gateway.ledger.config import StockConfig
from rules.haccp import HaccpConfig
from rules.report import ReportConfig


class GatewayConfig(StrictModel):
    """The whole gateway configuration file."""

    gateway_id: Identifier = Field(description="This box's id, unique within the store; part of HQ topics.")
    store: StoreConfig = Field(description="The store this gateway serves.")
    data_dir: Path = Field(default=Path("/var/lib/store-gateway"), description="Journal and state live here.")
    store_broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The store's MQTT broker.")
    hq: HqConfig = Field(description="The HQ MQTT broker.")
    drivers: list[DriverConfig] = Field(default_factory=list, description="Device intakes (MQTT for now).")
    devices: list[DeviceConfig] = Field(default_factory=list, description="Known devices.")
    stock: StockConfig = Field(
        default_factory=StockConfig, description="Initial stock levels and safety-stock thresholds."
    )
    api: ApiConfig = Field(
        description="The local HTTP API (health, metrics, events, stock); needs a token when enabled."
    )
    journal: JournalConfig = Field(default_factory=JournalConfig, description="SQLite journal tuning.")
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="Outbox classes, disk budget and TTLs (docs/OUTBOX.md)."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging level and format.")
    notifications: Notifications = Field(
        default_factory=Notifications, description="Where the rules' alerts are sent (docs/RULES.md)."
    )
    rules: list[RuleDefinition] = Field(
        default_factory=list,
        max_length=2000,
        description="The store's local rules: cold chain, silent devices (docs/RULES.md).",
    )
    haccp: HaccpConfig = Field(
        default_factory=HaccpConfig,
        description="The HACCP temperature log: its interval and how long it is kept (docs/HACCP.md).",
    )
    report: ReportConfig = Field(
        default_factory=ReportConfig,
        description="The daily report.daily for HQ: when it is made, how many top SKUs (docs/REPORTS.md).",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewayConfig:
        for label, ids in (
            ("device ids (across devices and every driver's devices and sources)", self.device_ids()),
            ("drivers", [d.name for d in self.drivers]),
            ("serial ports (one driver opens a port, exclusively)", self.serial_ports()),
        ):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"{label}: duplicate id(s) {', '.join(dupes)}")
        check_unique_ids(list(self.rules))
        channels = {c.id for c in self.notifications.channels}
        rules = [self.stock.low_alert, *self.rules]
        unknown = sorted({c for r in rules for c in r.channels() if c not in channels})
        if unknown:
            raise ValueError(
                f"rules notify unknown channel(s) {', '.join(unknown)}: add them to notifications.channels"
            )
        writable = {
            d.id for driver in self.drivers if driver.type == "modbus" for d in getattr(driver, "devices", ())
        }
        for rule in rules:
            for action in rule.actions:
                device = getattr(action, "device", None)
                if device is not None and device not in writable:
                    raise ValueError(
                        f"rule {rule.id}, action {action.id}: {device!r} is not a device of a modbus driver"
                    )
        fenced = [r.id for r in self.rules if r.type == "attendance"]
        if fenced and self.store.location is None:
            raise ValueError(
                f"attendance rule(s) {', '.join(fenced)} need the store's geofence: add store.location"
                " (latitude, longitude, geofence_radius_m)"
            )
        if self.store_broker.client_id is not None and sum(d.type == "mqtt" for d in self.drivers) > 1:
            raise ValueError(
                "store_broker.client_id is shared by every driver and they would take over each other's session:"
                " leave it out (each driver gets '<store>-<gateway>-intake-<driver>') when there are several drivers"
            )
        return self

    def device_ids(self) -> list[str]:
        """Every device id the gateway knows: MQTT devices and the devices (or webhook sources) of each driver.
        They share one registry, so they must be unique across drivers."""
        ids = [d.id for d in self.devices]
        for driver in self.drivers:
            ids += [entry.id for entry in [*getattr(driver, "devices", ()), *getattr(driver, "sources", ())]]
        return ids

    def serial_ports(self) -> list[str]:
        """The serial ports the drivers open (Modbus RTU buses and serial devices)."""
        ports = [str(p) for d in self.drivers if (p := getattr(d, "serial_port", None))]
        for driver in self.drivers:
            if driver.type == "serial":
                ports += [str(getattr(device, "port", "")) for device in getattr(driver, "devices", ())]
        return ports

    def client_id(self, role: str, broker: BrokerConfig) -> str:
        """The MQTT client id for one role; stable across restarts so persistent sessions survive."""
        if broker.client_id is not None:
            # The configured id is the main connection's; a second connection to the same broker (the HQ
            # downlink beside the uplink) must not take over its session, so it gets the role appended.
            main = role == "uplink" or role.startswith("intake-")
            return broker.client_id if main else f"{broker.client_id}-{role}"
        return re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.store.id}-{self.gateway_id}-{role}")
