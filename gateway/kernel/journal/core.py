"""What every part of the journal shares: its files, its configuration, the writer thread with its connection,
and the queue of items waiting for a commit.

The :class:`~gateway.kernel.journal.Journal` is built in layers, one module per job, each adding its own state
in :meth:`Core._setup`: the failure and damage tracking (``health.py``), the outbox backlog (``backlog.py``),
the group commit and the processors (``writer.py``), and the open with its recovery (``opening.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.kernel.clock import ClockState
from gateway.kernel.config import JournalConfig, OutboxConfig
from gateway.kernel.journal.datadir import SeqReservation
from gateway.kernel.journal.items import Draft, Extra, Rejected
from gateway.kernel.metrics import Metrics
from gateway.kernel.outbox import KindClasses
from gateway.kernel.pipeline import Pipeline, Processor


class Core:
    """The journal's shared plumbing; see the module docstring for the layers built on it."""

    def __init__(
        self,
        path: Path,
        store_id: str,
        gateway_id: str,
        config: JournalConfig,
        metrics: Metrics,
        processors: Sequence[Processor] = (),
        clock: ClockState | None = None,
        outbox: OutboxConfig | None = None,
    ) -> None:
        self.path = path
        self._store_id = store_id
        self._gateway_id = gateway_id
        self._config = config
        self._outbox = outbox or OutboxConfig()
        self.kind_class = KindClasses(self._outbox.kinds)
        self._metrics = metrics
        self._pipeline = Pipeline(processors, metrics)
        self._clock = clock or ClockState()
        self._queue: deque[Draft | Rejected] = deque()
        self._wakeup = asyncio.Event()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._conn: sqlite3.Connection | None = None
        self._stopping = False
        self._reservation = SeqReservation(path.parent)
        self.last_seq = 0
        self._after_commit: list[Callable[[], None]] = []
        """Bookkeeping of work done inside the current transaction (writer thread): run after its COMMIT,
        dropped on rollback, so metrics and counters never count what was rolled back."""
        self._setup()

    def _setup(self) -> None:
        """Each layer's own state: overridden by every layer, which calls ``super()._setup()`` first."""

    async def _commit_once(
        self,
        loop: asyncio.AbstractEventLoop,
        extra: Extra | None = None,
        intake: bool = True,
    ) -> None:
        """One group commit (the writer's, ``writer.py``); the outbox's eviction steps run inside it."""
        raise NotImplementedError
