"""The ledger's HQ commands: ``stock.adjust`` and the documents (``roster.set``, ``planogram.set``, ``rules.set``).

The downlink checks a command (signature, validity, args) and dispatches it here. State changes go through the
journal: ``stock.adjust`` as a ``stock.adjusted`` event the stock ledger applies in its commit, the documents
through :meth:`gateway.kernel.journal.Journal.transact` (one transaction with their ``document.updated`` event).
Each applies once per request id (the journal's dedup key, :func:`cloud_bridge.commands.command_key`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from cloud_bridge.commands import CommandError, Handler, Outcome, Request, StockAdjust, command_key
from cloud_bridge.documents import DocumentName, Planogram, Roster, RuleSet
from gateway.kernel.events import StockAdjusted
from gateway.kernel.journal import QUEUE_LIMIT, Draft, Journal
from gateway.ledger.documents import store_work
from gateway.ledger.stock import apply_rule_thresholds, quantity_text


def ledger_handlers(journal: Journal) -> dict[str, Handler]:
    """The commands the ledger carries out, for the downlink to dispatch."""

    async def adjust(request: Request) -> Outcome:
        assert isinstance(request.args, StockAdjust)
        return await stock_adjust(journal, request.request_id, request.args)

    async def store(request: Request) -> Outcome:
        assert isinstance(request.args, Roster | Planogram | RuleSet)
        return await store_document(journal, request.request_id, request.args)

    return {
        "stock.adjust": Handler(adjust),
        "roster.set": Handler(store),
        "planogram.set": Handler(store),
        "rules.set": Handler(store),
    }


async def stock_adjust(journal: Journal, request_id: str, args: StockAdjust) -> tuple[Any, dict[str, Any]]:
    """Commit a ``stock.adjusted`` event (the ledger moves stock in the same transaction); wait for COMMIT."""
    event = StockAdjusted(
        sku=args.sku,
        delta=args.delta,
        set=args.set,
        reason=args.reason,
        note=args.note,
        request_id=request_id,
    )
    key = command_key(request_id)
    settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seqs: list[int | None] = []

    def committed() -> None:  # on the loop, after the commit that settled the draft
        if not settled.done():
            settled.set_result(None)

    draft = Draft(
        "stock.adjusted",
        None,
        event.model_dump_json().encode(),
        model=event,
        dedup_key=key,
        ack=committed,
        driver="downlink",
        done=seqs.append,  # on the journal's writer thread, right after COMMIT
    )
    while not journal.submit(draft):  # over the journal's queue limit: wait until it drains
        room = asyncio.Event()
        journal.when_below(QUEUE_LIMIT, room.set)
        await room.wait()
    await settled
    if not seqs:
        raise CommandError("failed", "the adjustment could not be applied; it is quarantined on the gateway")
    seq = seqs[0]
    if seq is not None and journal.skipped_by(seq) is not None:
        raise CommandError(
            "failed",
            f"stored as seq {seq}, but the stock ledger failed on it and skipped it (alert"
            " gateway.processor_failed): the stock did not move",
        )
    if seq is None:
        seq = await journal.seq_of_dedup_key(key)
    stored = await journal.stock_on_hand(args.sku)
    on_hand = quantity_text(stored) if stored is not None else None
    return ("ok" if seqs[0] is not None else "duplicate"), {"seq": seq, "on_hand": on_hand}


async def store_document(
    journal: Journal, request_id: str, document: Roster | Planogram | RuleSet
) -> tuple[Any, dict[str, int]]:
    """Replace a document; for rules, set the ledger's thresholds in the same transaction."""
    name: DocumentName
    if isinstance(document, RuleSet):
        name = "rules"
        rules = document

        def thresholds(conn: sqlite3.Connection) -> None:
            apply_rule_thresholds(conn, rules)

        work = store_work(name, document, request_id, command_key(request_id), thresholds)
    else:
        name = "roster" if isinstance(document, Roster) else "planogram"
        work = store_work(name, document, request_id, command_key(request_id))
    try:
        stored = await journal.transact(work)
    except (sqlite3.Error, OSError) as err:
        # transact rolled everything back: the document, its event and (for rules) the thresholds.
        reason = f"{type(err).__name__}: {err}"[:400]
        raise CommandError("failed", f"not applied, nothing changed: {reason}") from err
    return ("duplicate" if stored.duplicate else "ok"), {"version": stored.version, "count": stored.count}
