"""Acknowledging an alert: an ``alert.acknowledged`` event, committed like any other (from the local API or an
HQ command); the rule engine notes it on the open alert when it commits."""

from __future__ import annotations

from gateway.kernel.events import AlertAcknowledged
from gateway.kernel.journal import Journal


async def acknowledge(journal: Journal, ack: AlertAcknowledged, dedup_key: str | None = None) -> int | None:
    """Commit an ``alert.acknowledged`` event; its seq once committed (None: committed before, under
    ``dedup_key``: an HQ command given again)."""
    return await journal.record("alert.acknowledged", ack, dedup_key)
