"""The bounds and periods of the HQ receiver's database work (:class:`~cloud_bridge.hq.sql.SqlReceiverStore`).

The store reads them through this module (``sql_limits.NAME``), so a test may set one for a while.
"""

from __future__ import annotations

from typing import Final

IN_CHUNK: Final = 500
"""Seqs per ``IN (...)`` list (SQLite limits bound parameters)."""
MAX_RESEND_GATEWAYS: Final = 1000
"""Gateways claimed per resend round: a round's work stays bounded with thousands of stores; the others are
claimed in the next round (oldest claim first)."""
GAP_CACHE_MAX_RANGES: Final = 1000
"""A gateway's classified gaps are kept in memory up to this many ranges (a forged pattern of a million gaps
is read again each time rather than held)."""
RECEIPT_FILL_CHUNK: Final = 5000
"""Events read per step when the receipt columns are filled for an existing database."""
MAX_RECEIPT_EVENTS: Final = 100
"""Most events one receipt lookup returns per way of matching (a receipt has a sale and a few returns; more is
forged, and which ones come back then is arbitrary)."""
MAX_CONFLICTS_KEPT: Final = 10_000
"""Conflicting events kept per gateway: past this (a forged or broken gateway), they are counted and logged,
and the table stops growing for it."""
MAX_CONFLICT_BYTES_KEPT: Final = 64 * 1024 * 1024
"""Bytes of conflicting event bodies kept per gateway, the other cap: a body goes in whole while the gateway's
kept bodies stay within it; past it, conflicts are counted and logged, not kept (as past MAX_CONFLICTS_KEPT)."""
SINGLE_RANGE_RECHECK_S: Final = 7 * 24 * 3600.0
"""A gateway marked single-range is tried with a multi-range command again after this (it may have been
upgraded); refused again, it is marked again."""
QUIET_AFTER_S: Final = 300.0
"""A gateway whose last batch is older than this (or than the resend interval) counts as quiet."""
QUIET_RESEND_S: Final = 3600.0
"""How often a gateway not heard from within the resend interval is asked again (at most 24 commands a day wait
in an away gateway's session, far below a broker's queue limit)."""
