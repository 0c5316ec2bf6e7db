"""Config of the HTTP webhook intake: one source per cloud POS account, each at ``POST /webhooks/<id>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from drivers.limits import DeviceLimits
from drivers.profiles import ProfileBase, check_profile
from gateway.kernel.model import ID_PATTERN, StrictModel

if TYPE_CHECKING:
    from drivers.base import Driver, DriverContext

Format = Literal["generic", "lightspeed", "square"]

DEFAULT_PROFILES: Final[dict[str, str]] = {
    "generic": "webhook-generic-json",
    "lightspeed": "webhook-lightspeed-x-series",
    "square": "webhook-square",
}
"""The profile a source gets when it names none."""

SIGNATURE_HEADERS: Final[dict[str, str]] = {
    "generic": "X-Signature-256",
    "lightspeed": "X-Signature",
    "square": "x-square-hmacsha256-signature",
}
"""Where each format's sender puts its signature (see drivers/http/signatures.py)."""

DEFAULT_MAX_AGE_S: Final[dict[str, float]] = {"generic": 300, "square": 25 * 3600}
"""How old a signed time may be (drivers/http/freshness.py): a generic sender signs each retry anew; Square
resends a notification for up to 24 h with its first ``created_at``. Lightspeed signs no time."""
DEFAULT_MAX_AHEAD_S: Final = 60.0
MAX_WINDOW_S: Final = 7 * 86_400
"""Longest window: it must stay well under the journal's dedup_retention_days (35 by default)."""


@dataclass(frozen=True, slots=True)
class Window:
    """Accept a webhook signed at most ``max_age_s`` before the gateway's clock and ``max_ahead_s`` after it."""

    max_age_s: float
    max_ahead_s: float


class HttpProfile(ProfileBase):
    """A cloud POS webhook profile: which signature scheme and which payload mapping a source speaks."""

    family: Literal["http"] = "http"
    format: Format = Field(description="The payload mapping (drivers/http/<format>.py).")
    signature: str = Field(min_length=1, max_length=500, description="The signature scheme, in words.")
    signature_header: str = Field(min_length=1, max_length=100, description="The header holding it.")
    events: dict[str, str] = Field(
        default_factory=dict, description="Webhook event types and what the gateway makes of them."
    )
    limits: DeviceLimits = Field(default_factory=DeviceLimits, description="Suggested limits of a source.")


class HttpSource(DeviceLimits):
    """One webhook sender (a cloud POS account or store). Its id is the device id and the URL path."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        description="Device id; the webhook URL is POST /webhooks/<id> on the local API."
    )
    format: Format = Field(description="generic (the gateway's JSON), lightspeed (X-Series), square.")
    secret: SecretStr = Field(
        description="HMAC key: the generic sender's secret, the Lightspeed app's client secret, or the Square"
        " subscription's signature key. Write {env: NAME} or {file: PATH}."
    )
    signature_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,100}$")] | None = Field(
        default=None, description="Header with the signature, when not the format's usual one."
    )
    notification_url: (
        Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://\S+$")] | None
    ) = Field(
        default=None,
        description="square: the subscription's notification URL exactly as registered (Square signs URL + body).",
    )
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] | None = Field(
        default=None, description="lightspeed: the store's ISO 4217 currency (X-Series payloads carry none)."
    )
    register_id: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="square: register id for its sales (default: the order's location_id)."
    )
    profile: str | None = Field(default=None, description="Profile name (default: the format's own).")
    signed_timestamp: bool = Field(
        default=True,
        description="Refuse webhooks whose signed time is outside the freshness window. generic: the sender"
        " signs '<Unix seconds>.<body>' and sends the time in X-Webhook-Timestamp (false: it signs the body"
        " alone, GitHub style, and only the dedup keys refuse replays). square: checks created_at. lightspeed"
        " signs no time: nothing to check.",
    )
    max_age_s: Annotated[float, Field(gt=0, le=MAX_WINDOW_S)] | None = Field(
        default=None,
        description="Freshness window: the oldest signed time accepted, in seconds before the gateway's clock"
        " (default: generic 300, square 90000, as Square resends for 24 h). Keep it under the journal's"
        " dedup_retention_days.",
    )
    max_ahead_s: float = Field(
        default=DEFAULT_MAX_AHEAD_S,
        ge=0,
        le=3600,
        description="Freshness window: how far ahead of the gateway's clock a signed time may be.",
    )
    offline_after_s: float = Field(
        default=86_400,
        gt=0,
        le=7 * 86_400,
        description="Silent this long: reported offline (a quiet night is normal). Limits not written here"
        " come from the profile's ``limits``.",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        return None if value is None else check_profile(value, HttpProfile)

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("a webhook secret shorter than 8 characters can be guessed")
        return value

    @model_validator(mode="after")
    def _format_settings(self) -> HttpSource:
        if self.format == "square" and self.notification_url is None:
            raise ValueError("a square source needs 'notification_url': Square signs the URL with the body")
        if self.format == "lightspeed" and self.currency is None:
            raise ValueError("a lightspeed source needs 'currency' (ISO 4217): X-Series payloads carry none")
        if self.format == "lightspeed" and self.max_age_s is not None:
            raise ValueError("lightspeed webhooks carry no signed time: 'max_age_s' cannot apply")
        return self

    @property
    def header(self) -> str:
        return self.signature_header or SIGNATURE_HEADERS[self.format]

    @property
    def freshness(self) -> Window | None:
        """The window the source's signed times must fall in; None when it has none to check."""
        if not self.signed_timestamp or self.format not in DEFAULT_MAX_AGE_S:
            return None
        return Window(self.max_age_s or DEFAULT_MAX_AGE_S[self.format], self.max_ahead_s)

    @property
    def profile_name(self) -> str:
        return self.profile or DEFAULT_PROFILES[self.format]

    def limits_over(self, defaults: DeviceLimits) -> DeviceLimits:
        """The source's limits: what it sets here, its profile's ``defaults`` for the rest."""
        own = {k: getattr(self, k) for k in self.model_fields_set if k in DeviceLimits.model_fields}
        return DeviceLimits.model_validate({**defaults.model_dump(), **own})


class HttpDriverConfig(StrictModel):
    """Receives cloud POS webhooks on the local API (``api.enabled`` must be true)."""

    type: Literal["http"] = Field(
        default="http", description="Driver family; selects this driver's settings. Always write it in YAML."
    )
    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        default="webhooks", description="Driver instance name, used in metrics and logs."
    )
    sources: list[HttpSource] = Field(min_length=1, max_length=100, description="The webhook senders.")
    ack_timeout_s: float = Field(
        default=4.0,
        gt=0,
        le=60,
        description="Longest wait for the journal commit before answering 503 (X-Series gives up after 5 s).",
    )

    @model_validator(mode="after")
    def _unique_sources(self) -> HttpDriverConfig:
        ids = [s.id for s in self.sources]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"sources: duplicate id(s) {', '.join(dupes)}")
        return self

    def create(self, ctx: DriverContext) -> Driver:
        from drivers.http.driver import HttpIntake

        return HttpIntake(self, ctx)
