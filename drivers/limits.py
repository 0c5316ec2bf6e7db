"""Per-device limits, in a module of their own: driver config models import it without the runtime."""

from __future__ import annotations

from pydantic import Field

from gateway.kernel.model import StrictModel


class DeviceLimits(StrictModel):
    """Per-device limits every driver's device config carries (profiles may set other defaults)."""

    rate_limit_per_s: float = Field(
        default=50, gt=0, le=100_000, description="Sustained messages per second accepted from this device."
    )
    rate_burst: int = Field(default=200, ge=1, le=1_000_000, description="Messages accepted in a burst.")
    max_payload_bytes: int = Field(
        default=64 * 1024, ge=16, le=16 * 1024 * 1024, description="Larger messages are quarantined."
    )
    offline_after_s: float = Field(
        default=300, gt=0, le=7 * 86_400, description="Silent this long: the device is reported offline."
    )
