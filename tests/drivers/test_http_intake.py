"""The HTTP webhook intake against a real gateway: real HTTP (httpx) to its local API on loopback, its real
SQLite journal and stock ledger, real mosquitto brokers for the rest of the gateway. No peer is mocked.

A 200 is only sent after the commit, so the journal and the ledger are asserted right after each answer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from ruamel.yaml import YAML

from drivers.http.config import Format
from drivers.http.driver import NOTE_BURST, NOTE_RATE_PER_S
from gateway.config_loader import load_config
from gateway.runtime import Gateway
from simulators.catalog import CATALOG
from simulators.webhooks import Webhook, generic_sale, headers, lightspeed_sale, square_order
from simulators.webhooks import run as simulate
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import (
    API_TOKEN,
    AUTH,
    INITIAL_ON_HAND,
    TOKEN_ENV,
    journal_kinds,
    metric_sum,
    own_metrics,
    poll_until,
    read_ledger,
    read_quarantine,
    running_gateway,
    write_config,
)

SECRETS: Final = {
    "ls-main": "ls-client-secret-1",
    "sq-main": "sq-signature-key-1",
    "web-shop": "generic-secret-1",
}
SQUARE_URL: Final = "https://store-001.example.com/webhooks/sq-main"
"""What the Square subscription has registered (a public URL in front of the store; Square signs it)."""
REGISTER: Final = "b1e198a9-f019-11e3-a0f5-b8ca3a64f8f4"
WATER, TEA = CATALOG[0], CATALOG[1]
FORMATS: Final[dict[str, Format]] = {"ls-main": "lightspeed", "sq-main": "square", "web-shop": "generic"}


def _sources(overrides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    sources = [
        {"id": "ls-main", "format": "lightspeed", "secret": {"env": "LS_SECRET"}, "currency": "HKD"},
        {"id": "sq-main", "format": "square", "secret": {"env": "SQ_SECRET"}, "notification_url": SQUARE_URL},
        {"id": "web-shop", "format": "generic", "secret": {"env": "WEB_SECRET"}},
    ]
    return [{**s, **overrides.get(str(s["id"]), {})} for s in sources]


@contextlib.asynccontextmanager
async def webhook_gateway(
    tmp_path: Path,
    store: Mosquitto,
    hq: Mosquitto,
    overrides: dict[str, dict[str, Any]] | None = None,
    journal: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway with the three sources (secrets from the environment, as in production) and a client;
    ``journal`` adds settings to the config's ``journal`` section."""
    path = write_config(
        tmp_path / "store.yaml", store_port=store.port, hq_port=hq.port, data_dir=tmp_path / "data"
    )
    yaml = YAML(typ="safe", pure=True)
    doc = yaml.load(path.read_text(encoding="utf-8"))
    doc["drivers"].append({"type": "http", "name": "webhooks", "sources": _sources(overrides or {})})
    doc.setdefault("journal", {}).update(journal or {})
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(doc, fh)
    env = {
        TOKEN_ENV: API_TOKEN,
        "LS_SECRET": SECRETS["ls-main"],
        "SQ_SECRET": SECRETS["sq-main"],
        "WEB_SECRET": SECRETS["web-shop"],
    }
    async with running_gateway(load_config(path, env=env)) as gateway:
        port = await gateway.wait_api()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            yield gateway, client


async def post(
    client: httpx.AsyncClient, source: str, webhook: Webhook, secret: str | None = None
) -> httpx.Response:
    """POST ``webhook`` signed as the real service signs it (``secret`` overrides the right one)."""
    fmt = FORMATS[source]
    signed = headers(
        fmt,
        secret or SECRETS[source],
        webhook,
        SQUARE_URL if fmt == "square" else None,
        signed_at=int(time.time()),
    )
    return await client.post(f"/webhooks/{source}", content=webhook.body, headers=signed)


def sale_for(source: str, n: int, lines: Sequence[tuple[Any, int]]) -> Webhook:
    if source == "ls-main":
        return lightspeed_sale(f"00000000-0000-4000-8000-{n:012d}", 1000 + n, REGISTER, "cashier-7", lines)
    if source == "sq-main":
        return square_order(f"ORDER{n:020d}", "LDEMO01", lines)
    return generic_sale(f"W-{n}", "web-01", lines)


def on_hand(gateway: Gateway, sku: str) -> Decimal:
    return read_ledger(gateway.config.data_dir)[sku]


async def test_good_sales_commit_and_move_stock(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        for n, source in enumerate(FORMATS, start=1):
            reply = await post(client, source, sale_for(source, n, [(WATER, 2), (TEA, 1)]))
            assert (reply.status_code, reply.json()) == (200, {"status": "committed", "events": 1})
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == 3
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 6
        assert on_hand(gateway, TEA.sku) == INITIAL_ON_HAND - 3
        events = (await client.get("/api/events", params={"kind": "pos.sale"}, headers=AUTH)).json()
        assert sorted(e["device_id"] for e in events) == sorted(FORMATS)


async def test_a_return_puts_stock_back(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        assert (await post(client, "ls-main", sale_for("ls-main", 1, [(WATER, 3)]))).status_code == 200
        assert (await post(client, "ls-main", sale_for("ls-main", 2, [(WATER, -1)]))).status_code == 200
        assert journal_kinds(gateway.config.data_dir)["pos.return"] == 1
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 2


async def test_replays_are_answered_200_and_change_nothing(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        for source in FORMATS:
            webhook = sale_for(source, 7, [(WATER, 1)])
            replies = [await post(client, source, webhook) for _ in range(3)]
            assert [r.status_code for r in replies] == [200, 200, 200]
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == 3
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 3
        assert metric_sum(own_metrics(gateway), "storegw_messages_duplicate_total", driver="webhooks") == 6


async def test_a_later_update_of_a_closed_lightspeed_sale_is_a_replay(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        sale_id = "00000000-0000-4000-8000-000000000042"
        parked = lightspeed_sale(sale_id, 42, REGISTER, "c-1", [(TEA, 2)], status="SAVED")
        reply = await post(client, "ls-main", parked)
        assert (reply.status_code, reply.json()["status"]) == (200, "ignored")
        closed = lightspeed_sale(sale_id, 42, REGISTER, "c-1", [(TEA, 2)])
        paid_later = lightspeed_sale(sale_id, 42, REGISTER, "c-1", [(TEA, 2)], status="ONACCOUNT_CLOSED")
        assert (await post(client, "ls-main", closed)).status_code == 200
        assert (await post(client, "ls-main", paid_later)).status_code == 200
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == 1
        assert on_hand(gateway, TEA.sku) == INITIAL_ON_HAND - 2
        assert metric_sum(own_metrics(gateway), "storegw_messages_dropped_total", reason="ignored") == 1


async def test_bad_or_missing_signature_is_401_and_only_noted(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        webhook = sale_for("sq-main", 1, [(WATER, 1)])
        wrong = await post(client, "sq-main", webhook, secret="not-the-signature-key")
        assert (wrong.status_code, wrong.json()["reason"]) == (401, "bad_signature")
        unsigned = await client.post("/webhooks/web-shop", content=sale_for("web-shop", 1, [(WATER, 1)]).body)
        assert (unsigned.status_code, unsigned.json()["reason"]) == (401, "no_signature")
        await poll_until(lambda: len(read_quarantine(gateway.config.data_dir)) == 2, "two quarantine notes")
        notes = read_quarantine(gateway.config.data_dir)
        assert [(n["device_id"], n["reason"]) for n in notes] == [
            ("sq-main", "bad_signature"),
            ("web-shop", "no_signature"),
        ]
        assert [bytes(n["payload"]) for n in notes] == [
            b"",
            b"",
        ]  # the body of an unauthenticated request is not kept
        assert notes[0]["size"] == len(webhook.body)
        assert "pos.sale" not in journal_kinds(gateway.config.data_dir)
        metrics = own_metrics(gateway)
        assert metric_sum(metrics, "storegw_messages_dropped_total", reason="bad_signature") == 1
        assert metric_sum(metrics, "storegw_messages_dropped_total", reason="no_signature") == 1


async def test_webhooks_need_no_bearer_token_but_the_api_still_does(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (_, client):
        assert (await client.get("/api/events")).status_code == 401
        assert (await client.post("/webhooks/no-such-source", content=b"{}")).status_code == 404


async def test_malformed_bodies_are_400_and_quarantined_with_the_reason(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    bad = {
        "web-shop": Webhook(b'{"kind": "pos.sale", "receipt_no": ', "application/json", ()),
        "ls-main": Webhook(
            b"payload=%7B%22id%22%3A5%7D&type=sale.update", "application/x-www-form-urlencoded", ()
        ),
        "sq-main": Webhook(
            b'{"type": "order.updated", "created_at": "%s", "data": {"object": {"order": []}}}'
            % datetime.now(UTC).isoformat().encode(),
            "application/json",
            (),
        ),
    }
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        for source, webhook in bad.items():
            reply = await post(client, source, webhook)
            assert (reply.status_code, reply.json()["status"]) == (400, "quarantined")
        await poll_until(
            lambda: len(read_quarantine(gateway.config.data_dir)) == 3, "three quarantined bodies"
        )
        rows = read_quarantine(gateway.config.data_dir)
        assert [(r["device_id"], r["reason"]) for r in rows] == [
            ("web-shop", "not_json"),
            ("ls-main", "invalid"),
            ("sq-main", "invalid"),
        ]
        assert [bytes(r["payload"]) for r in rows] == [
            w.body for w in bad.values()
        ]  # signed: kept for debugging


async def test_duplicate_keys_are_400_and_quarantined(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    sale = sale_for("web-shop", 1, [(WATER, 1)]).body
    assert sale.startswith(b'{"kind":"pos.sale",')
    as_return = sale[:-1] + b',"kind":"pos.return","original_receipt_no":"W-0"}'  # the last kind would win
    form = sale_for("ls-main", 1, [(WATER, 1)]).body
    bad = {
        "web-shop": Webhook(as_return, "application/json", ()),
        "ls-main": Webhook(form + b"&type=product.update", "application/x-www-form-urlencoded", ()),
    }
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        for source, webhook in bad.items():
            reply = await post(client, source, webhook)
            assert (reply.status_code, reply.json()["reason"]) == (400, "duplicate_key"), reply.text
        await poll_until(lambda: len(read_quarantine(gateway.config.data_dir)) == 2, "two quarantined bodies")
        assert [r["reason"] for r in read_quarantine(gateway.config.data_dir)] == ["duplicate_key"] * 2
        assert not {"pos.sale", "pos.return"} & set(journal_kinds(gateway.config.data_dir))
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND
        # Counted once the writer has published the commit, a moment after the rows are visible to a reader.
        await poll_until(
            lambda: (
                metric_sum(own_metrics(gateway), "storegw_messages_quarantined_total", reason="duplicate_key")
                == 2
            ),
            "the two quarantined bodies counted",
            state=lambda: own_metrics(gateway),
        )


async def test_oversized_bodies_are_413(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(
        tmp_path, store_broker, hq_broker, {"web-shop": {"max_payload_bytes": 2048}}
    ) as (
        gateway,
        client,
    ):
        lines = [(item, 1) for item in CATALOG] * 2
        over_source_limit = sale_for("web-shop", 1, lines)
        assert len(over_source_limit.body) > 2048
        reply = await post(client, "web-shop", over_source_limit)
        assert (reply.status_code, reply.json()["status"]) == (413, "too_large")
        over_api_limit = Webhook(b" " * (513 * 1024), "application/json", ())
        assert (await post(client, "web-shop", over_api_limit)).status_code == 413
        await poll_until(
            lambda: len(read_quarantine(gateway.config.data_dir)) == 1, "the too_large quarantine"
        )
        assert read_quarantine(gateway.config.data_dir)[0]["reason"] == "too_large"
        assert "pos.sale" not in journal_kinds(gateway.config.data_dir)


async def test_a_flood_is_rate_limited_with_429_and_other_sources_are_unaffected(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    limits = {"rate_limit_per_s": 2, "rate_burst": 2}
    async with webhook_gateway(tmp_path, store_broker, hq_broker, {"web-shop": limits}) as (gateway, client):
        flood = [sale_for("web-shop", n, [(WATER, 1)]) for n in range(40)]  # 10x the burst plus the rate
        replies = await asyncio.gather(*(post(client, "web-shop", w) for w in flood))
        others = [await post(client, "ls-main", sale_for("ls-main", n, [(TEA, 1)])) for n in range(10)]
        codes = [r.status_code for r in replies]
        assert set(codes) == {200, 429}
        limited = [r for r in replies if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" for r in limited)
        assert [r.status_code for r in others] == [200] * 10
        accepted = codes.count(200)
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == accepted + 10
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - accepted
        assert on_hand(gateway, TEA.sku) == INITIAL_ON_HAND - 10
        metrics = own_metrics(gateway)
        assert metric_sum(metrics, "storegw_messages_dropped_total", reason="rate_limited") == len(limited)
        devices = {d["device_id"]: d for d in (await client.get("/api/devices", headers=AUTH)).json()}
        assert (devices["web-shop"]["status"], devices["web-shop"]["rate_limited"]) == (
            "rate_limited",
            len(limited),
        )
        assert devices["ls-main"]["status"] == "online"


async def test_the_simulator_is_accepted_replays_included(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        for source, fmt in FORMATS.items():
            args = argparse.Namespace(
                gateway=str(client.base_url),
                source=source,
                format=fmt,
                notification_url=SQUARE_URL if fmt == "square" else None,
                count=12,
                rate=1000.0,
                replay_ratio=0.3,
                return_ratio=0.2,
                seed=3,
            )
            assert await simulate(args, SECRETS[source]) == 0
        assert "replay 200" in capsys.readouterr().out
        assert journal_kinds(gateway.config.data_dir).get("pos.sale", 0) > 0


async def test_a_default_source_takes_the_profiles_payload_limit(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    # The X-Series profile allows 512 KiB (firmware_configs/profiles/webhook-lightspeed-x-series.yaml), not the
    # 64 KiB DeviceLimits default: a big sale is taken, not answered 413 forever.
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        big = sale_for("ls-main", 1, [(item, 1) for item in CATALOG] * 10)
        assert 100 * 1024 < len(big.body) < 512 * 1024
        reply = await post(client, "ls-main", big)
        assert (reply.status_code, reply.json()) == (200, {"status": "committed", "events": 1})
        assert journal_kinds(gateway.config.data_dir)["pos.sale"] == 1
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 10


async def test_an_event_the_journal_quarantines_is_not_answered_committed(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    # Within the source's limit (64 KiB), over the journal's (1 KiB): the journal keeps it in quarantine.
    async with webhook_gateway(tmp_path, store_broker, hq_broker, journal={"max_payload_bytes": 1024}) as (
        gateway,
        client,
    ):
        webhook = sale_for("web-shop", 1, [(item, 1) for item in CATALOG])
        assert 1024 < len(webhook.body) < 64 * 1024
        replies = [await post(client, "web-shop", webhook) for _ in range(2)]
        assert [(r.status_code, r.json()["status"]) for r in replies] == [(422, "quarantined")] * 2
        rows = read_quarantine(gateway.config.data_dir)
        assert [(r["device_id"], r["reason"]) for r in rows] == [("web-shop", "too_large")] * 2
        assert "pos.sale" not in journal_kinds(gateway.config.data_dir)
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND
        small = await post(client, "web-shop", sale_for("web-shop", 2, [(WATER, 1)]))
        assert (small.status_code, small.json()["status"]) == (200, "committed")


async def test_a_flood_of_bad_signatures_leaves_a_bounded_number_of_notes(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        webhook = sale_for("web-shop", 1, [(WATER, 1)])
        started = asyncio.get_running_loop().time()
        replies = [await post(client, "web-shop", webhook, secret="not-the-secret-at-all") for _ in range(50)]
        elapsed = asyncio.get_running_loop().time() - started
        assert {r.status_code for r in replies} == {401}
        await gateway.journal.flush()
        notes = read_quarantine(gateway.config.data_dir)
        # The bucket: NOTE_BURST at once, NOTE_RATE_PER_S after that (one more for the refill at the edges).
        assert NOTE_BURST <= len(notes) <= NOTE_BURST + math.ceil(elapsed * NOTE_RATE_PER_S) + 1
        assert all(bytes(n["payload"]) == b"" for n in notes)
        metrics = own_metrics(gateway)
        assert metric_sum(metrics, "storegw_messages_dropped_total", reason="bad_signature") == 50


async def test_a_chunked_body_without_content_length_is_taken(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        webhook = sale_for("sq-main", 1, [(WATER, 2)])
        signed = headers("square", SECRETS["sq-main"], webhook, SQUARE_URL)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(webhook.body), 100):
                yield webhook.body[start : start + 100]

        request = client.build_request("POST", "/webhooks/sq-main", content=chunks(), headers=signed)
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        reply = await client.send(request)
        assert (reply.status_code, reply.json()) == (200, {"status": "committed", "events": 1})
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 2


async def test_an_exchange_whose_return_is_rate_limited_commits_on_the_retry(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    limits = {"rate_limit_per_s": 1, "rate_burst": 2}
    async with webhook_gateway(tmp_path, store_broker, hq_broker, {"ls-main": limits}) as (gateway, client):
        assert (await post(client, "ls-main", sale_for("ls-main", 1, [(TEA, 1)]))).status_code == 200
        exchange = sale_for("ls-main", 2, [(WATER, 1), (TEA, -1)])  # a sale and a return: one token left
        limited = await post(client, "ls-main", exchange)
        assert (limited.status_code, limited.json()["status"]) == (429, "rate_limited")
        retry_after = int(limited.headers["retry-after"])
        replies: list[httpx.Response] = []

        async def retried() -> bool:
            await asyncio.sleep(retry_after)
            replies.append(await post(client, "ls-main", exchange))
            return replies[-1].status_code == 200

        await poll_until(retried, "the retried exchange committed")
        assert replies[-1].json() == {"status": "committed", "events": 2}
        assert {r.status_code for r in replies[:-1]} <= {429}
        kinds = journal_kinds(gateway.config.data_dir)
        assert (kinds["pos.sale"], kinds["pos.return"]) == (2, 1)  # the sale of the first try is not doubled
        assert on_hand(gateway, WATER.sku) == INITIAL_ON_HAND - 1
        assert on_hand(gateway, TEA.sku) == INITIAL_ON_HAND
