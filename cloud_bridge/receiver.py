"""The HQ reference receiver: takes every gateway's batches, stores each event once, acks after commit.

It keeps a persistent MQTT session (fixed client id, ``clean_start=False``) so the broker queues batches while
it is away, and sends each PUBACK only after the batch is committed to SQLite: a crash loses nothing, the
broker redelivers, and the store deduplicates. SQLite work runs on one worker thread; messages that queue up
while a commit is running are stored together in the next transaction.

``store-gateway hq-receiver`` runs :func:`receiver_main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import random
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final, TextIO

from cloud_bridge import topics
from cloud_bridge.receiver_store import (
    BatchToStore,
    GatewaySummary,
    ReceiverStore,
    Rejection,
    StoreResult,
)
from cloud_bridge.wire import BatchError, decode_batch
from gateway.config import BrokerConfig
from gateway.mqtt import Message, MqttClient, MqttError

_LOGGER = logging.getLogger(__name__)

DEFAULT_CLIENT_ID: Final = "hq-receiver"
MAX_GROUP_MESSAGES: Final = 64
MAX_GROUP_BYTES: Final = 1024 * 1024
"""A transaction takes waiting messages up to these limits: many small batches share one commit (one fsync),
while big ones go about alone (holding many decoded batches at once costs more than the commits saved)."""

OnBatch = Callable[[str, str, int, int, int], None]
"""Called after each stored batch is acked: (store_id, gateway_id, first_seq, last_seq, new events)."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What happened to one message; the seq range is kept rather than the decoded batch."""

    result: StoreResult | Rejection
    store_id: str = ""
    gateway_id: str = ""
    first_seq: int = 0
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class _Incoming:
    client: MqttClient
    topic: str
    payload: bytes
    mid: int
    qos: int


class HqReceiver:
    """Receives batches from the HQ broker into a :class:`ReceiverStore`, reconnecting on its own."""

    def __init__(
        self,
        broker: BrokerConfig,
        store: ReceiverStore,
        *,
        prefix: str = "retail",
        client_id: str = DEFAULT_CLIENT_ID,
        on_batch: OnBatch | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self._broker = broker
        self._store = store
        self._prefix = prefix
        self._client_id = client_id
        self._on_batch = on_batch
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self._flush_timeout = flush_timeout_s
        self._random = random.SystemRandom()
        self._queue: asyncio.Queue[_Incoming] = asyncio.Queue()
        self._stopping = False
        self._executor: ThreadPoolExecutor | None = None
        self._client: MqttClient | None = None
        self._subscribed = False
        self.connections = 0
        """How many times it has connected and subscribed (for tests and the status line)."""

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        return self._subscribed and self._client is not None and self._client.is_connected

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until ``stop`` is set; then store and ack what is in hand, and disconnect."""
        self._stopping = False
        self._executor = executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hq-receiver-db")
        try:
            async with asyncio.TaskGroup() as tg:
                consumer = tg.create_task(self._consume(), name="hq-receiver-store")
                await self._connection_loop(stop)
                consumer.cancel()
        finally:
            if self._client is not None:  # cancelled rather than stopped
                await self._client.disconnect()
                self._client = None
            # Waits for a transaction still running (it may commit; its messages were not acked, so the
            # broker resends them and they are deduplicated).
            self._executor = None
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def summary(self) -> list[GatewaySummary]:
        """The store's per-gateway summary, computed on the worker thread (off the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._store.summary)

    # --- connection -------------------------------------------------------------------------------------

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._subscribed = False
            self._client = client = MqttClient(
                self._broker, self._client_id, clean_start=False, manual_ack=True
            )
            client.on_message = functools.partial(self._enqueue, client)
            try:
                session_present = await client.connect(within_s=5)
                await client.subscribe([(topics.events_subscription(self._prefix), 1)])
            except (MqttError, TimeoutError) as err:
                await client.disconnect()
                self._log_failure(failures, f"cannot connect to HQ broker: {err}")
                failures += 1
                await self._backoff(stop, failures)
                continue
            self.connections += 1
            if failures:
                _LOGGER.info("reconnected to HQ broker after %d failed attempt(s)", failures)
            _LOGGER.info(
                "receiving %s from %s:%d (session %s)",
                topics.events_subscription(self._prefix),
                self._broker.host,
                self._broker.port,
                "resumed" if session_present else "new",
            )
            failures = 0
            self._subscribed = True
            closed = asyncio.create_task(client.wait_closed(), name="hq-receiver-wait-closed")
            stopping = asyncio.create_task(stop.wait(), name="hq-receiver-wait-stop")
            try:
                done, _ = await asyncio.wait((closed, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                closed.cancel()
            if closed not in done:
                await self._flush(client)
                return
            self._log_failure(failures, f"lost the HQ broker: {closed.result()}")
            failures += 1
            await self._backoff(stop, failures)

    def _log_failure(self, failures: int, message: str) -> None:
        """The first failure of an outage at WARNING, the rest at DEBUG until it recovers."""
        _LOGGER.log(logging.WARNING if failures == 0 else logging.DEBUG, "%s", message)

    def _backoff_delay(self, failures: int) -> float:
        """Exponential backoff with full jitter, capped."""
        return self._random.uniform(0, min(self._backoff_cap, self._backoff_base * 2 ** min(failures, 30)))

    async def _backoff(self, stop: asyncio.Event, failures: int) -> None:
        """Wait the backoff delay, or less if ``stop`` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._backoff_delay(failures)):
                await stop.wait()

    async def _flush(self, client: MqttClient) -> None:
        """Stop taking messages, store and ack those in hand, then disconnect."""
        self._stopping = True
        try:
            async with asyncio.timeout(self._flush_timeout):
                await self._queue.join()
        except TimeoutError:
            _LOGGER.warning(
                "stopping with %d message(s) not stored; the broker will resend them", self._queue.qsize()
            )
        await client.disconnect()
        self._client = None

    def _enqueue(self, client: MqttClient, message: Message) -> None:
        if self._stopping:
            return  # not acked: the broker resends it in our next session
        self._queue.put_nowait(
            _Incoming(client, message.topic, bytes(message.payload), message.mid, message.qos)
        )

    # --- storing ----------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0].payload)
            while len(group) < MAX_GROUP_MESSAGES and size < MAX_GROUP_BYTES and not self._queue.empty():
                group.append(self._queue.get_nowait())
                size += len(group[-1].payload)
            failures = 0
            while True:
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._store_group, group)
                    break
                except sqlite3.Error:
                    if failures == 0:
                        _LOGGER.exception(
                            "cannot store received batches; retrying, acking nothing until it works"
                        )
                    else:
                        _LOGGER.debug("storing received batches still fails", exc_info=True)
                    failures += 1
                    await asyncio.sleep(self._backoff_delay(failures))
            for item, outcome in zip(group, outcomes, strict=True):
                item.client.ack(item.mid, item.qos)
                self._queue.task_done()
                if isinstance(outcome.result, StoreResult):
                    self._report(outcome, outcome.result)

    def _store_group(self, group: Sequence[_Incoming]) -> list[_Outcome]:
        """Worker thread: decode each message and store them all in one transaction.

        Messages are decoded one at a time as the transaction goes, so only one decoded batch is alive.
        """
        ranges: list[tuple[str, str, int, int]] = []

        def prepared() -> Iterator[BatchToStore | Rejection]:
            for item in group:
                try:
                    ready = self._prepare(item)
                except Exception as err:
                    ready = Rejection(item.topic, f"cannot decode: {err!r}"[:500], len(item.payload))
                if isinstance(ready, BatchToStore):
                    ranges.append(
                        (ready.store_id, ready.gateway_id, ready.batch.first_seq, ready.batch.last_seq)
                    )
                else:
                    ranges.append(("", "", 0, 0))
                yield ready

        results = self._store.apply(prepared())
        return [_Outcome(r, *seqs) for r, seqs in zip(results, ranges, strict=True)]

    def _prepare(self, item: _Incoming) -> BatchToStore | Rejection:
        ids = topics.parse_events_topic(self._prefix, item.topic)
        if ids is None:
            return Rejection(item.topic, "not an events topic", len(item.payload))
        try:
            batch = decode_batch(item.payload)
        except BatchError as err:
            return Rejection(item.topic, str(err), len(item.payload))
        return BatchToStore(item.topic, len(item.payload), ids[0], ids[1], batch)

    def _report(self, outcome: _Outcome, result: StoreResult) -> None:
        _LOGGER.debug(
            "stored %s/%s seq %d..%d: %d new, %d duplicate(s), %d conflict(s)",
            outcome.store_id,
            outcome.gateway_id,
            outcome.first_seq,
            outcome.last_seq,
            result.new,
            result.duplicates,
            result.conflicts,
        )
        if self._on_batch is None:
            return
        try:
            self._on_batch(
                outcome.store_id, outcome.gateway_id, outcome.first_seq, outcome.last_seq, result.new
            )
        except Exception:
            _LOGGER.exception("on_batch callback failed")


# --- rendering and CLI ------------------------------------------------------------------------------------


def _format_lag(lag: timedelta | None) -> str:
    if lag is None:
        return "-"
    seconds = lag.total_seconds()
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{sign}{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{sign}{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def format_summary(rows: Sequence[GatewaySummary]) -> str:
    """The per-gateway summary as a small text table."""
    header = ("store", "gateway", "events", "max_seq", "gaps", "missing", "dups", "conflicts", "lag")
    table = [header] + [
        (
            r.store_id,
            r.gateway_id,
            str(r.events),
            str(r.max_seq),
            str(r.gaps),
            str(r.missing),
            str(r.duplicates),
            str(r.conflicts),
            _format_lag(r.lag),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    if not rows:
        lines.append("(no events received yet)")
    return "\n".join(lines)


def print_summary(rows: Sequence[GatewaySummary], file: TextIO | None = None) -> None:
    """Print :func:`format_summary` (CLI helper)."""
    print(format_summary(rows), file=file or sys.stdout, flush=True)


def _print_report(store: ReceiverStore, out: TextIO, max_gaps: int = 20) -> bool:
    """Summary plus each gateway's gaps; returns whether anything is missing or conflicting."""
    rows = store.summary()
    print_summary(rows, out)
    any_gap = False
    for row in rows:
        if row.conflicts:
            any_gap = True
            print(
                f"conflicts {row.store_id}/{row.gateway_id}: {row.conflicts} (same seq, different event id)",
                file=out,
            )
        gaps = store.gaps(row.gateway_id, row.store_id)
        if not gaps:
            continue
        any_gap = True
        shown = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in gaps[:max_gaps])
        more = f" and {len(gaps) - max_gaps} more" if len(gaps) > max_gaps else ""
        print(f"gaps {row.store_id}/{row.gateway_id}: {shown}{more}", file=out)
    rejected = store.count_rejected()
    if rejected:
        newest = store.rejections(limit=1)[0]
        print(f"rejected messages: {rejected} (newest, on {newest.topic}: {newest.reason})", file=out)
    return any_gap


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver",
        description="HQ reference receiver: stores every gateway's batches once, in SQLite; reports gaps.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HQ broker host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1883, help="HQ broker port (default: %(default)s)")
    parser.add_argument("--prefix", default="retail", help="HQ topic prefix (default: %(default)s)")
    parser.add_argument("--db", type=Path, default=Path("hq.db"), help="SQLite file (default: ./%(default)s)")
    parser.add_argument(
        "--client-id", default=DEFAULT_CLIENT_ID, help="MQTT client id; keep it fixed (default: %(default)s)"
    )
    parser.add_argument(
        "--summary-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="print the per-gateway summary every SECONDS; 0 disables (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the summary and gaps of --db and exit: 0, or 2 if any gap",
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store = ReceiverStore(args.db)
    broker = BrokerConfig(host=args.host, port=args.port)
    receiver = HqReceiver(broker, store, prefix=args.prefix, client_id=args.client_id)
    try:
        async with asyncio.TaskGroup() as tg:
            if args.summary_every > 0:
                tg.create_task(
                    _print_summaries(receiver, stop, args.summary_every), name="hq-receiver-summary"
                )
            await receiver.run(stop)
            stop.set()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        store.close()


async def _print_summaries(receiver: HqReceiver, stop: asyncio.Event, every: float) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()
        if not stop.is_set():
            print_summary(await receiver.summary())


def receiver_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver``: run the receiver, or ``--report`` on an existing database."""
    args = _parser().parse_args(argv)
    if args.report:
        if not args.db.exists():
            print(f"no database at {args.db}", file=sys.stderr)
            return 1
        store = ReceiverStore(args.db)
        try:
            return 2 if _print_report(store, sys.stdout) else 0
        finally:
            store.close()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0
