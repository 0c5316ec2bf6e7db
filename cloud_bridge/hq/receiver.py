"""The HQ reference receiver: takes every gateway's batches, stores each event once, acks after commit.

It keeps a persistent MQTT session (fixed client id, ``clean_start=False``) so the broker queues batches while
it is away, and sends each PUBACK only after the batch is committed: a crash loses nothing, the broker
redelivers, and the store deduplicates. Database work runs on one worker thread; messages that queue up while
a commit is running are stored together in the next transaction.

Several receivers split the load by store (``stores``: plain subscriptions to their stores' topics, each with
a persistent session) into one PostgreSQL database. That is the default because it survives a restart of
mosquitto; an MQTT shared subscription (``share_group``, ``$share/<group>/...``) does not there: mosquitto 2.0
drops an absent member's shared subscription when it restarts (docs/HQ-RECEIVER.md, "HQ topology"). With
``resend_interval_s`` the receiver also asks gateways, quiet ones included, for lost seqs (multi-range
``resend`` commands, docs/OUTBOX.md), and reads their answers: a gateway that refuses ``ranges`` (a release of
before them) is asked one range per command from then on. Resend commands are signed with HQ's command key
(``signer``; gateways refuse unsigned commands). The subscriptions it makes are recorded in its
database, so a restart with other ``stores`` or share group unsubscribes what it no longer wants (a persistent
session keeps its subscriptions).

``store-gateway hq-receiver`` runs :func:`receiver_main`; ``store-gateway hq-receiver receipt`` proves that a
receipt reached HQ (:func:`receipt_main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import random
import re
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
from pydantic import SecretStr, ValidationError

from cloud_bridge import topics
from cloud_bridge.commands import MAX_RESEND_RANGES
from cloud_bridge.hq.model import (
    LOST_GRACE_S,
    SINGLE_RANGE_COMMANDS,
    BatchToStore,
    GatewaySummary,
    ReceiverBackend,
    Rejection,
    ResendRequest,
    StoreResult,
    StoreUnavailableError,
    resend_args,
)
from cloud_bridge.hq.ranges import size
from cloud_bridge.hq.report import format_ranges, print_report, print_summary
from cloud_bridge.hq.sql import (
    RECEIPT_MATCH,
    GatewayCompleteness,
    ReceiptEvent,
    ReceiptProof,
    SqlReceiverStore,
)
from cloud_bridge.hq.sqlite import ReceiverStore
from cloud_bridge.signing import (
    DEFAULT_VALIDITY_S,
    MAX_VALIDITY_S,
    CommandSigner,
    SigningKeyError,
    load_private_key,
)
from cloud_bridge.wire import BatchError, decode_batch
from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import uuid7
from gateway.kernel.model import ID_PATTERN
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError

_LOGGER = logging.getLogger(__name__)

DEFAULT_CLIENT_ID: Final = "hq-receiver"
DEFAULT_SHARE_GROUP: Final = "hq-receivers"
DEFAULT_SESSION_EXPIRY_S: Final = 7 * 24 * 3600
MAX_GROUP_MESSAGES: Final = 64
MAX_GROUP_BYTES: Final = 1024 * 1024
"""A transaction takes waiting messages up to these limits: many small batches share one commit (one fsync),
while big ones go about alone (holding many decoded batches at once costs more than the commits saved)."""
RESEND_CHECK_S: Final = 5.0
"""How often lost ranges are looked for; each gateway is asked at most once per resend interval."""
MAX_RESEND_COMMANDS: Final = SINGLE_RANGE_COMMANDS
"""Single-range commands per gateway per round with ``resend_ranges=1``, or for a gateway that refused a
multi-range command (one of before multi-range resends); otherwise one command of up to ``resend_ranges``
ranges, at most 100,000 seqs in all."""
MAX_TRACKED_ASKS: Final = 10_000
"""Multi-range resend commands remembered (request id -> gateway and ranges) until their answer comes; the
oldest are forgotten past this (an answer that comes later is ignored, and the next ask is refused again)."""
PUBLISH_TIMEOUT_S: Final = 10.0
MAX_STORES_PER_RECEIVER: Final = 1000
"""``--stores`` entries: one subscription each (brokers cap the topics of one SUBSCRIBE packet and a client's
subscriptions); more stores per receiver means one receiver for all of them, without ``--stores``."""
SIGNATURE_REFUSALS: Final = frozenset(
    {"unsigned", "unknown_key", "bad_signature", "expired", "not_yet_valid"}
)
"""Codes of a gateway refusing a command's signature or validity: logged once per gateway and code."""

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
        if not 1 <= resend_ranges <= MAX_RESEND_RANGES:
            raise ValueError(f"resend_ranges must be 1..{MAX_RESEND_RANGES}")
        self._resend_ranges = resend_ranges
        if resend_interval_s is not None and signer is None:
            raise ValueError("resend requests need a signer: gateways refuse unsigned commands")
        self._signer = signer
        self._signature_refusals: set[tuple[str, str]] = set()
        if resend_interval_s is not None and resend_ranges > 1:
            # The gateways' answers, to learn which refuse multi-range resends. QoS 0 and never shared: only
            # answers that come while connected matter (a refused ask is refused again at the next one), and
            # the persistent session must not queue every answer of every gateway while the receiver is away.
            self._subscriptions += [(t, 0) for t in responses_subscriptions(prefix, stores)]
        self._asked: OrderedDict[str, ResendRequest] = OrderedDict()
        """Multi-range resend commands whose answer has not come, by request id."""
        self._to_mark: dict[tuple[str, str], str] = {}
        """Gateways that refused a multi-range resend, not yet recorded in the store (which then flags their
        claims ``single_range``): (store, gateway) -> the gateway's error message."""
        self._retry: list[ResendRequest] = []
        """Refused multi-range asks, to ask again one range at a time in the next round."""
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
        self.resend_commands = 0
        """Resend commands acknowledged by the broker."""
        self.resend_ranges_asked = 0
        """Ranges those commands asked for."""

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
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [tg.create_task(self._consume(), name="hq-receiver-store")]
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
        await _sleep_unless(stop, self._backoff_delay(failures))

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
            # One order for every receiver: concurrent transactions lock gateways in the same order.
            group.sort(key=self._gateway_key)
            failures = 0
            while True:
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._store_group, group)
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
            for item, outcome in zip(group, outcomes, strict=True):
                item.client.ack(item.mid, item.qos)
                self._queue.task_done()
                if isinstance(outcome.result, StoreResult):
                    self._report(outcome, outcome.result)

    def _gateway_key(self, item: _Incoming) -> tuple[str, str]:
        return topics.parse_events_topic(self._prefix, item.topic) or ("", "")

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

    # --- resend requests --------------------------------------------------------------------------------

    def _on_response(self, topic: str, payload: bytes) -> None:
        """A gateway's answer to a command: an ``invalid_args`` refusal of a multi-range resend this receiver
        sent means a gateway of before multi-range resends (it takes only from_seq/to_seq): it is asked one
        range at a time from then on, starting with the refused ranges in the next round."""
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict) or answer.get("command") != "resend":
            return
        error = answer.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if (
            isinstance(code, str)
            and code in SIGNATURE_REFUSALS
            and (topic, code) not in self._signature_refusals
        ):
            self._signature_refusals.add((topic, code))
            _LOGGER.warning(
                "%s refused a signed resend: %s: %s (check --key-id against the gateway's hq.command_keys,"
                " and both clocks)",
                topic.removesuffix("/responses"),
                code,
                str(error.get("message") if isinstance(error, dict) else "")[:300],
            )
        request_id = answer.get("request_id")
        request = self._asked.pop(request_id, None) if isinstance(request_id, str) else None
        if request is None or topic != topics.responses_topic(
            self._prefix, request.store_id, request.gateway_id
        ):
            return
        if (
            answer.get("status") != "error"
            or not isinstance(error, dict)
            or error.get("code") != "invalid_args"
            # An old release names the field it does not know; a current one refusing for another reason
            # (a range out of bounds) must not be slowed to one range per command.
            or "ranges" not in str(error.get("message"))
            or "not permitted" not in str(error.get("message"))
        ):
            return
        key = (request.store_id, request.gateway_id)
        self._to_mark[key] = str(error.get("message"))[:300]
        self._retry.append(ResendRequest(*key, request.ranges[:MAX_RESEND_COMMANDS], single_range=True))

    async def _record_refusals(self, loop: asyncio.AbstractEventLoop) -> None:
        """Record in the store the gateways that refused multi-range resends (so every receiver sharing it,
        and this one after a restart, asks them one range at a time)."""
        while self._to_mark:
            key, message = next(iter(self._to_mark.items()))
            mark = functools.partial(self._store.mark_single_range, *key, f"invalid_args: {message}")
            if await loop.run_in_executor(self._executor, mark):
                _LOGGER.warning(
                    "%s/%s refused a multi-range resend (invalid_args: %s): a gateway of before multi-range"
                    " resends; asking it one range per command from now on",
                    *key,
                    message,
                )
            if self._to_mark.get(key) == message:
                del self._to_mark[key]

    async def _resend_loop(self, stop: asyncio.Event, interval: float) -> None:
        """Ask every gateway with lost seqs for them, quiet gateways included; a gateway is asked at most once
        per ``interval`` (once an hour when it has been quiet a while: it may be away, and what is asked waits
        in its session), with one command carrying up to MAX_RESEND_RANGES ranges (its lowest lost ones)."""
        loop = asyncio.get_running_loop()
        per_round = self._resend_ranges if self._resend_ranges > 1 else MAX_RESEND_COMMANDS
        # Without MQTT 5 a command cannot expire: one to a gateway that is away would wait in its session with
        # every later one. Then only gateways heard from within the interval are asked (as before MQTT 5).
        online_s = None if self._broker.protocol == "5" else interval
        claim = functools.partial(
            self._store.claim_resends,
            interval,
            per_round,
            online_s=online_s,
            single_ranges=MAX_RESEND_COMMANDS,
        )
        while not await _sleep_unless(stop, min(interval, RESEND_CHECK_S)):
            client = self._client
            if client is None or not self.connected:
                continue  # claim nothing we cannot send
            retry, self._retry = self._retry, []
            try:
                await self._record_refusals(loop)
                requests = await loop.run_in_executor(self._executor, claim)
            except StoreUnavailableError as err:
                _LOGGER.debug("cannot look for lost seqs: %s", err)
                self._retry = retry + self._retry
                continue
            for request in retry + requests:
                await self._ask_resend(client, request)

    async def _ask_resend(self, client: MqttClient, request: ResendRequest) -> None:
        """One multi-range command (or one single-range command per range, at most MAX_RESEND_COMMANDS, for
        a gateway of before multi-range resends, or all gateways with ``resend_ranges`` 1)."""
        topic = topics.commands_topic(self._prefix, request.store_id, request.gateway_id)
        single = (
            self._resend_ranges == 1
            or request.single_range
            or (request.store_id, request.gateway_id) in self._to_mark
        )
        batches = [[r] for r in request.ranges[:MAX_RESEND_COMMANDS]] if single else [request.ranges]
        signer = self._signer
        if signer is None:  # refused in __init__ when resends are on
            return
        interval = self._resend_interval or 1
        valid_for = min(MAX_VALIDITY_S, max(DEFAULT_VALIDITY_S, math.ceil(interval)))
        for ranges in batches:
            request_id = f"resend-{uuid7()}"
            payload = signer.sign(topic, request_id, "resend", resend_args(ranges), valid_for_s=valid_for)
            if len(ranges) > 1 and self._resend_interval is not None:
                self._asked[request_id] = request  # its answer may say the gateway takes one range only
                while len(self._asked) > MAX_TRACKED_ASKS:
                    self._asked.popitem(last=False)
            shown = format_ranges(ranges, limit=5)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    # Expires with the interval (MQTT 5): a gateway that is away must not find a pile of
                    # resends in its session, crowding out real commands; a fresh one follows if still lost.
                    expiry = max(1, math.ceil(interval))
                    await client.publish(topic, payload, qos=1, message_expiry_s=expiry)
            except (MqttError, TimeoutError) as err:
                _LOGGER.warning(
                    "could not ask %s/%s to resend %s (%s); asking again later",
                    request.store_id,
                    request.gateway_id,
                    shown,
                    err,
                )
                return
            self.resend_commands += 1
            self.resend_ranges_asked += len(ranges)
            _LOGGER.info(
                "asked %s/%s to resend %d lost seq(s) in %d range(s): %s",
                request.store_id,
                request.gateway_id,
                size(ranges),
                len(ranges),
                shown,
            )


def responses_subscriptions(prefix: str, stores: Sequence[str] | None = None) -> list[str]:
    """The gateways' command answers a receiver reads: every store's, or only ``stores``'."""
    if not stores:
        return [topics.responses_topic(prefix, "+", "+")]
    return [topics.responses_topic(prefix, store, "+") for store in dict.fromkeys(stores)]


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


# --- CLI ----------------------------------------------------------------------------------------------------


class CliError(StoreGatewayError):
    """A receiver option that cannot be used; the message is the one line the user sees."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver",
        description=(
            "HQ reference receiver: stores every gateway's batches once (SQLite, or PostgreSQL for several"
            " receivers), classifies missing seqs (explained, lost, pending) and can ask for lost ones."
        ),
        epilog="'store-gateway hq-receiver receipt --help': prove that a receipt reached HQ.",
    )
    broker = parser.add_argument_group("HQ broker")
    broker.add_argument("--host", default="127.0.0.1", help="HQ broker host (default: %(default)s)")
    broker.add_argument("--port", type=int, default=1883, help="HQ broker port (default: %(default)s)")
    broker.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (default: 5)")
    broker.add_argument("--prefix", default="retail", help="HQ topic prefix (default: %(default)s)")
    broker.add_argument(
        "--client-id",
        default=DEFAULT_CLIENT_ID,
        help="MQTT client id: fixed across restarts, and different for each receiver (default: %(default)s)",
    )
    broker.add_argument(
        "--share-group",
        metavar="GROUP",
        help="subscribe through the MQTT shared subscription $share/GROUP/...: receivers of one group split the"
        " batches. Not with mosquitto 2.0, which forgets an absent member's shared subscription when the broker"
        " restarts (the batches of that time are lost to HQ); default: a plain subscription",
    )
    broker.add_argument(
        "--no-share", action="store_true", help="a plain subscription (the default; overrides --share-group)"
    )
    broker.add_argument(
        "--stores",
        type=_store_list,
        metavar="ID[,ID...]",
        help="only these stores' batches (<prefix>/<store>/+/events each): receivers with plain subscriptions"
        " split the stores between them, every store in exactly one receiver's list (default: every store)",
    )
    parser.add_argument(
        "--resend-ranges",
        type=whole_number(1, MAX_RESEND_RANGES),
        default=MAX_RESEND_RANGES,
        metavar=f"1..{MAX_RESEND_RANGES}",
        help="ranges per resend command (default: %(default)s); 1 sends single-range commands, up to"
        f" {MAX_RESEND_COMMANDS} per round, for gateways of before multi-range resends",
    )
    broker.add_argument(
        "--session-expiry",
        type=int,
        default=DEFAULT_SESSION_EXPIRY_S,
        metavar="SECONDS",
        help="how long the broker keeps this receiver's session, and queues its batches, while it is away (MQTT"
        " 5; default: %(default)s, 7 days). Shorter for a receiver that may be retired. mosquitto 2.0 forgets an"
        " absent member's shared subscription when the broker restarts: with it, do not use --share-group",
    )
    broker.add_argument("--ca-file", type=Path, help="CA bundle that signed the broker's certificate (TLS)")
    broker.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS), with --key-file")
    broker.add_argument("--key-file", type=Path, help="client private key (mutual TLS), with --cert-file")
    broker.add_argument("--username", help="MQTT user name")
    broker.add_argument("--password-file", type=Path, help="file holding the MQTT password (never logged)")
    _database_options(parser)
    parser.add_argument(
        "--resend",
        action="store_true",
        help="publish a 'resend' command to a gateway for its lost seqs (needs --signing-key and --key-id)",
    )
    signing_options(parser)
    parser.add_argument(
        "--resend-interval",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="ask again for a still-lost range after SECONDS (default: %(default)s)",
    )
    _lost_grace_option(parser)
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
        help="print the summary and the missing seqs by class, and exit: 0, or 2 if any seq is lost or conflicts",
    )
    return parser


def signing_options(parser: argparse.ArgumentParser) -> None:
    """``--signing-key FILE --key-id ID``: HQ's command key (hq-receiver --resend, hq-command)."""
    group = parser.add_argument_group("command signing (docs/OUTBOX.md, 'Signed commands')")
    group.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="HQ's Ed25519 command key, PEM (openssl genpkey -algorithm ed25519); never logged",
    )
    group.add_argument(
        "--key-id", metavar="ID", help="its id, as pinned in the gateways' hq.command_keys (e.g. hq-2026a)"
    )


def command_signer(args: argparse.Namespace, needed_by: str | None = None) -> CommandSigner | None:
    """The signer ``--signing-key``/``--key-id`` name (None when neither is given, unless an option that
    sends commands, ``needed_by``, needs it); raises :class:`CliError`."""
    if args.signing_key is None and args.key_id is None:
        if needed_by is not None:
            raise CliError(
                f"{needed_by} needs --signing-key FILE and --key-id ID: gateways refuse unsigned commands"
                " (docs/OUTBOX.md, 'Signed commands')"
            )
        return None
    if args.signing_key is None or args.key_id is None:
        raise CliError("--signing-key and --key-id go together")
    if not _ID.fullmatch(args.key_id):
        raise CliError(f"--key-id {args.key_id[:80]!r} is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
    try:
        return CommandSigner(args.key_id, load_private_key(args.signing_key))
    except SigningKeyError as err:
        raise CliError(f"--signing-key: {err}") from err


def _database_options(parser: argparse.ArgumentParser) -> None:
    db = parser.add_argument_group("database").add_mutually_exclusive_group()
    db.add_argument("--db", type=Path, default=Path("hq.db"), help="SQLite file (default: ./%(default)s)")
    db.add_argument(
        "--postgres",
        metavar="DSN",
        help="PostgreSQL connection string, for several receivers sharing one database"
        " (keep the password in PGPASSFILE or PGPASSWORD)",
    )


def _lost_grace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lost-grace",
        type=_not_negative,
        default=LOST_GRACE_S,
        metavar="SECONDS",
        help="call a missing seq lost only once the gateway's complete_through covering it is SECONDS old:"
        " another receiver may still hold the batch (default: %(default)s; 0 with a single receiver)",
    )


def _store_list(text: str) -> list[str]:
    """``--stores a,b``: store ids (ID_PATTERN), at most MAX_STORES_PER_RECEIVER of them."""
    stores = [part.strip() for part in text.split(",") if part.strip()]
    if not stores or len(stores) > MAX_STORES_PER_RECEIVER:
        raise argparse.ArgumentTypeError(f"give 1 to {MAX_STORES_PER_RECEIVER} store ids, comma separated")
    for store in stores:
        if not _ID.fullmatch(store):
            raise argparse.ArgumentTypeError(
                f"{store[:80]!r} is not a store id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})"
            )
    return stores


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number {low}..{high}, not {text[:20]!r}")
        return value

    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    """The HQ broker settings from the command line; raises :class:`CliError`."""
    if (
        not args.no_share
        and args.share_group is not None
        and (not args.share_group or any(c in args.share_group for c in "/+#"))
    ):
        raise CliError(f"--share-group {args.share_group!r}: a share group is one topic level (no / + #)")
    password: SecretStr | None = None
    if args.password_file is not None:
        if args.username is None:
            raise CliError("--password-file needs --username")
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as err:
            raise CliError(f"cannot read --password-file: {err.strerror} ({args.password_file})") from err
        password = SecretStr(text.rstrip("\r\n"))
        if not password.get_secret_value():
            raise CliError(f"--password-file {args.password_file} is empty")
    for option in ("ca_file", "cert_file", "key_file"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise CliError(f"--{option.replace('_', '-')} {path}: no such file")
    try:
        tls = None
        if args.ca_file or args.cert_file or args.key_file:
            tls = TlsConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
        return BrokerConfig(
            host=args.host,
            port=args.port,
            protocol=args.protocol,
            username=args.username,
            password=password,
            tls=tls,
            session_expiry_s=args.session_expiry,
        )
    except ValidationError as err:
        raise CliError("; ".join(_problem(e["loc"], e["msg"]) for e in err.errors())) from err


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    """A pydantic error as "field: message" (a whole-model check has no field)."""
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(map(str, loc))}: {message}" if loc else message


def open_store(args: argparse.Namespace) -> SqlReceiverStore:
    """The database the options name; raises :class:`StoreUnavailableError`, or :class:`CliError` when
    ``--postgres`` is asked for without psycopg installed."""
    if args.postgres:
        try:
            from cloud_bridge.hq.postgres import PgReceiverStore  # psycopg only when asked for
        except ImportError as err:
            raise CliError(
                f"--postgres needs psycopg ({err}): install the postgres extra,"
                " pip install 'store-gateway[postgres]'"
            ) from err
        return PgReceiverStore(args.postgres, lost_grace_s=args.lost_grace)
    try:
        return ReceiverStore(args.db, lost_grace_s=args.lost_grace)
    except OSError as err:
        raise StoreUnavailableError(f"cannot open {args.db}: {err}") from err


async def _serve(
    args: argparse.Namespace, broker: BrokerConfig, store: SqlReceiverStore, signer: CommandSigner | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    receiver = HqReceiver(
        broker,
        store,
        prefix=args.prefix,
        client_id=args.client_id,
        share_group=None if args.no_share else args.share_group,
        resend_interval_s=args.resend_interval if args.resend else None,
        resend_ranges=args.resend_ranges,
        stores=args.stores,
        signer=signer,
    )
    if args.share_group is not None and not args.no_share:
        _LOGGER.warning(
            "SHARED SUBSCRIPTION (--share-group %s): mosquitto 2.0 drops the shared subscription of a member that"
            " is away when the broker restarts, and the batches of that time reach no receiver (the gateways"
            " count them delivered). Use it only on a broker that persists shared subscriptions (EMQX), or run"
            " with --resend; with mosquitto, split the stores with --stores instead (docs/HQ-RECEIVER.md,"
            " 'HQ topology')",
            args.share_group,
        )
    if not args.resend:
        _LOGGER.warning("--resend is off: lost seqs are reported (--report) but not asked for again")
    else:
        _LOGGER.info("resend commands are signed with key %s", args.key_id)
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


async def _print_summaries(receiver: HqReceiver, stop: asyncio.Event, every: float) -> None:
    seen: dict[tuple[str, str], int] = {}
    while not await _sleep_unless(stop, every):
        try:
            rows = await receiver.summary()
        except StoreUnavailableError as err:
            _LOGGER.warning("cannot read the summary: %s", err)
            continue
        print_summary(rows)
        for line in conflict_alarms(rows, seen):
            print(line, flush=True)
            _LOGGER.warning("%s", line)


def conflict_alarms(rows: Sequence[GatewaySummary], seen: dict[tuple[str, str], int]) -> list[str]:
    """A CONFLICT line per gateway whose conflict count went up since the last summary (``seen`` is updated):
    a conflict means two different events under one seq, which a person must look at, so the live summary
    says it in words rather than only as a number in a column."""
    lines = []
    for row in rows:
        key = (row.store_id, row.gateway_id)
        if row.conflicts > seen.get(key, 0):
            lines.append(
                f"CONFLICT {row.store_id}/{row.gateway_id}: {row.conflicts} event(s) came under a seq another"
                " event id holds; both are kept (table conflicts): see --report"
            )
        seen[key] = row.conflicts
    return lines


def print_conflicts(store: ReceiverBackend, out: TextIO, limit: int = 20) -> bool:
    """The conflicting events kept, for ``--report``; returns whether there are any."""
    rows = store.conflicts(limit + 1)
    for c in rows[:limit]:
        held = (
            f"seq {c.seq} holds event {c.kept_id}" if c.kept_id else f"event {c.id} is stored at another seq"
        )
        print(
            f"conflict {c.store_id}/{c.gateway_id} seq {c.seq}: {held}; also kept {c.kind} event {c.id}"
            f" (received {c.received_at.astimezone(UTC).isoformat(timespec='seconds')})",
            file=out,
        )
    if len(rows) > limit:
        print(f"(more conflicting events in table conflicts than the {limit} shown)", file=out)
    return bool(rows)


def receiver_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver``: run the receiver, or ``--report`` on an existing database, or
    ``receipt ...`` (:func:`receipt_main`)."""
    if argv[:1] == ["receipt"]:
        return receipt_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.report and not args.postgres and not args.db.exists():
        print(f"hq-receiver: no database at {args.db}", file=sys.stderr)
        return 1
    try:
        broker = None if args.report else broker_config(args)
        signer = command_signer(args, "--resend" if args.resend and not args.report else None)
        store = open_store(args)
    except (CliError, StoreUnavailableError) as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    try:
        if broker is None:
            failed = print_report(store, sys.stdout)
            conflicting = print_conflicts(store, sys.stdout)
            return 2 if failed or conflicting else 0
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(_serve(args, broker, store, signer))
    except StoreUnavailableError as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    else:
        return 0
    finally:
        store.close()


# --- receipt proof ------------------------------------------------------------------------------------------

RECEIPT_FOUND: Final = 0
RECEIPT_NOT_FOUND: Final = 1
RECEIPT_LOST_BELOW: Final = 2
_RECEIPT_STATUS: Final = {
    RECEIPT_FOUND: "found",
    RECEIPT_NOT_FOUND: "not_found",
    RECEIPT_LOST_BELOW: "lost_below",
}
_RECEIPT_NO: Final = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
"""A receipt number as gateways accept it (gateway/kernel/events.py ``ShortText``)."""
_ID: Final = re.compile(ID_PATTERN)

_RECEIPT_EPILOG: Final = """\
A receipt is the pos.sale or pos.return that DEVICE sent with this receipt_no; returns from any device
of the store naming it as original_receipt_no are listed too. For each gateway holding the receipt, the
seqs HQ misses up to the receipt's seq are shown by class: lost (the gateway said it delivered them),
pending (still on the way) and explained (the gateway reported them evicted). When HQ has no such receipt,
every gateway of the store is shown up to its highest seq: a pending gap may still bring it.

exit status:
  0  HQ holds the receipt, and no seq of its gateway up to it is lost
  1  HQ has no such receipt (or the database cannot be read)
  2  HQ holds the receipt, but seqs of its gateway below it are lost (as --report counts them)
     (argparse also exits 2 for a bad command line, with a usage message on stderr)
"""


def _receipt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-receiver receipt",
        description="Prove that a receipt reached HQ: print what HQ holds for it (gateway, seq, kind,\n"
        "event id, occurred_at, recorded_at, when HQ received it) and whether HQ has every event of its\n"
        "gateway up to it.",
        epilog=_RECEIPT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", required=True, type=_checked_id, help="store id")
    parser.add_argument("--device", required=True, type=_checked_id, help="the till's device id")
    parser.add_argument(
        "--receipt", required=True, type=_checked_receipt_no, metavar="RECEIPT_NO", help="receipt number"
    )
    _database_options(parser)
    _lost_grace_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _checked_id(text: str) -> str:
    if not _ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
    return text


def _checked_receipt_no(text: str) -> str:
    if not _RECEIPT_NO.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not a receipt number (1 to 64 characters, no control characters)"
        )
    return text


def receipt_status(proof: ReceiptProof) -> int:
    """The exit status of ``hq-receiver receipt`` (see its epilog)."""
    if not proof.found:
        return RECEIPT_NOT_FOUND
    return RECEIPT_LOST_BELOW if proof.lost_below else RECEIPT_FOUND


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event_document(event: ReceiptEvent) -> dict[str, Any]:
    return {
        "match": event.match,
        "store_id": event.store_id,
        "gateway_id": event.gateway_id,
        "seq": event.seq,
        "kind": event.kind,
        "id": event.id,
        "device_id": event.device_id,
        "receipt_no": event.receipt_no,
        "original_receipt_no": event.original_receipt_no,
        "register_id": event.register_id,
        "occurred_at": event.occurred_at,
        "recorded_at": event.recorded_at,
        "corrected_at": None if event.corrected_at is None else _utc_text(event.corrected_at),
        "received_at": _utc_text(event.received_at),
    }


def _gateway_document(gateway: GatewayCompleteness) -> dict[str, Any]:
    gaps = gateway.gaps
    return {
        "store_id": gateway.store_id,
        "gateway_id": gateway.gateway_id,
        "holds_receipt": gateway.holds_receipt,
        "through_seq": gateway.through_seq,
        "missing": gateway.missing,
        "lost": [list(r) for r in gaps.lost],
        "pending": [list(r) for r in gaps.pending],
        "explained": [list(r) for r in gaps.explained],
    }


def receipt_document(proof: ReceiptProof) -> dict[str, Any]:
    """``hq-receiver receipt --json``: ``status`` is found, lost_below or not_found (exit 0, 2, 1)."""
    return {
        "store_id": proof.store_id,
        "device_id": proof.device_id,
        "receipt_no": proof.receipt_no,
        "found": proof.found,
        "status": _RECEIPT_STATUS[receipt_status(proof)],
        "events": [_event_document(e) for e in proof.events],
        "gateways": [_gateway_document(g) for g in proof.gateways],
    }


def format_completeness(gateway: GatewayCompleteness) -> str:
    """ "HQ has every event of gateway G up to seq N; 0 missing", or what it misses up to N, by class."""
    name, through = gateway.gateway_id, gateway.through_seq
    if not gateway.missing:
        return f"HQ has every event of gateway {name} up to seq {through}; 0 missing"
    parts = [
        f"{label} {format_ranges(ranges)}"
        for label, ranges in (
            ("lost", gateway.gaps.lost),
            ("pending", gateway.gaps.pending),
            ("explained", gateway.gaps.explained),
        )
        if ranges
    ]
    return (
        f"HQ is missing {gateway.missing} event(s) of gateway {name} up to seq {through}: {'; '.join(parts)}"
    )


def format_receipt(proof: ReceiptProof) -> str:
    """The text ``hq-receiver receipt`` prints."""
    own = sum(e.match == RECEIPT_MATCH for e in proof.events)
    verdict = f"at HQ ({own} event(s))" if proof.found else "HQ has no such receipt"
    lines = [f"receipt {proof.receipt_no} of device {proof.device_id} in store {proof.store_id}: {verdict}"]
    for e in proof.events:
        if e.match == RECEIPT_MATCH:
            what = "the receipt"
        else:
            what = f"receipt {e.receipt_no} of device {e.device_id} returns it"
        lines.append(f"  {e.kind:<10}  gateway {e.gateway_id} seq {e.seq}  event {e.id}  ({what})")
        times = [f"occurred_at {e.occurred_at or '-'}", f"recorded_at {e.recorded_at}"]
        if e.corrected_at is not None:
            times.append(f"corrected_at {_utc_text(e.corrected_at)}")
        times.append(f"received_at {_utc_text(e.received_at)}")
        lines.append("      " + "  ".join(times))
    lines += [format_completeness(g) for g in proof.gateways]
    if not proof.found and not proof.gateways:
        lines.append(f"HQ has no event of store {proof.store_id}")
    return "\n".join(lines)


def receipt_main(argv: list[str]) -> int:
    """``store-gateway hq-receiver receipt``: what HQ holds for a receipt; exit 0, 1 or 2 (see the epilog)."""
    args = _receipt_parser().parse_args(argv)
    if not args.postgres and not args.db.exists():
        print(f"hq-receiver: no database at {args.db}", file=sys.stderr)
        return 1
    try:
        store = open_store(args)
    except (CliError, StoreUnavailableError) as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    try:
        proof = store.receipt(args.store, args.device, args.receipt)
    except StoreUnavailableError as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        sys.stdout.write(orjson.dumps(receipt_document(proof), option=orjson.OPT_APPEND_NEWLINE).decode())
        sys.stdout.flush()
    else:
        print(format_receipt(proof), flush=True)
    return receipt_status(proof)
