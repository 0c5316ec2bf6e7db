"""The HQ receiver's database logic, written once for SQLite and PostgreSQL (their modules add a dialect).

Tables: ``events`` (every event once: primary key ``id``, unique ``(store_id, gateway_id, seq)``), ``gateways``
(per-gateway counters, ``max_seq``, ``complete_through`` and the lost watermark, resend bookkeeping), ``runs``
(the stored seqs of each gateway as contiguous runs, kept merged on every insert, so gaps cost the number of
gaps, not of events), ``explained`` (ranges a gateway reported evicted or possibly lost), ``anchors``
(``clock.synced`` anchors) and ``rejected`` (messages not stored, and why); beside them ``conflicts`` (events
that came under a seq another event holds), ``single_range`` (gateways asked one range per resend command) and
``subscriptions`` (each receiver's MQTT subscriptions, to drop the ones it no longer wants).

Receipts: ``events.receipt_no`` and ``events.original_receipt_no`` hold what a ``pos.sale`` or ``pos.return``
says (``data.receipt_no``; ``data.original_receipt_no`` of a return), filled from the envelope at insert, with
partial indexes, so proving that a receipt reached HQ (:meth:`SqlReceiverStore.receipt`) is an index lookup.
The columns came after schema 3 without a new schema number: they only add to it, so a receiver of before them
still opens the database and stores into it (leaving them NULL), and the first receiver with them adds and
fills them in its schema transaction (one pass over the events: during it, other receivers wait). Sales and
returns with ``receipt_no`` NULL (stored by such an older receiver) are read from their bodies by every
receipt lookup of their store (index ``events_receipt_unfilled``), so a lookup never misses one.

Several receivers may share one PostgreSQL database. Each batch first locks its gateway's row (an upsert),
so the events, runs and counters of one gateway are changed by one transaction at a time; the receiver
gives a transaction's batches sorted by (store, gateway) in code-point order (Python's ``str`` order; the
set-based PostgreSQL path locks with ``COLLATE "C"``, the same order whatever the database's collation), so
two receivers take their locks in the same order, and a deadlock (possible only through an event id forged into
another gateway) is retried. Events go in with ``ON CONFLICT DO NOTHING``: whoever inserts an event first
stores it; everyone else counts a duplicate (same id at that seq) or a conflict (a different id holds the
seq, or the id is elsewhere).

A missing seq at or below ``complete_through`` is called lost only once HQ has known that watermark for a
grace period (:class:`LostWatermark`): with several receivers, the batch holding it may still be in another
receiver's queue. Classifying a gateway's gaps reads its runs and explained ranges; the result is kept per
gateway for as long as its event count and upper bound stay the same (both change with every stored event).

:class:`SqlReceiverStore` is put together from parts, a module each: ``sql_base`` (the connection,
transactions, schema creation, a gateway's row and its gap classes), ``sql_writes`` (storing batches),
``sql_reads`` (summary, gaps, events, rejections, conflicts), ``sql_receipts`` (receipt proof) and
``sql_resends`` (resend claims); ``sql_schema`` holds the tables and ``sql_limits`` the bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud_bridge.hq.sql_reads import SqlReads
from cloud_bridge.hq.sql_receipts import SqlReceipts
from cloud_bridge.hq.sql_resends import SqlResendClaims
from cloud_bridge.hq.sql_writes import SqlWrites


class SqlReceiverStore(SqlWrites, SqlReads, SqlReceipts, SqlResendClaims):
    """Receiver storage over a DB-API connection; subclasses connect and name their
    :class:`~cloud_bridge.hq.sql_base.Dialect`.

    All methods are thread-safe (one lock around the one connection): the receiver calls them from a worker
    thread, reports may come from any thread.
    """

    # --- subscriptions ----------------------------------------------------------------------------------

    def subscriptions(self, client_id: str) -> list[str]:
        """The topic filters recorded as subscribed in the session of MQTT client ``client_id``."""
        with self._session() as cur:
            rows = self._rows(
                cur, "SELECT topic FROM subscriptions WHERE client_id = ? ORDER BY topic", (client_id,)
            )
        return [str(t) for (t,) in rows]

    def record_subscriptions(self, client_id: str, topics: Sequence[str], *, replace: bool) -> None:
        """Record ``topics`` as subscribed by ``client_id``: added to what is recorded, or (``replace``) as all
        of it."""
        with self._transaction(self.dialect.begin_write) as cur:
            if replace:
                self._x(cur, "DELETE FROM subscriptions WHERE client_id = ?", (client_id,))
            cur.executemany(
                self._sql(
                    "INSERT INTO subscriptions (client_id, topic) VALUES (?, ?) ON CONFLICT DO NOTHING"
                ),
                [(client_id, t) for t in dict.fromkeys(topics)],
            )
