"""The POS simulator: its messages follow the event contract, add up, and reach a real mosquitto."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import pydantic
import pytest

from gateway.kernel.config import BrokerConfig
from gateway.kernel.events import LineItem, PosReturn, PosSale
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from simulators.catalog import CATALOG, CATALOG_BY_SKU, format_cents, gtin_check_digit, is_valid_gtin
from simulators.pos import (
    HKT,
    TOO_LARGE_BYTES,
    PosMessage,
    PosTerminal,
    SimulationResult,
    garbage_messages,
    run_terminals,
    simulate_main,
)
from tests.harness.brokers import Mosquitto, free_port

FIXED = datetime(2024, 3, 1, 12, 0, tzinfo=HKT)


def _fixed_clock() -> datetime:
    return FIXED


def _cfg(broker: Mosquitto, protocol: str = "5") -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, protocol=protocol)


def _body(message: PosMessage | bytes | bytearray) -> dict[str, Any]:
    payload = message.payload if isinstance(message, PosMessage) else message
    body: dict[str, Any] = orjson.loads(payload)
    return body


def _validate(action: str, body: dict[str, Any]) -> PosSale:
    """Validate as the gateway would: the JSON of PosSale/PosReturn, after taking occurred_at off."""
    rest = {k: v for k, v in body.items() if k != "occurred_at"}
    model = PosReturn if action == "return" else PosSale
    return model.model_validate_json(orjson.dumps(rest))


def _deltas_of(messages: Sequence[tuple[str, bytes]]) -> dict[str, int]:
    """Stock deltas recomputed from what went over the wire: a sale takes stock out, a return puts it back."""
    deltas: dict[str, int] = {}
    for action, payload in messages:
        sign = 1 if action == "return" else -1
        for line in _body(payload)["lines"]:
            deltas[line["sku"]] = deltas.get(line["sku"], 0) + sign * line["quantity"]
    return deltas


# --- catalog -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gtin",
    [
        "4006381333931",  # EAN-13 worked example, Wikipedia "International Article Number"
        "036000291452",  # UPC-A worked example, Wikipedia "Universal Product Code"
        "80614141123458",  # GTIN-14 of the SGTIN-96 worked example, GS1 EPC Tag Data Standard
        "96385074",  # EAN-8 example, Wikipedia "EAN-8"
    ],
)
def test_gtin_check_digit_matches_published_examples(gtin: str) -> None:
    assert gtin_check_digit(gtin[:-1]) == int(gtin[-1])
    assert is_valid_gtin(gtin)
    wrong = gtin[:-1] + str((int(gtin[-1]) + 1) % 10)
    assert not is_valid_gtin(wrong)


def test_gtin_rejects_non_digits() -> None:
    assert not is_valid_gtin("40063813339x1")
    assert not is_valid_gtin("12345")
    with pytest.raises(ValueError):
        gtin_check_digit("12a4")


def test_catalog_has_the_demo_skus_with_valid_gtins() -> None:
    assert [item.sku for item in CATALOG] == [f"SKU-{n:04d}" for n in range(1, 21)]
    assert len({item.gtin for item in CATALOG}) == 20
    assert len({item.name for item in CATALOG}) == 20
    for item in CATALOG:
        assert len(item.gtin) == 13
        assert item.gtin.startswith("489")  # GS1 Hong Kong
        assert is_valid_gtin(item.gtin)
        assert item.unit_price_cents > 0
        assert Decimal(item.unit_price) * 100 == item.unit_price_cents
        LineItem(sku=item.sku, gtin=item.gtin, quantity=Decimal(1), unit_price=Decimal(item.unit_price))
    assert CATALOG_BY_SKU["SKU-0007"] is CATALOG[6]


def test_format_cents() -> None:
    cases = {0: "0.00", 5: "0.05", 1250: "12.50", 100000: "1000.00", -305: "-3.05"}
    assert {cents: format_cents(cents) for cents in cases} == cases


# --- PosTerminal ---------------------------------------------------------------------------------------


def _generate(n: int, **kwargs: Any) -> tuple[PosTerminal, list[PosMessage]]:
    terminal = PosTerminal("till-01", **kwargs)
    return terminal, [terminal.next_message() for _ in range(n)]


def test_generated_messages_validate_against_the_event_models() -> None:
    _, messages = _generate(2000, seed=7, return_ratio=0.3)
    actions = Counter(m.action for m in messages)
    assert actions["sale"] > 0
    assert actions["return"] > 0
    for message in messages:
        body = _body(message)
        model = _validate(message.action, body)
        assert model.receipt_no == message.receipt_no
        assert model.register_id == "till-01"
        assert model.currency == "HKD"
        assert 1 <= len(model.lines) <= 4
        assert all(1 <= line.quantity <= 3 for line in model.lines)
        assert len({line.sku for line in model.lines}) == len(model.lines)
        occurred = datetime.fromisoformat(body["occurred_at"])
        assert occurred.utcoffset() is not None
        assert message.kind == ("pos.return" if message.action == "return" else "pos.sale")
        if message.action == "return":
            assert isinstance(model, PosReturn)
            assert model.original_receipt_no is not None
            assert len(model.lines) == 1
        else:
            assert "original_receipt_no" not in body


def test_money_is_strings_and_quantities_are_numbers_on_the_wire() -> None:
    _, messages = _generate(200, seed=3)
    for message in messages:
        body = _body(message)
        assert isinstance(body["totals"]["total"], str)
        for line in body["lines"]:
            assert isinstance(line["quantity"], int)
            assert isinstance(line["unit_price"], str)
            assert "." in line["unit_price"]
        for payment in body["payments"]:
            assert isinstance(payment["amount"], str)


def test_totals_and_payments_add_up() -> None:
    _, messages = _generate(2000, seed=11, return_ratio=0.2)
    discounted = 0
    for message in messages:
        model = _validate(message.action, _body(message))
        lines_sum = sum((line.quantity * line.unit_price - line.discount for line in model.lines), Decimal(0))
        assert model.totals.subtotal == lines_sum
        assert model.totals.tax == 0  # Hong Kong has no sales tax
        assert model.totals.total == model.totals.subtotal + model.totals.tax
        assert sum((p.amount for p in model.payments), Decimal(0)) == model.totals.total
        for line in model.lines:
            item = CATALOG_BY_SKU[line.sku]
            assert line.unit_price == Decimal(item.unit_price)
            assert line.gtin in (None, item.gtin)
            assert 0 <= line.discount < line.quantity * line.unit_price
            discounted += line.discount > 0
    assert discounted > 0


def test_returns_refer_to_earlier_sales_and_never_exceed_them() -> None:
    _, messages = _generate(3000, seed=5, return_ratio=0.25)
    sold: dict[tuple[str, str], int] = {}
    returned: Counter[tuple[str, str]] = Counter()
    for message in messages:
        body = _body(message)
        if message.action == "sale":
            for line in body["lines"]:
                sold[(message.receipt_no, line["sku"])] = line["quantity"]
            continue
        (line,) = body["lines"]
        key = (body["original_receipt_no"], line["sku"])
        assert key in sold, "a return must be of an item of an earlier sale of this terminal"
        returned[key] += line["quantity"]
        assert returned[key] <= sold[key]
        assert body["reason"]


def test_expected_deltas_match_the_payloads() -> None:
    terminal, messages = _generate(1500, seed=2, return_ratio=0.3)
    wire = [(m.action, m.payload) for m in messages]
    assert terminal.expected_deltas == _deltas_of(wire)
    per_message: dict[str, int] = {}
    for message in messages:
        for sku, delta in message.deltas:
            per_message[sku] = per_message.get(sku, 0) + delta
    assert per_message == terminal.expected_deltas
    assert set(terminal.expected_deltas) <= set(CATALOG_BY_SKU)


def test_return_ratio_is_roughly_honoured() -> None:
    _, none = _generate(500, seed=1, return_ratio=0.0)
    assert all(m.action == "sale" for m in none)
    _, messages = _generate(5000, seed=1)
    share = sum(m.action == "return" for m in messages) / len(messages)
    assert 0.07 < share < 0.13
    with pytest.raises(ValueError):
        PosTerminal("till-01", return_ratio=1.5)


def test_same_seed_same_messages() -> None:
    kwargs: dict[str, Any] = {"seed": 42, "receipt_prefix": "till-01-run", "clock": _fixed_clock}
    _, first = _generate(300, **kwargs)
    _, second = _generate(300, **kwargs)
    assert first == second
    _, other = _generate(300, **{**kwargs, "seed": 43})
    assert [m.payload for m in other] != [m.payload for m in first]


def test_receipt_numbers_are_unique_within_and_across_runs() -> None:
    _, run1 = _generate(1000, seed=1)
    _, run2 = _generate(1000, seed=1)  # same seed, a new run: the nonce keeps receipts apart
    receipts = [m.receipt_no for m in run1 + run2]
    assert len(set(receipts)) == len(receipts)
    assert all(r.startswith("till-01-") and len(r) <= 64 for r in receipts)
    # Same content apart from the receipt numbers.
    assert [m.deltas for m in run1] == [m.deltas for m in run2]
    _, pinned = _generate(3, receipt_prefix="T9")
    assert [m.receipt_no for m in pinned] == ["T9-1", "T9-2", "T9-3"]
    with pytest.raises(ValueError):
        PosTerminal("x" * 60)


def test_clock_none_leaves_occurred_at_out() -> None:
    _, messages = _generate(10, seed=1, clock=None)
    assert all("occurred_at" not in _body(m) for m in messages)
    _, fixed = _generate(1, seed=1, clock=_fixed_clock)
    assert _body(fixed[0])["occurred_at"] == "2024-03-01T12:00:00.000+08:00"


# --- bad input -----------------------------------------------------------------------------------------


def test_garbage_messages_are_what_they_say() -> None:
    bad = list(garbage_messages())
    reasons = Counter(b.reason for b in bad)
    assert set(reasons) == {"not_json", "not_utf8", "not_object", "invalid", "too_large"}
    assert reasons["invalid"] >= 6
    receipts: list[str] = []
    for action, payload, reason in bad:
        assert action in ("sale", "return")
        assert isinstance(payload, bytes)
        if reason == "not_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(payload)
        elif reason == "not_utf8":
            with pytest.raises(UnicodeDecodeError):
                payload.decode()
            # Well-formed apart from the encoding: a lenient decoder would accept it.
            assert isinstance(json.loads(payload.decode("latin-1")), dict)
        elif reason == "not_object":
            assert not isinstance(orjson.loads(payload), dict)
        elif reason == "invalid":
            body = orjson.loads(payload)
            assert isinstance(body, dict)
            with pytest.raises(pydantic.ValidationError):
                _validate(action, body)
            if isinstance(body.get("receipt_no"), str):
                receipts.append(body["receipt_no"])
        else:
            assert len(payload) == TOO_LARGE_BYTES
            assert isinstance(orjson.loads(payload), dict)
    assert len(receipts) == len(set(receipts))


def test_garbage_covers_the_named_cases() -> None:
    bodies = [orjson.loads(b.payload) for b in garbage_messages() if b.reason == "invalid"]
    assert any(
        isinstance(b.get("lines"), list) and b["lines"] and b["lines"][0]["quantity"] == "abc" for b in bodies
    )
    assert any(isinstance(b.get("lines"), str) for b in bodies)
    assert any("receipt_no" not in b for b in bodies)
    assert any("lines" not in b for b in bodies)
    assert any(
        isinstance(b.get("lines"), list) and b["lines"] and b["lines"][0]["quantity"] == -2 for b in bodies
    )


# --- run_terminals against mosquitto -------------------------------------------------------------------


class _Collector:
    """on_message for a test subscriber: keeps the messages and wakes a waiter when enough arrived."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._want = 0
        self._enough = asyncio.Event()

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if len(self.messages) >= self._want:
            self._enough.set()

    async def wait_for_count(self, count: int) -> None:
        self._want = count
        self._enough.clear()
        if len(self.messages) < count:
            async with asyncio.timeout(20):
                await self._enough.wait()


async def _subscriber(broker: Mosquitto, collector: _Collector, topic: str = "store/pos/+/+") -> MqttClient:
    client = MqttClient(_cfg(broker), "test-counter", clean_start=True, on_message=collector)
    await client.connect()
    await client.subscribe([(topic, 1)])
    return client


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_run_terminals_publishes_every_message(store_broker: Mosquitto, protocol: str) -> None:
    collector = _Collector()
    sub = await _subscriber(store_broker, collector)
    seen: list[PosMessage] = []
    devices = ["till-01", "till-02", "till-03"]
    result = await run_terminals(
        _cfg(store_broker, protocol),
        devices,
        count_per_terminal=400,
        seed=9,
        max_inflight=50,
        on_publish=seen.append,
    )
    await collector.wait_for_count(1200)
    await asyncio.sleep(0.1)  # nothing more may arrive
    await sub.disconnect()
    got = collector.messages

    assert len(got) == 1200
    assert result.total == 1200
    assert result.failed == 0
    assert result.errors == {}
    assert len(seen) == 1200
    assert result.first_publish_monotonic is not None
    assert result.last_puback_monotonic is not None
    assert result.last_puback_monotonic >= result.first_publish_monotonic
    assert result.rate > 0

    wire: list[tuple[str, bytes]] = []
    per_device: Counter[str] = Counter()
    for m in got:
        _, _, device, action = m.topic.split("/")
        assert action in ("sale", "return")
        assert m.qos == 1
        body = _body(m.payload)
        assert body["register_id"] == device
        _validate(action, body)
        per_device[device] += 1
        wire.append((action, bytes(m.payload)))
    assert per_device == dict.fromkeys(devices, 400)
    kinds = Counter("pos.return" if action == "return" else "pos.sale" for action, _ in wire)
    assert result.published == dict(kinds)
    assert sorted(result.receipts) == sorted(_body(p)["receipt_no"] for _, p in wire)
    assert len(set(result.receipts)) == 1200
    assert result.expected_deltas == _deltas_of(wire)


async def test_run_terminals_custom_topic_and_duration(store_broker: Mosquitto) -> None:
    collector = _Collector()
    client = await _subscriber(store_broker, collector, "shop/#")
    result = await run_terminals(
        _cfg(store_broker),
        ["a", "b"],
        duration_s=0.5,
        rate_per_s=20,
        topic_template="shop/{action}/{device_id}",
    )
    # The schedule allows at most 0.5 s x 20/s + 1 messages per terminal, however slow the machine.
    assert 2 <= result.total <= 22
    await collector.wait_for_count(result.total)
    await client.disconnect()
    got = collector.messages
    assert len(got) == result.total
    assert {m.topic.split("/")[2] for m in got} <= {"a", "b"}
    assert {m.topic.split("/")[1] for m in got} <= {"sale", "return"}


async def test_run_terminals_counts_only_acknowledged_messages(store_broker: Mosquitto) -> None:
    """The broker dies mid-run: each terminal stops, and the result holds only what was acknowledged."""
    seen: list[PosMessage] = []

    def on_publish(message: PosMessage) -> None:
        seen.append(message)
        if len(seen) == 300:
            store_broker.stop()

    result = await run_terminals(
        _cfg(store_broker), ["till-01", "till-02"], count_per_terminal=100_000, seed=1, on_publish=on_publish
    )
    assert set(result.errors) == {"till-01", "till-02"}
    assert all("connection lost" in e or "not connected" in e for e in result.errors.values())
    assert 300 <= result.total < 200_000
    assert result.total == len(seen) == len(result.receipts)
    assert result.receipts == [m.receipt_no for m in seen]
    deltas: dict[str, int] = {}
    for message in seen:
        for sku, delta in message.deltas:
            deltas[sku] = deltas.get(sku, 0) + delta
    assert result.expected_deltas == deltas


async def test_run_terminals_refused_connection_raises() -> None:
    with pytest.raises(MqttError):
        await run_terminals(BrokerConfig(port=free_port()), ["till-01"], count_per_terminal=1)


async def test_run_terminals_rejects_bad_arguments() -> None:
    cfg = BrokerConfig()
    with pytest.raises(ValueError):
        await run_terminals(cfg, ["till-01"])
    with pytest.raises(ValueError):
        await run_terminals(cfg, ["till-01", "till-01"], count_per_terminal=1)
    with pytest.raises(ValueError):
        await run_terminals(cfg, ["till-01"], count_per_terminal=1, max_inflight=0)


def test_simulation_result_rate_without_messages() -> None:
    result = SimulationResult()
    assert result.total == 0
    assert result.elapsed_s == 0.0
    assert result.rate == 0.0


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_runs_and_prints_a_summary(store_broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pos", "--host", store_broker.host, "--port", str(store_broker.port), "--terminals", "2"]
    assert simulate_main([*argv, "--count", "30", "--rate", "0", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 messages acknowledged" in out
    assert "2 terminals" in out

    assert simulate_main([*argv, "--count", "10", "--rate", "0", "--json", "--device-ids", "t1,t2,t3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["published"].values()) == 30
    assert summary["failed"] == 0
    assert set(summary["expected_deltas"]) <= set(CATALOG_BY_SKU)


def test_cli_reports_an_unreachable_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["pos", "--port", str(free_port()), "--count", "1"]) == 1
    assert "cannot connect" in capsys.readouterr().err


async def test_the_sensors_command_publishes_every_reading_as_sensor_reading(store_broker: Mosquitto) -> None:
    """``store-gateway simulate sensors``: each sensor's readings, QoS 1, valid ``sensor.reading`` payloads."""
    from gateway.kernel.events import SensorReading
    from simulators.sensors import main as sensors_main

    collector = _Collector()
    sub = await _subscriber(store_broker, collector, topic="store/sensor/+/reading")
    args = [
        "--port",
        str(store_broker.port),
        "--device-ids",
        "probe-01,probe-02",
        "--count",
        "5",
        "--rate",
        "0",
    ]
    code = await asyncio.to_thread(sensors_main, args)
    await collector.wait_for_count(10)
    await sub.disconnect()
    assert code == 0
    per_device = Counter(m.topic.split("/")[2] for m in collector.messages)
    assert per_device == {"probe-01": 5, "probe-02": 5}
    for m in collector.messages:
        body = orjson.loads(m.payload)
        body.pop("occurred_at")
        SensorReading.model_validate(body)
