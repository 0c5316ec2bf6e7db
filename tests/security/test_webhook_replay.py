"""Replayed webhooks against a real gateway: real HTTP to its local API, its real SQLite journal and ledger.

A signed webhook captured once must not move stock twice: inside its freshness window the journal's dedup key
refuses it; after the window, its signed time does (drivers/http/freshness.py), whatever the journal still
remembers. The gateway's clock is pinned as synchronised, except where the test is about an unsynchronised one.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import orjson

from drivers.http.driver import HttpIntake
from drivers.http.signatures import TIMESTAMP_HEADER, sign
from gateway.kernel.clock import ClockState
from gateway.runtime import Gateway
from simulators.webhooks import Webhook, headers
from tests.drivers.test_http_intake import SECRETS, SQUARE_URL, TEA, WATER, on_hand, sale_for, webhook_gateway
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import INITIAL_ON_HAND, journal_kinds, metric_sum, own_metrics

HOUR: Final = 3600


def set_clock(gateway: Gateway, synced: bool) -> None:
    """Pins the intake's view of the clock: the test machine's NTP state must not decide the outcome."""
    for intake in gateway.intakes:
        if isinstance(intake, HttpIntake):
            intake.clock = ClockState(override=synced)


def square_created(webhook: Webhook, created_at: datetime) -> Webhook:
    event = orjson.loads(webhook.body)
    event["created_at"] = created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Webhook(orjson.dumps(event), webhook.content_type, webhook.deltas)


def generic_headers(webhook: Webhook, signed_at: float) -> dict[str, str]:
    return headers("generic", SECRETS["web-shop"], webhook, signed_at=int(signed_at))


def dropped(gateway: Gateway, reason: str) -> float:
    return metric_sum(
        own_metrics(gateway), "storegw_messages_dropped_total", driver="webhooks", reason=reason
    )


async def test_an_old_signed_webhook_is_refused_as_stale(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        set_clock(gateway, synced=True)
        now = time.time()
        generic = sale_for("web-shop", 1, [(WATER, 1)])
        stale = await client.post(
            "/webhooks/web-shop", content=generic.body, headers=generic_headers(generic, now - 301)
        )
        assert (stale.status_code, stale.json()["reason"]) == (403, "stale"), stale.text
        ahead = await client.post(
            "/webhooks/web-shop", content=generic.body, headers=generic_headers(generic, now + 2 * 60)
        )
        assert (ahead.status_code, ahead.json()["reason"]) == (403, "ahead"), ahead.text
        # Square resends for 24 h with the event's first created_at: only older than 25 h is stale.
        old = square_created(sale_for("sq-main", 1, [(TEA, 1)]), datetime.now(UTC) - timedelta(hours=26))
        signed = headers("square", SECRETS["sq-main"], old, SQUARE_URL)
        square = await client.post("/webhooks/sq-main", content=old.body, headers=signed)
        assert (square.status_code, square.json()["reason"]) == (403, "stale"), square.text
        assert "pos.sale" not in journal_kinds(gateway.config.data_dir)
        assert on_hand(gateway, WATER.sku) == on_hand(gateway, TEA.sku) == INITIAL_ON_HAND
        assert dropped(gateway, "stale") == 2
        assert dropped(gateway, "ahead") == 1


async def test_the_signed_time_cannot_be_changed_or_left_out(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        set_clock(gateway, synced=True)
        webhook = sale_for("web-shop", 1, [(WATER, 1)])
        captured = generic_headers(webhook, time.time() - HOUR)
        refreshed = {**captured, TIMESTAMP_HEADER: str(int(time.time()))}  # a new time on an old signature
        reply = await client.post("/webhooks/web-shop", content=webhook.body, headers=refreshed)
        assert (reply.status_code, reply.json()["reason"]) == (401, "bad_signature")
        body_only = {"X-Signature-256": sign("generic", SECRETS["web-shop"], webhook.body)}
        reply = await client.post("/webhooks/web-shop", content=webhook.body, headers=body_only)
        assert (reply.status_code, reply.json()["reason"]) == (401, "no_timestamp")
        assert "pos.sale" not in journal_kinds(gateway.config.data_dir)


async def test_a_fresh_webhook_sent_twice_moves_stock_once(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        set_clock(gateway, synced=True)
        generic = sale_for("web-shop", 1, [(WATER, 2)])
        signed = generic_headers(generic, time.time())
        square = sale_for("sq-main", 1, [(TEA, 3)])
        square_signed = headers("square", SECRETS["sq-main"], square, SQUARE_URL)
        for _ in range(2):  # the very same bytes, headers included: what a captured request replays
            reply = await client.post("/webhooks/web-shop", content=generic.body, headers=signed)
            assert (reply.status_code, reply.json()["status"]) == (200, "committed"), reply.text
            reply = await client.post("/webhooks/sq-main", content=square.body, headers=square_signed)
            assert (reply.status_code, reply.json()["status"]) == (200, "committed"), reply.text
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == 2
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 2
        assert on_hand(gateway, TEA.sku) == INITIAL_ON_HAND - 3
        metrics = own_metrics(gateway)
        assert metric_sum(metrics, "storegw_messages_duplicate_total", driver="webhooks") == 2


async def test_an_unsynchronised_clock_leaves_replays_to_the_dedup_keys(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        set_clock(gateway, synced=False)
        webhook = sale_for("web-shop", 1, [(WATER, 1)])
        signed = generic_headers(webhook, time.time() - 2 * HOUR)  # or the box's clock is 2 h ahead
        for _ in range(2):
            reply = await client.post("/webhooks/web-shop", content=webhook.body, headers=signed)
            assert reply.status_code == 200, reply.text
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 1
        unchecked = metric_sum(own_metrics(gateway), "storegw_webhook_freshness_unchecked_total")
        assert unchecked == 2
