"""The HQ reference receiver: takes every gateway's batches, stores each event once, acks after commit.

It keeps a persistent MQTT session (fixed client id, ``clean_start=False``) so the broker queues batches while
it is away, and sends each PUBACK only after the batch is committed: a crash loses nothing, the broker
redelivers, and the store deduplicates. Messages that queue up while a commit is running are stored together
in the next transaction. Two stages overlap: a decode thread inflates and checks the next group while the
database thread stores the one before. What is in hand is bounded: at most MAX_IN_HAND messages (or
MAX_IN_HAND_BYTES) received and not yet acknowledged (beyond that the receiver stops reading its socket, and the
broker holds the rest), of which at most three groups decoded (one decoding, one waiting, one being stored),
each of at most MAX_GROUP_DECODED_BYTES as declared by its batches' headers, or one message alone.

Several receivers split the load by store (``stores``: plain subscriptions to their stores' topics, each with
a persistent session) into one PostgreSQL database. That is the default because it survives a restart of
mosquitto; an MQTT shared subscription (``share_group``, ``$share/<group>/...``) does not there: mosquitto 2.0
drops an absent member's shared subscription when it restarts (docs/HQ-RECEIVER.md, "HQ topology"). With
``resend_interval_s`` the receiver also asks gateways, quiet ones included, for lost seqs (multi-range
``resend`` commands, docs/OUTBOX.md), and reads their answers: a gateway that refuses ``ranges`` (a release of
before them) is asked one range per command from then on (:mod:`cloud_bridge.hq.resend`). Resend commands are
signed with HQ's command key (``signer``; gateways refuse unsigned commands). The subscriptions it makes are
recorded in its database, so a restart with other ``stores`` or share group unsubscribes what it no longer
wants (a persistent session keeps its subscriptions).

``store-gateway hq-receiver`` (:mod:`cloud_bridge.hq.receiver`) runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Final

from cloud_bridge import topics
from cloud_bridge.commands import MAX_RESEND_RANGES
from cloud_bridge.hq.model import (
    BatchToStore,
    GatewaySummary,
    ReceiverBackend,
    Rejection,
    StoreResult,
    StoreUnavailableError,
)
from cloud_bridge.hq.resend import ResendRounds, responses_subscriptions
from cloud_bridge.hq.sql_writes import rows_to_store
from cloud_bridge.signing import CommandSigner
from cloud_bridge.wire import BatchError, declared_size, decode_batch
from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError

_LOGGER = logging.getLogger("cloud_bridge.hq.receiver")
"""The receiver's one log name, whichever of its modules writes (receiver, service, resend)."""

DEFAULT_CLIENT_ID: Final = "hq-receiver"
DEFAULT_SHARE_GROUP: Final = "hq-receivers"
MAX_GROUP_MESSAGES: Final = 256
MAX_GROUP_BYTES: Final = 64 * 1024
"""A transaction takes waiting messages up to these limits (bytes as received, compressed): many small live
batches share one commit (one fsync, a few round trips in PostgreSQL), while full 500-event batches go about
three at a time (three decoded groups of 64 KiB as received hold about 30 MB; groups of 256 KiB doubled the
receiver's peak memory for no measurable gain)."""
MAX_GROUP_DECODED_BYTES: Final = 4 * 1024 * 1024
"""And up to this many bytes decoded, as the batches' headers declare them (``raw_bytes``): a message may
inflate up to MAX_DECODED_BYTES (16 MiB), so 64 KiB as received could otherwise be gigabytes decoded. A message
declaring more than this goes alone in its group."""
MAX_IN_HAND: Final = 1000
MAX_IN_HAND_BYTES: Final = 16 * 1024 * 1024
"""Received and not yet acknowledged: past either limit the receiver stops reading from the broker until half
of it is acknowledged. MQTT 5's receive maximum should keep the broker within the first already; this holds
also when a broker sends more than it (mosquitto 2.0 does once acknowledgements flow), and for MQTT 3.1.1."""
RESEND_CHECK_S: Final = 5.0
"""How often lost ranges are looked for; each gateway is asked at most once per resend interval."""

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


@dataclass(frozen=True, slots=True)
class _Group:
    """Messages decoded for one transaction: each message's batch (with its rows) or rejection, and its seqs."""

    messages: list[_Incoming]
    items: list[BatchToStore | Rejection]
    seqs: list[tuple[str, str, int, int]]


class HqReceiver:
    """Receives batches from the HQ broker into a :class:`ReceiverBackend`, reconnecting on its own.

    ``stores`` limits it to those stores' batches (receivers split the stores); ``share_group`` subscribes
    through an MQTT shared subscription instead of a plain one (not on mosquitto 2.0: see the module docstring).
    ``resend_interval_s`` turns on resend requests for lost seqs, ``resend_ranges`` ranges per command (1: the
    single-range form, for gateways of before multi-range resends), each signed by ``signer`` (required then:
    gateways refuse unsigned commands).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        store: ReceiverBackend,
        *,
        prefix: str = "retail",
        client_id: str = DEFAULT_CLIENT_ID,
        share_group: str | None = None,
        resend_interval_s: float | None = None,
        resend_ranges: int = MAX_RESEND_RANGES,
        stores: Sequence[str] | None = None,
        signer: CommandSigner | None = None,
        on_batch: OnBatch | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self._broker = broker
        self._store = store
        self._prefix = prefix
        self._client_id = client_id
        self._subscriptions = [(t, 1) for t in topics.events_subscriptions(prefix, share_group, stores)]
        self._resend_interval = resend_interval_s
        self._resends = ResendRounds(
            store,
            prefix=prefix,
            protocol=broker.protocol,
            interval_s=resend_interval_s,
            ranges=resend_ranges,
            signer=signer,
        )
        if resend_interval_s is not None and resend_ranges > 1:
            # The gateways' answers, to learn which refuse multi-range resends. QoS 0 and never shared: only
            # answers that come while connected matter (a refused ask is refused again at the next one), and
            # the persistent session must not queue every answer of every gateway while the receiver is away.
            self._subscriptions += [(t, 0) for t in responses_subscriptions(prefix, stores)]
        self._on_batch = on_batch
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self._flush_timeout = flush_timeout_s
        self._random = random.SystemRandom()
        self._queue: asyncio.Queue[_Incoming] = asyncio.Queue()
        """Messages received, not yet taken into a group; bounded by pausing the socket (MAX_IN_HAND)."""
        self._carried: _Incoming | None = None
        """Taken from the queue but left for the next group (it would have made this one too big decoded)."""
        self._decoded: asyncio.Queue[_Group] = asyncio.Queue(maxsize=1)
        self._in_hand = 0
        self._in_hand_bytes = 0
        self.peak_in_hand = 0
        """The most messages held at once, received and not yet acknowledged: at most MAX_IN_HAND and what the
        read that reached it had already taken in (PACKETS_PER_WAKEUP)."""
        self._decoder: ThreadPoolExecutor | None = None
        self._stopping = False
        self._executor: ThreadPoolExecutor | None = None
        self._client: MqttClient | None = None
        self._subscribed = False
        self.connections = 0
        """How many times it has connected and subscribed (for tests and the status line)."""

    @property
    def resend_commands(self) -> int:
        """Resend commands acknowledged by the broker."""
        return self._resends.commands

    @property
    def resend_ranges_asked(self) -> int:
        """Ranges those commands asked for."""
        return self._resends.ranges_asked

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        return self._subscribed and self._client is not None and self._client.is_connected

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until ``stop`` is set; then store and ack what is in hand, and disconnect."""
        self._stopping = False
        self._executor = executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"hq-receiver-db-{self._client_id}"
        )
        self._decoder = decoder = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"hq-receiver-decode-{self._client_id}"
        )
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self._decode_groups(), name="hq-receiver-decode"),
                    tg.create_task(self._store_groups(), name="hq-receiver-store"),
                ]
                if self._resend_interval is not None:
                    helpers.append(
                        tg.create_task(
                            self._resend_loop(stop, self._resend_interval), name="hq-receiver-resend"
                        )
                    )
                await self._connection_loop(stop)
                for task in helpers:
                    task.cancel()
        finally:
            if self._client is not None:  # cancelled rather than stopped
                await self._client.disconnect()
                self._client = None
            # Waits for a transaction still running (it may commit; its messages were not acked, so the
            # broker resends them and they are deduplicated).
            self._executor = self._decoder = None
            await asyncio.to_thread(decoder.shutdown, wait=True)
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
                await self._subscribe(client)
            except (MqttError, TimeoutError, StoreUnavailableError) as err:
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
                " ".join(t for t, _ in self._subscriptions),
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

    async def _subscribe(self, client: MqttClient) -> None:
        """Subscribe, and unsubscribe what this client id subscribed before but does not want now (other
        ``stores`` or share group): the broker keeps a persistent session's subscriptions, and would go on
        queueing and delivering other stores' batches to it. The filters subscribed are recorded in the store
        before subscribing, and replaced by the wanted ones once the rest is unsubscribed, so a failure at any
        step leaves nothing subscribed unrecorded. Before anything is recorded, the all-stores filters (the
        default ones, plain and shared) are taken as possibly subscribed: unsubscribing a filter that is not
        subscribed does nothing."""
        loop = asyncio.get_running_loop()
        wanted = [t for t, _ in self._subscriptions]
        recorded = await loop.run_in_executor(self._executor, self._store.subscriptions, self._client_id)
        previous = recorded or [
            topics.events_subscription(self._prefix),
            topics.events_subscription(self._prefix, DEFAULT_SHARE_GROUP),
        ]
        if set(recorded) != set(wanted):
            record = functools.partial(
                self._store.record_subscriptions, self._client_id, wanted, replace=False
            )
            await loop.run_in_executor(self._executor, record)
        await client.subscribe([(t, qos) for t, qos in self._subscriptions if qos == 1])
        answers = [(t, qos) for t, qos in self._subscriptions if qos == 0]
        if answers:
            try:
                await client.subscribe(answers)
            except MqttError as err:
                if not client.is_connected:
                    raise
                # A broker ACL that lets the receiver read batches only: it works on, without learning which
                # gateways refuse multi-range resends.
                _LOGGER.warning(
                    "cannot read the gateways' command answers (%s): a gateway of before multi-range resends"
                    " is not detected; allow the receiver to read <prefix>/<store>/+/responses, or use"
                    " --resend-ranges 1",
                    err,
                )
        stale = [t for t in previous if t not in wanted]
        if stale:
            try:
                await client.unsubscribe(stale)
            except MqttError as err:
                if not client.is_connected:
                    raise
                # A broker ACL may forbid even unsubscribing a filter the receiver never held: not a reason to
                # stop receiving; the old subscription (if any) keeps delivering, which stores nothing twice.
                _LOGGER.warning("could not unsubscribe %s (%s)", " ".join(stale), err)
            else:
                if recorded:
                    _LOGGER.info("unsubscribed %s: this receiver no longer takes them", " ".join(stale))
        if set(recorded) != set(wanted):
            record = functools.partial(
                self._store.record_subscriptions, self._client_id, wanted, replace=True
            )
            await loop.run_in_executor(self._executor, record)

    def _log_failure(self, failures: int, message: str) -> None:
        """The first failure of an outage at WARNING, the rest at DEBUG until it recovers."""
        _LOGGER.log(logging.WARNING if failures == 0 else logging.DEBUG, "%s", message)

    def _backoff_delay(self, failures: int) -> float:
        """Exponential backoff with full jitter, capped."""
        return self._random.uniform(0, min(self._backoff_cap, self._backoff_base * 2 ** min(failures, 30)))

    async def _backoff(self, stop: asyncio.Event, failures: int) -> None:
        await sleep_unless(stop, self._backoff_delay(failures))

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
        if message.topic.endswith("/responses"):
            # Subscribed at QoS 0: nothing to ack (a QoS 1 delivery would be acked here, never stored).
            client.ack(message.mid, message.qos)
            self._on_response(message.topic, bytes(message.payload))
            return
        if self._stopping:
            return  # not acked: the broker resends it in our next session
        payload = bytes(message.payload)
        self._queue.put_nowait(_Incoming(client, message.topic, payload, message.mid, message.qos))
        self._in_hand += 1
        self._in_hand_bytes += len(payload)
        self.peak_in_hand = max(self.peak_in_hand, self._in_hand)
        if self._in_hand >= MAX_IN_HAND or self._in_hand_bytes >= MAX_IN_HAND_BYTES:
            client.pause_reading()

    def _release(self, item: _Incoming) -> None:
        """Acknowledge a stored message; read from the broker again once half of what is in hand is acked."""
        item.client.ack(item.mid, item.qos)
        self._queue.task_done()
        self._in_hand -= 1
        self._in_hand_bytes -= len(item.payload)
        if self._in_hand <= MAX_IN_HAND // 2 and self._in_hand_bytes <= MAX_IN_HAND_BYTES // 2:
            client = self._client
            if client is not None:
                client.resume_reading()

    # --- storing ----------------------------------------------------------------------------------------

    async def _decode_groups(self) -> None:
        """Take the waiting messages as a group, decode it on the decode thread, hand it to the store stage
        (which holds at most one decoded group waiting)."""
        loop = asyncio.get_running_loop()
        while True:
            first, self._carried = self._carried, None
            group = [first if first is not None else await self._queue.get()]
            size = len(group[0].payload)
            decoded = declared_size(group[0].payload)
            while len(group) < MAX_GROUP_MESSAGES and size < MAX_GROUP_BYTES and not self._queue.empty():
                nxt = self._queue.get_nowait()
                more = declared_size(nxt.payload)
                if decoded + more > MAX_GROUP_DECODED_BYTES:
                    self._carried = nxt  # the first of the next group
                    break
                group.append(nxt)
                size += len(nxt.payload)
                decoded += more
            # One order for every receiver: concurrent transactions lock gateways in the same order.
            group.sort(key=self._gateway_key)
            prepared = await loop.run_in_executor(self._decoder, self._prepare_group, group)
            await self._decoded.put(prepared)

    async def _store_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._decoded.get()
            failures = 0
            while True:
                try:
                    results = await loop.run_in_executor(self._executor, self._store.apply, group.items)
                    break
                except StoreUnavailableError as err:
                    if failures == 0:
                        _LOGGER.warning(
                            "cannot store received batches (%s); retrying, acking nothing until it works", err
                        )
                    else:
                        _LOGGER.debug("storing received batches still fails: %s", err)
                    failures += 1
                    await asyncio.sleep(self._backoff_delay(failures))
            for item, result, seqs in zip(group.messages, results, group.seqs, strict=True):
                self._release(item)
                if isinstance(result, StoreResult):
                    self._report(_Outcome(result, *seqs), result)

    def _gateway_key(self, item: _Incoming) -> tuple[str, str]:
        return topics.parse_events_topic(self._prefix, item.topic) or ("", "")

    def _prepare_group(self, group: list[_Incoming]) -> _Group:
        """Decode thread: each message decoded and checked, its rows made, the parsed events let go."""
        items: list[BatchToStore | Rejection] = []
        seqs: list[tuple[str, str, int, int]] = []
        for item in group:
            try:
                ready = self._prepare(item)
            except Exception as err:
                ready = Rejection(item.topic, f"cannot decode: {err!r}"[:500], len(item.payload))
            if isinstance(ready, BatchToStore):
                seqs.append((ready.store_id, ready.gateway_id, ready.batch.first_seq, ready.batch.last_seq))
            else:
                seqs.append(("", "", 0, 0))
            items.append(ready)
        return _Group(group, items, seqs)

    def _prepare(self, item: _Incoming) -> BatchToStore | Rejection:
        ids = topics.parse_events_topic(self._prefix, item.topic)
        if ids is None:
            return Rejection(item.topic, "not an events topic", len(item.payload))
        try:
            batch = decode_batch(item.payload)
            rows = rows_to_store(ids[0], ids[1], batch)
        except BatchError as err:
            return Rejection(item.topic, str(err), len(item.payload))
        return BatchToStore(item.topic, len(item.payload), ids[0], ids[1], replace(batch, events=[]), rows)

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

    # --- resend requests --------------------------------------------------------------------------------

    def _on_response(self, topic: str, payload: bytes) -> None:
        """A gateway's answer to a command (:meth:`ResendRounds.on_response`)."""
        self._resends.on_response(topic, payload)

    async def _resend_loop(self, stop: asyncio.Event, interval: float) -> None:
        """Ask every gateway with lost seqs for them, quiet gateways included; a gateway is asked at most once
        per ``interval`` (once an hour when it has been quiet a while: it may be away, and what is asked waits
        in its session), with one command carrying up to MAX_RESEND_RANGES ranges (its lowest lost ones)."""
        while not await sleep_unless(stop, min(interval, RESEND_CHECK_S)):
            client = self._client
            if client is None or not self.connected:
                continue  # claim nothing we cannot send
            await self._resends.ask_round(client, self._executor)


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()
