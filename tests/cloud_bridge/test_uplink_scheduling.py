"""The HQ uplink against a real mosquitto (docs/OUTBOX.md): class priority, anti-starvation, critical overtaking
a rate-limited backlog, complete_through, resend; the drain rate limit's token bucket; the reconnect wait that
ends when a TCP probe sees the broker's port open again."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_bridge.config import HqConfig
from cloud_bridge.topics import events_subscription
from cloud_bridge.uplink import DrainLimit, Uplink
from cloud_bridge.wire import Batch, decode_batch
from gateway.config import GatewayConfig
from gateway.kernel.config import ApiConfig, BrokerConfig, ClassBudget, OutboxConfig, StoreConfig
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import Message, MqttClient
from gateway.kernel.outbox import CLASSES, CRITICAL, STATE, TELEMETRY, TRANSACTION
from gateway.kernel.supervise import sleep_or_probe, tcp_reachable
from tests.gateway.test_journal import flushed, running, until
from tests.gateway.test_outbox import GATEWAY_ID, STORE_ID, draft, outbox_journal, reading, sale, status
from tests.harness.brokers import Mosquitto, free_port

PREFIX = "retail"


# --- helpers --------------------------------------------------------------------------------------


def gateway_config(tmp_path: Path, broker: Mosquitto, **hq: Any) -> GatewayConfig:
    return GatewayConfig(
        gateway_id=GATEWAY_ID,
        store=StoreConfig(id=STORE_ID, name="Test store"),
        data_dir=tmp_path,
        api=ApiConfig(enabled=False),
        hq=HqConfig(host=broker.host, port=broker.port, topic_prefix=PREFIX, **hq),
    )


class HqSubscriber:
    """A plain MQTT subscriber on HQ's broker that decodes every batch, in arrival order."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def _on_message(self, message: Message) -> None:
        self.batches.append(decode_batch(bytes(message.payload)))

    @property
    def classes(self) -> list[str | None]:
        return [b.cls for b in self.batches]

    def seqs(self, *, resend: bool = False) -> list[int]:
        return [e["seq"] for b in self.batches if b.resend == resend for e in b.events]

    def explained(self) -> set[int]:
        """Seqs covered by the outbox.evicted reports received."""
        return {
            s
            for b in self.batches
            for e in b.events
            if e["kind"] == "outbox.evicted"
            for a, z in e["data"]["ranges"]
            for s in range(a, z + 1)
        }

    def check_complete_through(self) -> None:
        """Every seq at or below a batch's complete_through reached HQ before that batch, or was evicted."""
        explained = self.explained()
        received: set[int] = set()
        for batch in self.batches:
            assert batch.complete_through is not None
            unseen = set(range(1, batch.complete_through + 1)) - received - explained
            assert not unseen, f"batch {batch.first_seq}..{batch.last_seq} claims {sorted(unseen)[:5]}..."
            received.update(e["seq"] for e in batch.events)


@contextlib.asynccontextmanager
async def hq_subscriber(broker: Mosquitto) -> AsyncIterator[HqSubscriber]:
    sub = HqSubscriber()
    client = MqttClient(
        BrokerConfig(host=broker.host, port=broker.port),
        "hq-test-sub",
        clean_start=True,
        on_message=sub._on_message,
    )
    await client.connect()
    try:
        await client.subscribe([(events_subscription(PREFIX), 1)])
        yield sub
    finally:
        await client.disconnect()


@contextlib.asynccontextmanager
async def uplink_running(uplink: Uplink) -> AsyncIterator[Uplink]:
    task = asyncio.create_task(uplink.run(), name="uplink-under-test")
    try:
        yield uplink
    finally:
        uplink.stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def expected_classes(batches: dict[int, int], every: int) -> list[str]:
    """The class of each batch when a backlog of ``batches`` per class is drained (docs/OUTBOX.md rules)."""
    left, picks, out = dict(batches), 0, []
    while any(left.values()):
        waiting = [c for c in sorted(left) if left[c]]
        if CRITICAL in waiting:
            cls = CRITICAL
        else:
            cls = max(waiting) if len(waiting) > 1 and picks % every == every - 1 else min(waiting)
            picks += 1
        out.append(CLASSES[cls])
        left[cls] -= 1
    return out


def submit_all(journal: Journal, drafts: list[Draft]) -> None:
    for d in drafts:
        assert journal.submit(d)


# --- scheduling -----------------------------------------------------------------------------------


async def test_a_backlog_of_several_classes_goes_out_highest_class_first(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    journal = outbox_journal(tmp_path)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=10)
    async with running(journal), hq_subscriber(hq_broker) as hq:
        # HQ was away: a backlog of every class, interleaved in seq.
        for i in range(55):
            submit_all(journal, [reading(i)])
            if i < 45:
                submit_all(journal, [sale(i)])
            if i < 25:
                submit_all(journal, [status(i)])
            if i < 15:
                submit_all(journal, [draft("alert.raised", i)])
        await flushed(journal)
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            await until(lambda: len(hq.seqs()) == journal.last_seq, "the backlog at HQ")
            await until(lambda: journal.caught_up, "every watermark at the end")

        every = config.hq.low_class_every
        assert hq.classes == expected_classes({CRITICAL: 2, TRANSACTION: 5, STATE: 3, TELEMETRY: 6}, every)
        assert hq.classes[:4] == ["critical", "critical", "transaction", "transaction"]
        assert sorted(hq.seqs()) == list(range(1, journal.last_seq + 1))  # each once
        for batch in hq.batches:
            assert {journal.kind_class(e["kind"]) for e in batch.events} == {CLASSES.index(batch.cls or "")}
            seqs = [e["seq"] for e in batch.events]
            assert seqs == sorted(seqs)
            assert not batch.resend
        hq.check_complete_through()


async def test_telemetry_is_not_starved_by_continuous_transactions(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    journal = outbox_journal(tmp_path)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=5, low_class_every=4)
    async with running(journal), hq_subscriber(hq_broker) as hq:
        submit_all(journal, [reading(i) for i in range(100)])  # 20 telemetry batches
        submit_all(journal, [sale(i) for i in range(60)])  # 12 transaction batches, then more keep coming
        await flushed(journal)
        stop = asyncio.Event()

        async def till() -> None:
            n = 1000
            while not stop.is_set():
                journal.submit(sale(n))
                n += 1
                await asyncio.sleep(0.002)

        producer = asyncio.create_task(till())
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            await until(lambda: hq.classes.count("telemetry") == 20, "the whole telemetry backlog at HQ")
            stop.set()
            await producer
            await flushed(journal)
            await until(lambda: journal.caught_up, "everything at HQ")

        classes = hq.classes
        # While both wait, exactly every 4th batch is telemetry.
        assert classes[:12] == ["transaction"] * 3 + ["telemetry"] + ["transaction"] * 3 + ["telemetry"] + [
            "transaction"
        ] * 3 + ["telemetry"]
        # And however the tills go, no 4 batches in a row pass without telemetry until it is drained.
        last_telemetry = max(i for i, c in enumerate(classes) if c == "telemetry")
        for start in range(last_telemetry - 3):
            assert "telemetry" in classes[start : start + 4], classes[start : start + 4]
        assert sorted(hq.seqs()) == list(range(1, journal.last_seq + 1))
        hq.check_complete_through()


@pytest.mark.parametrize("low_class_every", [2, 8])
async def test_an_alert_overtakes_a_rate_limited_backlog(
    tmp_path: Path, hq_broker: Mosquitto, low_class_every: int
) -> None:
    """The drain is limited to 1 event/s and a batch is 60 events: after the first batch the limiter holds the
    backlog for about a minute. An alert committed then goes out at once, also on an anti-starvation turn
    (every=2)."""
    journal = outbox_journal(tmp_path)
    config = gateway_config(
        tmp_path,
        hq_broker,
        batch_max_events=60,
        inflight_batches=2,  # the limit applies while more than two windows (240 events) wait
        drain_max_events_per_s=1,
        drain_max_bytes_per_s=0,
        low_class_every=low_class_every,
    )
    async with running(journal), hq_subscriber(hq_broker) as hq:
        submit_all(journal, [reading(i) for i in range(600)])  # 10 batches: ten minutes at this rate
        await flushed(journal)
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            await until(lambda: len(hq.batches) == 1, "the first telemetry batch")
            journal.submit(draft("alert.raised", 1))
            await until(lambda: "critical" in hq.classes, "the alert at HQ")
        assert hq.classes == ["telemetry", "critical"]
        assert hq.batches[1].events[0]["seq"] == 601
        assert hq.batches[1].complete_through == 60
        hq.check_complete_through()


async def test_a_reconnect_does_not_open_a_new_window_while_acks_are_not_on_disk(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    """The journal cannot write (here: its writer is stopped), so HQ's acks stay in memory; the window holds
    them. A dropped connection must not give the next session a fresh window on top (a SIGKILL would then
    resend both), and once the writer persists them, delivery goes on."""
    journal = outbox_journal(tmp_path)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=5, inflight_batches=2)
    await journal.open()
    writer = asyncio.create_task(journal.run())
    submit_all(journal, [sale(i) for i in range(40)])
    await flushed(journal)
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    try:
        async with hq_subscriber(hq_broker) as hq:
            uplink = Uplink(config, journal, Metrics(), None)
            async with uplink_running(uplink):
                await until(lambda: journal.delivered[TRANSACTION] == 10, "two batches acknowledged")
                assert not journal.acks_persisted
                first = uplink._client
                assert first is not None
                await first.disconnect()
                await until(lambda: uplink._client is not first and uplink.connected, "a new session")
                await asyncio.sleep(0.3)  # room for a wrong second window (an absence cannot be awaited)
                assert len(hq.batches) == 2

                writer = asyncio.create_task(journal.run())  # the journal writes again: acks land, slots free
                await until(lambda: len(hq.seqs()) == 40, "the rest at HQ")
                await until(lambda: journal.caught_up and journal.acks_persisted, "watermarks on disk")
            assert hq.seqs() == list(range(1, 41))
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


# --- complete_through and eviction ----------------------------------------------------------------


async def test_complete_through_never_claims_what_hq_has_not_got_unless_evicted(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    """HQ was away long enough for the state class to go over its cap; then delivery resumes while events keep
    coming. Every seq reaches HQ or is explained, and no complete_through runs ahead of what HQ has."""
    outbox = OutboxConfig(min_free_bytes=0, classes={"state": ClassBudget(max_bytes=16 * 1024)})
    journal = outbox_journal(tmp_path, outbox)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=7, inflight_batches=3)
    async with running(journal), hq_subscriber(hq_broker) as hq:
        for i in range(150):
            submit_all(journal, [status(i), sale(i), reading(i)])
        await flushed(journal)
        await until(lambda: journal.state[STATE].evicted_events > 0, "the state class over its cap")
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            for i in range(150, 200):
                submit_all(journal, [status(i), sale(i), reading(i)])
                await asyncio.sleep(0.001)
            await flushed(journal)
            await until(lambda: journal.caught_up, "everything delivered or evicted")
            await flushed(journal)
            await until(lambda: journal.caught_up, "the last reports delivered too")

        received = set(hq.seqs())
        explained = hq.explained()
        assert explained, "some state was evicted and reported"
        assert not received & explained
        assert received | explained == set(range(1, journal.last_seq + 1))
        hq.check_complete_through()


async def test_resend_republishes_what_is_on_disk_and_names_what_is_gone(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    outbox = OutboxConfig(min_free_bytes=0, classes={"state": ClassBudget(max_bytes=4 * 1024)})
    journal = outbox_journal(tmp_path, outbox)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=8)
    async with running(journal), hq_subscriber(hq_broker) as hq:
        for i in range(30):
            submit_all(journal, [sale(i), status(i)])
        await flushed(journal)
        await until(lambda: journal.state[STATE].evicted_events > 0, "evicted state events")
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            await until(lambda: journal.caught_up, "the first delivery")
            last = journal.last_seq
            on_disk = [r[0] for r in await journal.query("SELECT seq FROM events ORDER BY seq")]
            gone = sorted(set(range(1, last + 1)) - set(on_disk))
            assert gone
            answer = await uplink.resend(1, last + 5)
            await until(lambda: len(hq.seqs(resend=True)) == len(on_disk), "the resent events at HQ")
            with pytest.raises(ValueError, match="from_seq"):
                await uplink.resend(5, 4)

        def runs(seqs: list[int]) -> list[list[int]]:
            out: list[list[int]] = []
            for s in seqs:
                if out and out[-1][1] == s - 1:
                    out[-1][1] = s
                else:
                    out.append([s, s])
            return out

        assert answer == {"resent": runs(on_disk), "missing": runs([*gone, *range(last + 1, last + 6)])}
        resent = [b for b in hq.batches if b.resend]
        assert all(b.cls is None for b in resent)
        assert hq.seqs(resend=True) == on_disk
        assert all(len(b.events) <= 8 for b in resent)


# --- the drain rate limit -------------------------------------------------------------------------


def test_token_bucket_delays_by_the_debt_and_refills_at_the_rate() -> None:
    now = [100.0]

    def clock() -> float:
        return now[0]

    bucket = DrainLimit(100, 1000, clock=clock)
    assert bucket.delay() == 0.0  # a full second of burst to start with
    bucket.take(150, 400)
    assert bucket.delay() == pytest.approx(0.5)  # 50 events of debt at 100/s
    now[0] += 0.25
    assert bucket.delay() == pytest.approx(0.25)
    now[0] += 0.25
    assert bucket.delay() == 0.0
    bucket.take(0, 1600)  # bytes: 600 + 0.5 s * 1000 refilled = 1000 (capped), minus 1600
    assert bucket.delay() == pytest.approx(0.6)
    now[0] += 10
    assert bucket.delay() == 0.0
    bucket.take(100, 1000)  # the refill is capped at one second: a long idle does not bank a bigger burst
    assert bucket.delay() == 0.0
    bucket.take(1, 0)
    assert bucket.delay() == pytest.approx(0.01)


def test_token_bucket_zero_means_unlimited() -> None:
    now = [0.0]
    bucket = DrainLimit(0, 0, clock=lambda: now[0])
    bucket.take(10**9, 10**12)
    assert bucket.delay() == 0.0
    events_only = DrainLimit(10, 0, clock=lambda: now[0])
    events_only.take(20, 10**12)
    assert events_only.delay() == pytest.approx(1.0)


# --- reconnect wait -------------------------------------------------------------------------------


async def test_sleep_or_probe_returns_as_soon_as_the_port_opens() -> None:
    port = free_port()
    calls: list[bool] = []
    listener: list[socket.socket] = []

    async def probe() -> bool:
        up = await tcp_reachable("127.0.0.1", port)
        calls.append(up)
        if len(calls) == 2:  # the broker comes back after the second probe
            sock = socket.create_server(("127.0.0.1", port))
            listener.append(sock)
        return up

    try:
        async with asyncio.timeout(20):
            await sleep_or_probe(3600, probe, random.Random(1))
    finally:
        for sock in listener:
            sock.close()
    assert calls == [False, False, True]


async def test_sleep_or_probe_sleeps_the_whole_delay_when_the_port_was_open() -> None:
    """The failure was above TCP (a refused login): the port answers, and the backoff is not cut short."""
    order: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        calls = 0

        async def probe() -> bool:
            nonlocal calls
            calls += 1
            return await tcp_reachable("127.0.0.1", port)

        async def halfway() -> None:
            await asyncio.sleep(0.15)
            order.append("halfway")

        marker = asyncio.create_task(halfway())
        await sleep_or_probe(0.3, probe, random.Random(1))
        order.append("returned")
        await marker
    assert calls == 1
    assert order == ["halfway", "returned"]


async def test_sleep_or_probe_without_a_probe_just_sleeps() -> None:
    order: list[str] = []

    async def first() -> None:
        await asyncio.sleep(0.01)
        order.append("timer")

    marker = asyncio.create_task(first())
    await sleep_or_probe(0.05, None)
    order.append("returned")
    await marker
    assert order == ["timer", "returned"]


async def test_live_traffic_below_two_windows_is_not_rate_limited(
    tmp_path: Path, hq_broker: Mosquitto
) -> None:
    """The drain limit is for the catch-up after an outage: 600 waiting events are under two windows
    (2 x 16 x 60), so all of them go at once although the limit says 10 events/s."""
    journal = outbox_journal(tmp_path)
    config = gateway_config(tmp_path, hq_broker, batch_max_events=60, drain_max_events_per_s=10)
    async with running(journal), hq_subscriber(hq_broker) as hq:
        submit_all(journal, [reading(i) for i in range(600)])
        await flushed(journal)
        uplink = Uplink(config, journal, Metrics(), None)
        async with uplink_running(uplink):
            await until(lambda: len(hq.batches) == 10, "all ten batches, unthrottled")
        assert sorted(hq.seqs()) == list(range(1, 601))
