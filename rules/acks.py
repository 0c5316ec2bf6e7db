"""Acknowledging an alert: an ``alert.acknowledged`` event, committed like any other (from the local API or an
HQ command); the rule engine notes it on the open alert when it commits."""

from __future__ import annotations

import asyncio

from gateway.kernel.events import AlertAcknowledged
from gateway.kernel.journal import QUEUE_LIMIT, Draft, Journal


async def acknowledge(journal: Journal, ack: AlertAcknowledged, dedup_key: str | None = None) -> int | None:
    """Commit an ``alert.acknowledged`` event; its seq once committed (None: committed before, under
    ``dedup_key``: an HQ command given again)."""
    settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seqs: list[int | None] = []

    def committed() -> None:
        if not settled.done():
            settled.set_result(None)

    body = ack.model_dump_json().encode()
    draft = Draft("alert.acknowledged", None, body, ack, dedup_key=dedup_key, ack=committed, done=seqs.append)
    while not journal.submit(draft):
        room = asyncio.Event()
        journal.when_below(QUEUE_LIMIT, room.set)
        await room.wait()
    await settled
    return seqs[0] if seqs else None
