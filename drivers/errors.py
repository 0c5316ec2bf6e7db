"""The drivers' errors: pure decoders raise these, so they import nothing else of the drivers."""

from __future__ import annotations

from gateway.kernel.errors import StoreGatewayError


class DriverError(StoreGatewayError):
    """Base of every driver's errors: a clear message a technician can act on."""


class DecodeError(DriverError):
    """Bytes that do not decode. ``reason`` is a short code (a metric label); the message says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
