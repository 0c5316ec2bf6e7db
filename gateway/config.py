"""The configuration models: one YAML file, validated by these pydantic models (``extra="forbid"``).

The JSON Schema (``store-gateway config-schema``) is generated from these models; never write it twice.
Loading, line numbers, secrets and error reporting live in :mod:`gateway.config_loader`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Final, Literal
from zoneinfo import available_timezones

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cloud_bridge.signing import SigningKeyError, load_public_key
from drivers.limits import DeviceLimits
from drivers.mqtt.profile import SENSOR_READING_PROFILE, MqttProfile, resolve_profile
from drivers.profiles import check_profile
from drivers.registry import DriverConfig
from gateway.kernel.events import ID_PATTERN

Identifier = Annotated[
    str, Field(pattern=ID_PATTERN, description="Letters, digits, '.', '_' or '-'; max 64.")
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Location(StrictModel):
    latitude: float = Field(ge=-90, le=90, description="WGS84 latitude of the store entrance.")
    longitude: float = Field(ge=-180, le=180, description="WGS84 longitude of the store entrance.")
    geofence_radius_m: float = Field(
        default=100, gt=0, le=10_000, description="Check-ins count only within this radius, metres."
    )


class StoreConfig(StrictModel):
    id: Identifier = Field(description="Store id, unique across the chain; part of every HQ topic.")
    name: str = Field(min_length=1, max_length=200, description="Human-readable store name.")
    timezone: str = Field(default="UTC", description="IANA timezone, for example 'Asia/Hong_Kong'.")
    location: Location | None = Field(
        default=None, description="Where the store is; needed for check-in geofencing."
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        if value not in available_timezones():
            raise ValueError(
                f"unknown IANA timezone {value!r} (for example 'Asia/Hong_Kong', 'Europe/Paris')"
            )
        return value


class TlsConfig(StrictModel):
    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    insecure_skip_verify: bool = Field(default=False, description="Do not verify the broker. Testing only.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both for mutual TLS, or neither")
        return self


class BrokerConfig(StrictModel):
    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port (8883 is usual with TLS).")
    protocol: Literal["3.1.1", "5"] = Field(default="5", description="MQTT protocol version.")
    client_id: Identifier | None = Field(
        default=None,
        description="MQTT client id; default '<gateway_id>-<role>'. Must be stable for sessions.",
    )
    username: str | None = Field(default=None, description="MQTT user name.")
    password: SecretStr | None = Field(
        default=None, description="MQTT password. Write {env: NAME} or {file: PATH} rather than the value."
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; absent means plain TCP.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    receive_maximum: int = Field(
        default=1000,
        ge=1,
        le=65535,
        description="Max un-acknowledged QoS 1 messages the broker may send us (MQTT 5); bounds intake memory.",
    )
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="How long the broker keeps our session (and queues QoS 1 messages) while we are away.",
    )


CommandName = Literal[
    "ping", "config.get", "stock.adjust", "roster.set", "planogram.set", "rules.set", "resend", "device.write"
]
"""The downlink's commands (cloud_bridge/commands.py ARGS; a test keeps the two in step)."""


class CommandKey(StrictModel):
    """One of HQ's command-signing public keys (docs/OUTBOX.md, "Signed commands")."""

    id: Identifier = Field(description="The key id HQ puts in each command's key_id, e.g. 'hq-2026a'.")
    commands: list[CommandName] | None = Field(
        default=None,
        min_length=1,
        description="The commands this key may sign (null: every command). Give the HQ receiver's key only"
        " [resend]: a host that asks for resends then cannot write setpoints or rosters.",
    )
    public_key: str = Field(
        min_length=1,
        description="HQ's Ed25519 public key: base64 of its 32 raw bytes, or the PEM of 'openssl pkey -pubout';"
        " or {file: PATH} naming the PEM file.",
    )

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        try:
            load_public_key(value)
        except SigningKeyError as err:
            raise ValueError(str(err)) from err
        return value


MAX_COMMAND_KEYS: Final = 16


class HqConfig(BrokerConfig):
    command_keys: list[CommandKey] = Field(
        default_factory=list,
        max_length=MAX_COMMAND_KEYS,
        description="HQ's pinned command-signing public keys; a command must be signed by one of them. Two during"
        " a rotation; remove a key to revoke it. None: every HQ command is refused.",
    )

    @field_validator("command_keys")
    @classmethod
    def _unique_key_ids(cls, value: list[CommandKey]) -> list[CommandKey]:
        ids = [k.id for k in value]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate key id(s) {', '.join(dupes)}: each key needs its own id")
        return value

    topic_prefix: str = Field(
        default="retail",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="First topic level(s) at HQ.",
    )
    batch_max_events: int = Field(default=500, ge=1, le=10_000, description="Events per MQTT message to HQ.")
    batch_max_bytes: int = Field(
        default=256 * 1024, ge=1024, le=8 * 1024 * 1024, description="Bytes per batch."
    )
    inflight_batches: int = Field(
        default=16,
        ge=1,
        le=100,
        description="Batches sent but not yet acknowledged-and-recorded; a SIGKILL resends at most these.",
    )
    compression: Literal["zstd", "gzip", "none"] = Field(
        default="zstd", description="Batch body compression on the wire (docs/OUTBOX.md)."
    )
    compression_level: int | None = Field(
        default=None, ge=1, le=19, description="zstd 1-19 (default 3) or gzip 1-9 (default 6)."
    )
    drain_max_events_per_s: int = Field(
        default=5000, ge=0, description="Drain rate limit, events/s; 0 = none. Critical events are exempt."
    )
    drain_max_bytes_per_s: int = Field(
        default=4 * 1024 * 1024, ge=0, description="Drain rate limit, bytes/s on the wire; 0 = none."
    )
    low_class_every: int = Field(
        default=8,
        ge=2,
        le=1000,
        description="Every Nth batch goes to the lowest waiting class (anti-starvation).",
    )
    reconnect_max_s: float = Field(default=30.0, ge=1, le=3600, description="Reconnect backoff cap, seconds.")


class StockItem(StrictModel):
    sku: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="SKU as the tills send it.")
    on_hand: float = Field(
        description="Initial on-hand units, applied once when the ledger first sees the SKU."
    )
    safety_stock: float | None = Field(default=None, ge=0, description="At or below this, raise stock.low.")


class StockConfig(StrictModel):
    initial_csv: Path | None = Field(
        default=None, description="CSV with columns sku,on_hand[,safety_stock]; imported once per SKU."
    )
    items: list[StockItem] = Field(default_factory=list, description="Initial levels and thresholds inline.")
    default_safety_stock: float | None = Field(
        default=None, ge=0, description="Threshold for SKUs without one."
    )


class DeviceConfig(DeviceLimits):
    """An MQTT device; limits not written here come from its profile's ``limits``."""

    id: Identifier = Field(description="Device id as it appears in the device's topic.")
    profile: str = Field(
        description="What the device is: an MQTT profile (pos-terminal, checkin-kiosk, rfid-shelf-mqtt,"
        " generic-json-sensor...; 'pos_terminal' is pos-terminal) or 'sensor' (sensor.reading messages)."
    )
    name: str | None = Field(default=None, description="Free text for technicians.")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value == SENSOR_READING_PROFILE:
            return value
        check_profile(resolve_profile(value), MqttProfile)
        return value

    def limits_over(self, defaults: DeviceLimits) -> DeviceLimits:
        """The device's limits: what it sets here, the profile's ``defaults`` for the rest."""
        own = {k: getattr(self, k) for k in self.model_fields_set if k in DeviceLimits.model_fields}
        return defaults.model_copy(update=own)


class ApiConfig(StrictModel):
    enabled: bool = Field(default=True, description="Serve the local HTTP API.")
    host: str = Field(
        default="127.0.0.1", description="Bind address; keep loopback unless a proxy fronts it."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    token: SecretStr | None = Field(
        default=None, description="Bearer token for everything but /health. {env: NAME} or {file: PATH}."
    )

    @model_validator(mode="after")
    def _token_when_enabled(self) -> ApiConfig:
        if self.enabled and (self.token is None or len(self.token.get_secret_value()) < 16):
            raise ValueError("api.token is required (16+ characters) when the API is enabled")
        return self


class JournalConfig(StrictModel):
    commit_max_events: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Events per group commit; drivers pause reading while this many wait.",
    )
    commit_max_delay_ms: float = Field(
        default=2.0, ge=0, le=1000, description="How long a commit waits for more events to join it."
    )
    synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL",
        description="SQLite synchronous: FULL survives power loss after an ack; NORMAL only process crashes.",
    )
    max_payload_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest event body stored; larger is quarantined.",
    )
    dedup_retention_days: float = Field(
        default=35,
        ge=1,
        le=3650,
        description="How long a dedup key (a receipt, a webhook, an HQ command id) is remembered after its event"
        " committed, whatever TTL or the disk budget removed: longer than any sender's retry horizon.",
    )


OutboxClass = Literal["critical", "transaction", "state", "telemetry"]

GIB: Final = 1024**3
MIB: Final = 1024**2


class ClassBudget(StrictModel):
    max_bytes: int | None = Field(
        default=None, ge=1024, description="Event bytes of this class; null = no cap."
    )
    ttl_days: float | None = Field(default=None, gt=0, description="Events older than this are dropped.")


def _default_classes() -> dict[OutboxClass, ClassBudget]:
    return {
        "critical": ClassBudget(ttl_days=365),
        "transaction": ClassBudget(ttl_days=90),
        "state": ClassBudget(max_bytes=256 * MIB, ttl_days=30),
        "telemetry": ClassBudget(max_bytes=1 * GIB, ttl_days=7),
    }


class OutboxConfig(StrictModel):
    max_bytes: int = Field(
        default=4 * GIB, ge=1024 * 1024, description="Cap on the journal database's used pages, bytes."
    )
    min_free_bytes: int = Field(
        default=256 * MIB, ge=0, description="Below this much free disk, new telemetry is refused."
    )
    classes: dict[OutboxClass, ClassBudget] = Field(
        default_factory=_default_classes, description="Per-class byte cap and TTL (docs/OUTBOX.md)."
    )
    kinds: dict[str, OutboxClass] = Field(
        default_factory=dict,
        description="Move an event kind to another class, e.g. {device.status: critical}.",
    )
    housekeeping_interval_s: float = Field(
        default=60, ge=0.1, le=86_400, description="How often TTLs and budgets are enforced, seconds."
    )
    quarantine_max_rows: int = Field(default=10_000, ge=100, description="Quarantined messages kept.")

    @field_validator("kinds")
    @classmethod
    def _reports_stay_critical(cls, value: dict[str, OutboxClass]) -> dict[str, OutboxClass]:
        if value.get("outbox.evicted", "critical") != "critical":
            raise ValueError("outbox.evicted explains gaps at HQ and must stay in the critical class")
        return value

    @field_validator("classes")
    @classmethod
    def _all_classes(cls, value: dict[OutboxClass, ClassBudget]) -> dict[OutboxClass, ClassBudget]:
        return {**_default_classes(), **value}


class LogConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum log level."
    )
    format: Literal["plain", "json"] = Field(
        default="plain", description="'plain' for people, 'json' for log shippers."
    )


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
