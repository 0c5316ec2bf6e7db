"""The event pipeline: the processors that run inside the journal's commit transaction, one after another.

A processor keeps state derived from events (the stock ledger; the rule engine) in the journal's own SQLite
file, so an event and what it changed commit together or not at all. The journal's writer hands each group
commit to :class:`Pipeline`:

- every processor sees every committed event, in seq order, as a typed :class:`Event`: events from devices,
  events from ``transact`` (a stock adjustment, a document HQ replaced) and from housekeeping (``outbox.evicted``);
- the events processor *i* emits (:class:`Emit`, event models, never raw dicts) get their seqs at once and are
  fed to processors *i+1...*: a rule sees the ``stock.level`` the ledger just wrote;
- a processor that fails is isolated: the event it failed on still commits, the processor's SQL writes of that
  commit are undone (a savepoint), its state is reloaded, and the failure is counted
  (``storegw_processor_errors_total``), logged and reported to HQ as an ``alert.raised`` (rule
  ``gateway.processor_failed``, at most one per processor per :data:`ALERT_EVERY_S`). A sale is never
  quarantined because a processor has a bug;
- ``tick(conn, now)`` gives time-driven processors (a fridge warm for 15 minutes) their turn from the writer's
  maintenance loop, inside a transaction, so what they emit is ordered with everything else;
- ``rollback`` (the transaction failed: forget what was applied since the last commit) and ``reload`` (the
  tables changed under the processor, by ``transact``) are separate.

Processors run on the journal's writer thread: they must be quick and do no I/O but SQL on ``conn``. Side effects
outside the journal (writing a device, notifying someone) belong to consumers that read committed events after
the commit, with a durable cursor, as the uplink does.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

from gateway.kernel.events import PAYLOADS, AlertRaised, Kind
from gateway.kernel.metrics import Metrics
from gateway.kernel.model import StrictModel

_LOGGER = logging.getLogger(__name__)

ALERT_EVERY_S: Final = 600.0
"""A failing processor is reported to HQ at most this often (each failure is counted and logged)."""
FAILED_RULE: Final = "gateway.processor_failed"

KIND_OF: Final[dict[type[StrictModel], Kind]] = {model: kind for kind, model in PAYLOADS.items()}  # type: ignore[misc]
"""The event kind of each payload model: what :class:`Emit` needs to become an event."""


@dataclass(slots=True)
class Event:
    """A committed event as processors see it: its seq, kind, device and validated payload model."""

    seq: int
    kind: Kind
    device_id: str | None
    data_json: bytes
    """The payload as stored (the envelope's ``data``)."""
    _model: StrictModel | None = field(default=None, repr=False)
    recorded_at: float | None = None
    """The wall-clock time of its commit (the envelope's ``recorded_at``, Unix seconds); None when the event did
    not come from the journal's writer (a replay)."""
    clock_synced: bool = True
    """Whether the wall clock was synchronised when it committed (the envelope's ``clock_synced``)."""

    @property
    def model(self) -> StrictModel:
        """The payload model (:data:`gateway.kernel.events.PAYLOADS`); parsed on first use when the event came
        without one (events other processors emitted keep theirs)."""
        if self._model is None:
            self._model = PAYLOADS[self.kind].model_validate_json(self.data_json)
        return self._model


@dataclass(frozen=True, slots=True)
class Emit:
    """An event a processor derives: its payload model (the kind follows from the model) and its device."""

    model: StrictModel
    device_id: str | None = None

    @property
    def kind(self) -> Kind:
        return KIND_OF[type(self.model)]


class Processor:
    """State derived from events, kept in the journal's file. Subclass and override what you need."""

    name: str = "processor"
    """Short, stable: a metric label and the alert's subject."""

    def setup(self, conn: sqlite3.Connection) -> None:
        """Create tables and load state (at open, inside a transaction)."""

    def apply(self, event: Event) -> None:
        """Take one committed event into the in-memory state (no SQL here)."""

    def flush(self, conn: sqlite3.Connection) -> Sequence[Emit]:
        """Write the state changed since the last flush; return the events it derives (they commit with it)."""
        return ()

    def tick(self, conn: sqlite3.Connection, now: float) -> Sequence[Emit]:
        """Time passed (``now``: wall-clock seconds). Called about every :data:`TICK_S` from the journal's
        maintenance loop, inside a transaction. Write state and return derived events, or nothing."""
        return ()

    wants_ticks: bool = False
    """True for processors that override :meth:`tick`; the journal runs no tick transaction otherwise."""

    def rollback(self, conn: sqlite3.Connection) -> None:
        """The transaction failed: forget what :meth:`apply` took since the last commit (reload from ``conn``)."""

    def reload(self, conn: sqlite3.Connection) -> None:
        """The processor's tables changed under it (a ``transact`` wrote them): read its state again."""


TICK_S: Final = 1.0
"""How often processors that want ticks get them."""
SAVEPOINT: Final = "storegw_processor"
RECENT_SKIPS: Final = 10_000
"""Seqs a processor skipped, remembered (in memory) for the callers that ask right after their commit."""


@dataclass(frozen=True, slots=True)
class Derived:
    """An emitted event, checked and serialised inside its processor's step (a bad one is the processor's
    failure, never the commit's)."""

    kind: Kind
    device_id: str | None
    model: StrictModel
    data_json: bytes


def derive(emit: object) -> Derived:
    """Check what a processor emitted and serialise it once, as its model dumps it (aliases included)."""
    if not isinstance(emit, Emit):
        raise TypeError(f"a processor emits Emit(model), not {type(emit).__name__}")
    kind = KIND_OF.get(type(emit.model))
    if kind is None:
        raise TypeError(f"{type(emit.model).__name__} is not an event payload model (gateway.kernel.events)")
    data = orjson.dumps(emit.model.model_dump(mode="json", by_alias=True))
    return Derived(kind, emit.device_id, emit.model, data)


Append = Callable[[Sequence[Derived]], list[Event]]
"""The writer's side: give derived events their seqs (in this transaction) and return them as :class:`Event`."""


@dataclass(slots=True)
class _Failure:
    last_alert: float | None = None
    """When the last report committed (monotonic)."""
    pending: float | None = None
    """When a report went into the transaction in progress; it counts once that commits."""


class Pipeline:
    """The processors, chained; run by the journal's writer inside each commit transaction."""

    def __init__(self, processors: Sequence[Processor], metrics: Metrics | None = None) -> None:
        self.processors = list(processors)
        names = [p.name for p in self.processors]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"processor names must be unique (metric labels, reports): {', '.join(twice)}")
        self._metrics = metrics
        self._failures: dict[str, _Failure] = {}
        self._skipping: dict[int, str] = {}
        """Seqs a processor skipped in the transaction in progress, and which processor."""
        self._skipped: OrderedDict[int, str] = OrderedDict()

    @property
    def wants_ticks(self) -> bool:
        return any(p.wants_ticks for p in self.processors)

    def skipped_by(self, seq: int) -> str | None:
        """The processor that skipped this recently committed event (it failed on it), or None."""
        return self._skipped.get(seq)

    def setup(self, conn: sqlite3.Connection) -> None:
        for proc in self.processors:
            proc.setup(conn)

    def run(self, conn: sqlite3.Connection, events: Sequence[Event], append: Append) -> None:
        """Feed ``events`` (already given seqs in this transaction) through the chain. What each processor
        emits is appended (seqs after everything so far) and fed to the processors after it."""
        if self.processors and events:
            self._chain(conn, 0, list(events), append)

    def tick(self, conn: sqlite3.Connection, now: float, append: Append) -> None:
        """Give each processor that wants ticks its turn; what it emits goes down the chain like any event."""
        for index, proc in enumerate(self.processors):
            if proc.wants_ticks:
                derived = self._step(conn, proc, [], functools.partial(proc.tick, conn, now))
                if derived:
                    self._chain(conn, index + 1, append(derived), append)

    def _chain(self, conn: sqlite3.Connection, start: int, feed: list[Event], append: Append) -> None:
        for proc in self.processors[start:]:
            derived = self._step(conn, proc, feed, functools.partial(proc.flush, conn))
            if derived:
                feed.extend(append(derived))

    def rollback(self, conn: sqlite3.Connection) -> None:
        """The commit failed: every processor forgets what it applied (and a failure report it held is not
        sent: the next failure reports again)."""
        self._skipping.clear()
        for state in self._failures.values():
            state.pending = None
        for proc in self.processors:
            proc.rollback(conn)

    def committed(self) -> None:
        """The transaction committed: the failure reports in it were sent, its skips are final."""
        for state in self._failures.values():
            if state.pending is not None:
                state.last_alert, state.pending = state.pending, None
        if self._skipping:
            self._skipped.update(self._skipping)
            self._skipping.clear()
            while len(self._skipped) > RECENT_SKIPS:
                self._skipped.popitem(last=False)

    def reload(self, conn: sqlite3.Connection) -> None:
        """A ``transact`` may have written the processors' tables: they read their state again."""
        for proc in self.processors:
            proc.reload(conn)

    # --- isolation ----------------------------------------------------------------------------------------

    def _step(
        self,
        conn: sqlite3.Connection,
        proc: Processor,
        feed: Sequence[Event],
        write: Callable[[], Sequence[Emit]],
    ) -> list[Derived]:
        """Apply ``feed`` to ``proc``, then ``write`` (its flush or tick) and check what it emits, inside a
        savepoint. Events it fails on are skipped; a failing write (or a bad emit) is undone, and then the
        processor has skipped the whole feed. Either way the failure is counted, logged and, at most every
        ALERT_EVERY_S, reported.

        A SQLite error is not the processor's: the disk or the database is failing, and the whole commit fails
        (the writer rolls it back, every processor forgets, and the batch is tried again)."""
        conn.execute(f"SAVEPOINT {SAVEPOINT}")
        skipped, error = self._apply(conn, proc, feed)
        try:
            derived = [derive(emit) for emit in write()]
        except sqlite3.Error:
            raise
        except Exception as err:
            conn.execute(f"ROLLBACK TO {SAVEPOINT}")
            proc.reload(conn)
            derived, skipped, error = [], list(feed), error or err
        conn.execute(f"RELEASE {SAVEPOINT}")
        if error is None:
            return derived
        return derived + self._report(proc, [e.seq for e in skipped], error)

    @staticmethod
    def _apply(
        conn: sqlite3.Connection, proc: Processor, feed: Sequence[Event]
    ) -> tuple[list[Event], BaseException | None]:
        """Apply the feed; the events it failed on (and the first error). Two passes at most: after failures,
        the processor is reloaded once and takes the others again; failing then too, it skips the feed."""
        failed: list[Event] = []
        first: BaseException | None = None
        for event in feed:
            try:
                proc.apply(event)
            except sqlite3.Error:
                raise
            except Exception as err:
                failed.append(event)
                first = first or err
        if not failed:
            return [], None
        proc.reload(conn)
        skip = {id(event) for event in failed}
        try:
            for event in feed:
                if id(event) not in skip:
                    proc.apply(event)
        except sqlite3.Error:
            raise
        except Exception:
            proc.reload(conn)
            return list(feed), first
        return failed, first

    def _report(self, proc: Processor, seqs: list[int], error: BaseException) -> list[Derived]:
        for seq in seqs:
            self._skipping[seq] = proc.name
        where = f"events {', '.join(map(str, seqs[:10]))}" if seqs else "a tick"
        _LOGGER.error(
            "processor %s failed on %s (%d skipped in this commit); the events are committed, the processor"
            " skipped them: %s",
            proc.name,
            where,
            len(seqs),
            error,
            exc_info=error,
        )
        if self._metrics is not None:
            self._metrics.processor_errors.labels(proc.name).inc(max(1, len(seqs)))
        state = self._failures.setdefault(proc.name, _Failure())
        now = time.monotonic()
        if state.pending is not None or (
            state.last_alert is not None and now - state.last_alert < ALERT_EVERY_S
        ):
            return []
        state.pending = now
        alert = AlertRaised(
            rule=FAILED_RULE,
            severity="critical",
            subject=proc.name[:64],
            message=f"processor {proc.name} failed on {where}: {type(error).__name__}: {error}"[:500],
            details={"seqs": seqs[:100], "skipped": len(seqs), "error": type(error).__name__},
        )
        return [derive(Emit(alert))]
