"""The kernel's config sections: the store, brokers and TLS, the journal, the outbox, the local API and logging.

The whole file's model, :class:`gateway.config.GatewayConfig`, is assembled from these and from the sections the
drivers, the ledger and the HQ link own; loading, line numbers and secrets live in :mod:`gateway.config_loader`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, Literal
from zoneinfo import available_timezones

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.kernel.model import Identifier, StrictModel
from gateway.kernel.outbox import READ_BACK_KINDS
from gateway.kernel.store_hours import OpeningHours, StoreHours


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
    opening_hours: OpeningHours | None = Field(
        default=None,
        description="Per weekday (mon..sun), its open spans in the store's timezone, like '09:00-21:30' or"
        " '22:00-02:00' (past midnight); a day not listed is closed. None: always open.",
    )

    def store_hours(self) -> StoreHours:
        return StoreHours(self.timezone, self.opening_hours)

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
    "ping",
    "config.get",
    "stock.adjust",
    "roster.set",
    "planogram.set",
    "rules.set",
    "resend",
    "device.write",
    "alert.ack",
]
"""The downlink's commands (cloud_bridge/commands.py ARGS; a test keeps the two in step)."""


WEBHOOK_PREFIX: Final = "/webhooks/"
"""The local API's paths for the HTTP intake (``/webhooks/<source>``). They skip the bearer token: the intake
verifies each source's own signature."""


API_TOKEN_USER: Final = "api-token"  # noqa: S105 - a user name, not a password
"""The name the API token logs in to the local page with (as an admin)."""
Role = Literal["viewer", "technician", "manager", "admin"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "technician", "manager", "admin")
"""The local page's roles, least to most: each may do what the ones before it may."""


class ApiUser(StrictModel):
    """Someone who may log in to the local page (``/ui``) with their own token; the config keeps its hash only."""

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$", description="Shown in the audit log."
    )
    role: Role = Field(
        description="viewer: looks; technician and manager: also acknowledge alerts; admin: all."
    )
    token_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the token, in hex: `store-gateway hash-token` prints it (the token stays with them).",
    )


class ApiConfig(StrictModel):
    enabled: bool = Field(default=True, description="Serve the local HTTP API.")
    host: str = Field(
        default="127.0.0.1", description="Bind address; keep loopback unless a proxy fronts it."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    token: SecretStr | None = Field(
        default=None, description="Bearer token for everything but /health. {env: NAME} or {file: PATH}."
    )

    users: list[ApiUser] = Field(
        default_factory=list,
        max_length=100,
        description="Who may log in to the local page, each with a role; the API token logs in as admin too.",
    )

    @model_validator(mode="after")
    def _token_when_enabled(self) -> ApiConfig:
        if self.enabled and (self.token is None or len(self.token.get_secret_value()) < 16):
            raise ValueError("api.token is required (16+ characters) when the API is enabled")
        for field in ("name", "token_sha256"):
            seen = [getattr(u, field) for u in self.users]
            twice = sorted({v for v in seen if seen.count(v) > 1})
            if twice:
                raise ValueError(f"api.users: each user needs their own {field} ({', '.join(twice)} twice)")
        if any(u.name == API_TOKEN_USER for u in self.users):
            raise ValueError(
                f"api.users: the name {API_TOKEN_USER} is the API token's (it logs in as an admin)"
            )
        if self.token is not None:
            digest = hashlib.sha256(self.token.get_secret_value().encode("utf-8")).hexdigest()
            if any(u.token_sha256 == digest for u in self.users):
                raise ValueError(
                    "api.users: a user's token is the API token: give each person a token of their own"
                )
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
    telemetry_commit_window_ms: float = Field(
        default=1000,
        ge=0,
        le=10_000,
        description="How long telemetry (sensor readings, samples) may wait to share one commit (one fsync) with"
        " what else comes; anything of another class commits at once. Devices are acknowledged after the commit.",
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
        kept = sorted(k for k, c in value.items() if c == "telemetry" and k in READ_BACK_KINDS)
        if kept:
            raise ValueError(
                f"{', '.join(kept)} cannot be telemetry: the gateway reads these back (page, receipts, reports),"
                " and telemetry is the first class evicted; pick critical, transaction or state"
            )
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
