"""The HQ link's config section (``hq:``): the HQ broker, batching and drain limits, and HQ's signing keys."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, field_validator

from cloud_bridge.signing import SigningKeyError, load_public_key
from gateway.kernel.config import BrokerConfig, CommandName
from gateway.kernel.model import Identifier, StrictModel


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
