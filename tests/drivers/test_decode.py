"""The pure MQTT decoder: topic routing, payload validation, reason codes, and the draft it produces.

Vectors are hand-written from the contracts in gateway/kernel/events.py (PosSale, PosReturn, ID_PATTERN) and
drivers/mqtt/config.py (TopicRoute); the property tests check that no input can make the decoder raise.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.mqtt.config import MqttDriverConfig, TopicRoute
from drivers.mqtt.decode import Decoded, Rejection, TopicRouter, decode_message
from gateway.kernel.events import MAX_LINE_ITEMS, PosReturn, PosSale
from gateway.kernel.model import ID_PATTERN

SALE_TOPIC = "store/pos/{device_id}/sale"
RETURN_TOPIC = "store/pos/{device_id}/return"
KNOWN = frozenset({"pos1", "pos-2"})
REASONS = {"unknown_topic", "bad_device_id", "unknown_device", "too_large", "not_json", "invalid"}


def make_config(**overrides: Any) -> MqttDriverConfig:
    routes = [
        TopicRoute(pattern=SALE_TOPIC, kind="pos.sale"),
        TopicRoute(pattern=RETURN_TOPIC, kind="pos.return"),
    ]
    return MqttDriverConfig(routes=routes, **overrides)


def make_router(**overrides: Any) -> TopicRouter:
    return TopicRouter(make_config(**overrides), KNOWN)


def sale(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "receipt_no": "R-0001",
        "register_id": "REG1",
        "cashier_id": "S042",
        "currency": "HKD",
        "lines": [
            {"sku": "TEA-100G", "gtin": "4890008100309", "quantity": 2, "unit_price": "38.50"},
            {"sku": "RICE-KG", "quantity": "1.5", "unit_price": 12.5, "discount": "1.25"},
        ],
        "totals": {"subtotal": "94.75", "tax": "0", "total": "94.75"},
        "payments": [{"method": "card", "amount": "94.75"}],
        "occurred_at": "2024-05-01T10:15:30.250+08:00",
    }
    body.update(changes)
    return body


def line(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"sku": "A", "quantity": 1, "unit_price": "1"}
    item.update(changes)
    return item


def decode(
    body: dict[str, Any] | bytes, topic: str = "store/pos/pos1/sale", **overrides: Any
) -> Decoded | Rejection:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode_message(make_router(**overrides), topic, payload)


def rejected(result: Decoded | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason in REASONS
    return result


def decoded(result: Decoded | Rejection) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


# --- topic routing --------------------------------------------------------------------------------


def test_routes_sale_and_return_templates() -> None:
    router = make_router()
    assert router.route("store/pos/pos1/sale") == ("pos.sale", "pos1")
    assert router.route("store/pos/pos-2/return") == ("pos.return", "pos-2")


def test_device_id_is_taken_from_its_own_level() -> None:
    config = MqttDriverConfig(
        routes=[TopicRoute(pattern="chain/{device_id}/pos/sales", kind="pos.sale")], unknown_devices="accept"
    )
    router = TopicRouter(config, frozenset())
    assert router.route("chain/till.07/pos/sales") == ("pos.sale", "till.07")
    assert isinstance(router.route("chain/till.07/pos/sale"), Rejection)


@pytest.mark.parametrize(
    "topic",
    [
        "store/pos/pos1/refund",
        "store/pos/pos1",
        "store/pos/pos1/sale/extra",
        "other/pos/pos1/sale",
        "store/pos//sale",
        "/store/pos/pos1/sale",
        "store/pos/a/b/sale",
        "",
        "store.pos/pos1/sale",
    ],
)
def test_unknown_topic(topic: str) -> None:
    result = make_router(unknown_devices="accept").route(topic)
    assert isinstance(result, Rejection)
    assert result.reason == "unknown_topic"
    assert result.device_id is None
    assert repr(topic) in result.detail


def test_template_dots_are_literal() -> None:
    config = MqttDriverConfig(routes=[TopicRoute(pattern="store.pos/{device_id}/sale", kind="pos.sale")])
    router = TopicRouter(config, KNOWN)
    assert router.route("store.pos/pos1/sale") == ("pos.sale", "pos1")
    assert rejected(decode_message(router, "storeXpos/pos1/sale", b"{}")).reason == "unknown_topic"


def test_unknown_topic_detail_is_bounded() -> None:
    result = make_router().route("x/" * 5000)
    assert isinstance(result, Rejection)
    assert result.reason == "unknown_topic"
    assert len(result.detail) < 300


def test_unknown_device_is_quarantined_by_default() -> None:
    result = make_router().route("store/pos/pos9/sale")
    assert result == Rejection("unknown_device", "device 'pos9' is not configured", "pos9")


def test_unknown_device_accepted_when_configured() -> None:
    assert make_router(unknown_devices="accept").route("store/pos/pos9/sale") == ("pos.sale", "pos9")


@pytest.mark.parametrize("accept", ["quarantine", "accept"])
@pytest.mark.parametrize(
    "device_id",
    [
        "a+b",
        "#",
        "+",
        "x y",
        "a" * 200,
        "a" * 65,
        "-lead",
        ".lead",
        "_lead",
        "収銀1",
        "tab\there",
        "nul\x00",
        "a\u200bb",
    ],
)
def test_invalid_device_ids(device_id: str, accept: str) -> None:
    result = make_router(unknown_devices=accept).route(f"store/pos/{device_id}/sale")
    assert isinstance(result, Rejection)
    assert result.reason == "bad_device_id"
    assert result.device_id is None
    assert repr(device_id[:80]) in result.detail
    assert len(result.detail) < 120


@pytest.mark.parametrize("device_id", ["a", "A1", "a" * 64, "till.07", "pos_3", "9-x", "a.b_c-d"])
def test_valid_device_ids(device_id: str) -> None:
    assert re.fullmatch(ID_PATTERN, device_id)
    assert make_router(unknown_devices="accept").route(f"store/pos/{device_id}/sale") == (
        "pos.sale",
        device_id,
    )


def test_device_id_with_trailing_newline_is_invalid() -> None:
    """Python's '$' also matches before a final newline: the id check must match the whole id."""
    result = make_router(unknown_devices="accept").route("store/pos/pos1\n/sale")
    assert isinstance(result, Rejection)
    assert result.reason == "bad_device_id"


def test_topic_with_trailing_newline_is_unknown() -> None:
    """Same '$' trap for the route regexes."""
    result = make_router().route("store/pos/pos1/sale\n")
    assert isinstance(result, Rejection)
    assert result.reason == "unknown_topic"


def test_first_matching_route_wins() -> None:
    config = MqttDriverConfig(
        routes=[
            TopicRoute(pattern="s/{device_id}/x", kind="pos.return"),
            TopicRoute(pattern="s/{device_id}/x", kind="pos.sale"),
        ]
    )
    assert TopicRouter(config, KNOWN).route("s/pos1/x") == ("pos.return", "pos1")


# --- route config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "store/pos/sale",
        "store/{device_id}/{device_id}",
        "store/x{device_id}/sale",
        "store/{device_id}x/sale",
        "/store/{device_id}",
        "store/{device_id}/",
        "store//{device_id}",
        "store/+/{device_id}",
        "store/{device_id}/#",
        "x" * 190 + "/{device_id}",
    ],
)
def test_bad_route_templates_are_refused(pattern: str) -> None:
    with pytest.raises(ValidationError):
        TopicRoute(pattern=pattern, kind="pos.sale")


def test_route_subscription_and_level() -> None:
    route = TopicRoute(pattern="store/pos/{device_id}/sale", kind="pos.sale")
    assert route.subscription == "store/pos/+/sale"
    assert route.device_level == 2


def test_router_takes_payload_limit_from_config() -> None:
    assert make_router(max_payload_bytes=1000).max_payload == 1000


# --- payload checks -------------------------------------------------------------------------------


def test_valid_sale() -> None:
    result = decoded(decode(sale()))
    assert result.kind == "pos.sale"
    assert result.device_id == "pos1"
    assert isinstance(result.data, PosSale)
    assert not isinstance(result.data, PosReturn)
    assert result.data.receipt_no == "R-0001"
    assert result.data.lines[1].quantity == Decimal("1.5")
    assert result.data.lines[0].unit_price == Decimal("38.50")


def test_valid_return() -> None:
    body = sale(original_receipt_no="R-0000", reason="damaged")
    result = decoded(decode(body, "store/pos/pos-2/return"))
    assert result.kind == "pos.return"
    assert isinstance(result.data, PosReturn)
    assert result.data.original_receipt_no == "R-0000"
    assert result.dedup_key == '["pos-2","pos.return","REG1","R-0001"]'
    assert orjson.loads(result.data_json)["reason"] == "damaged"


def test_return_fields_are_refused_on_a_sale() -> None:
    result = rejected(decode(sale(original_receipt_no="R-0000")))
    assert result.reason == "invalid"
    assert "original_receipt_no" in result.detail


def test_minimal_sale() -> None:
    body = {
        "receipt_no": "1",
        "register_id": "1",
        "currency": "EUR",
        "lines": [line()],
        "totals": {"subtotal": 1, "total": 1},
    }
    result = decoded(decode(body))
    assert result.occurred_at is None
    assert result.data.payments == []
    assert result.data.cashier_id is None


def test_payload_at_limit_is_checked_and_over_limit_is_too_large() -> None:
    at_limit = rejected(decode(b" " * 256, max_payload_bytes=256))
    assert at_limit.reason == "not_json"
    over = rejected(decode(b" " * 257, max_payload_bytes=256))
    assert over == Rejection("too_large", "257 bytes > limit 256", "pos1")


def test_valid_sale_over_limit_is_too_large() -> None:
    payload = json.dumps(sale(lines=[line(sku=f"SKU-{i}") for i in range(100)])).encode()
    assert len(payload) > 1024
    assert rejected(decode(payload, max_payload_bytes=1024)).reason == "too_large"
    assert isinstance(decode(payload, max_payload_bytes=len(payload)), Decoded)


def test_topic_is_checked_before_payload() -> None:
    assert rejected(decode(b"x" * 100_000, "nope/pos1")).reason == "unknown_topic"
    assert rejected(decode(b"not json", "store/pos/pos9/sale")).reason == "unknown_device"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b"not json",
        b"{",
        b'{"receipt_no": }',
        b"\xff\xfe",
        b"\x00",
        b"{'a': 1}",
        b"[" * 5000,
        b"{}}",
    ],
)
def test_not_json(payload: bytes) -> None:
    result = rejected(decode(payload))
    assert result.reason == "not_json"
    assert result.device_id == "pos1"
    assert result.detail.startswith("(message): Invalid JSON")


def test_not_utf8_inside_a_string() -> None:
    payload = json.dumps(sale(receipt_no="RXX")).encode().replace(b"RXX", b"R\xff\xfe")
    result = rejected(decode(payload))
    assert result.reason == "not_json"


def test_utf16_payload_is_not_json() -> None:
    assert rejected(decode(json.dumps(sale()).encode("utf-16"))).reason == "not_json"


@pytest.mark.parametrize("payload", [b"[]", b"[{}]", b"null", b"1", b'"sale"', b"true"])
def test_json_that_is_not_an_object(payload: bytes) -> None:
    result = rejected(decode(payload))
    assert result.reason == "invalid"
    assert result.detail == "(message): Input should be an object"


def test_missing_fields_are_all_named() -> None:
    result = rejected(decode({}))
    assert result.reason == "invalid"
    for name in ("receipt_no", "register_id", "currency", "lines", "totals"):
        assert f"{name}: Field required" in result.detail
    assert "more" not in result.detail


def test_wrong_types_list_five_errors_and_count_the_rest() -> None:
    body = {
        "receipt_no": 1,
        "register_id": [],
        "cashier_id": 7,
        "currency": 5,
        "lines": {},
        "totals": "x",
        "payments": 3,
    }
    result = rejected(decode(body))
    assert result.reason == "invalid"
    assert result.detail.count("; ") == 5
    assert result.detail.endswith("; and 2 more")
    assert result.detail.startswith("receipt_no: Input should be a valid string")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lines": [line(quantity=0)]}, "lines.0.quantity: Input should be greater than 0"),
        ({"lines": [line(quantity=-1)]}, "lines.0.quantity: Input should be greater than 0"),
        ({"lines": [line(quantity="-0.001")]}, "lines.0.quantity: Input should be greater than 0"),
        (
            {"lines": [line(quantity=1_000_001)]},
            "lines.0.quantity: Input should be less than or equal to 1000000",
        ),
        ({"lines": [line(quantity="abc")]}, "lines.0.quantity: Input should be a valid decimal"),
        ({"lines": [line(quantity=True)]}, "lines.0.quantity: Decimal input should be"),
        ({"lines": [line(quantity="NaN")]}, "lines.0.quantity: Input should be a finite number"),
        ({"lines": [line(unit_price="Infinity")]}, "lines.0.unit_price: Input should be a finite number"),
        ({"lines": [line(unit_price="-Infinity")]}, "lines.0.unit_price: Input should be a finite number"),
        ({"lines": [line(unit_price=10**11)]}, "lines.0.unit_price: Input should be less than or equal to"),
        ({"lines": [line(sku="")]}, "lines.0.sku: String should have at least 1 character"),
        ({"lines": [line(sku="has space")]}, "lines.0.sku: String should match pattern"),
        ({"lines": [line(sku="x" * 65)]}, "lines.0.sku: String should have at most 64 characters"),
        ({"lines": [line(gtin="12345")]}, "lines.0.gtin: String should match pattern"),
        ({"lines": [line(colour="red")]}, "lines.0.colour: Extra inputs are not permitted"),
        ({"lines": []}, "lines: List should have at least 1 item"),
        ({"currency": "hkd"}, "currency: String should match pattern '^[A-Z]{3}$'"),
        ({"currency": "HKDX"}, "currency: String should match pattern"),
        ({"currency": "HK"}, "currency: String should match pattern"),
        ({"receipt_no": ""}, "receipt_no: String should have at least 1 character"),
        ({"receipt_no": "r" * 65}, "receipt_no: String should have at most 64 characters"),
        ({"payments": [{"method": "iou", "amount": 1}]}, "payments.0.method: Input should be 'cash'"),
        ({"payments": [{"method": "cash", "amount": 1}] * 21}, "payments: List should have at most 20 items"),
        ({"totals": {"subtotal": 1}}, "totals.total: Field required"),
        ({"customer_name": "Chan Tai Man"}, "customer_name: Extra inputs are not permitted"),
        ({"occurred_at": "2024-05-01T10:15:30"}, "occurred_at: Input should have timezone info"),
        ({"occurred_at": "yesterday"}, "occurred_at: Input should be a valid datetime"),
    ],
)
def test_invalid_payloads(changes: dict[str, Any], expected: str) -> None:
    result = rejected(decode(sale(**changes)))
    assert result.reason == "invalid"
    assert result.device_id == "pos1"
    assert expected in result.detail
    assert "pydantic.dev" not in result.detail
    assert len(result.detail) < 1000


def test_negative_discount_is_invalid() -> None:
    """The discount's own ge=0 must not be overridden by the Money bounds."""
    result = rejected(decode(sale(lines=[line(discount=-1)])))
    assert result.detail == "lines.0.discount: Input should be greater than or equal to 0"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
@pytest.mark.parametrize("field", ["quantity", "unit_price"])
def test_non_finite_json_numbers_are_invalid(literal: bytes, field: str) -> None:
    body = json.dumps(sale(lines=[line(**{field: "@@"})])).encode().replace(b'"@@"', literal)
    result = rejected(decode(body))
    assert result.reason == "invalid"
    assert f"lines.0.{field}" in result.detail


def test_nan_in_totals_is_invalid() -> None:
    body = json.dumps(sale(totals={"subtotal": 1.0, "total": float("nan")})).encode()
    assert b"NaN" in body
    result = rejected(decode(body))
    assert result.reason == "invalid"
    assert "totals.total: Input should be a finite number" in result.detail


def test_max_line_items() -> None:
    assert isinstance(decode(sale(lines=[line()] * MAX_LINE_ITEMS)), Decoded)
    result = rejected(decode(sale(lines=[line()] * (MAX_LINE_ITEMS + 1))))
    assert result.reason == "invalid"
    assert result.detail == "lines: List should have at most 500 items after validation, not 501"


def test_many_bad_lines_give_a_bounded_detail() -> None:
    result = rejected(decode(sale(lines=[line(quantity=-1, unit_price="x", currency=1)] * 400)))
    assert result.reason == "invalid"
    assert result.detail.endswith("; and 1195 more")
    assert len(result.detail) < 1000


@pytest.mark.parametrize(
    "key", ["k" * 5000, "evil\nINFO fake log line", "\x1b[31mred"], ids=["long", "newline", "escape"]
)
def test_detail_is_bounded_and_printable_whatever_the_keys(key: str) -> None:
    """An unknown key is part of the error location: the sender chose it (log injection, huge details)."""
    result = rejected(decode(sale(**{key: 1})))
    assert result.reason == "invalid"
    assert len(result.detail) <= 300
    assert result.detail.isprintable()
    assert result.detail.endswith(": Extra inputs are not permitted")


def test_detail_of_many_long_unknown_keys_is_bounded() -> None:
    body = sale(**{f"{i}" + "k" * 3000: 1 for i in range(50)})
    result = rejected(decode(body, max_payload_bytes=4 * 1024 * 1024))
    assert result.detail.endswith("; and 45 more")
    assert len(result.detail) <= 1500


# --- occurred_at ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("2024-05-01T10:15:30.250+08:00", "2024-05-01T10:15:30.250+08:00"),
        ("2024-05-01T10:15:30Z", "2024-05-01T10:15:30.000+00:00"),
        ("2024-05-01T10:15:30.123456-05:30", "2024-05-01T10:15:30.123-05:30"),
        ("2024-05-01T10:15:30.999999+00:00", "2024-05-01T10:15:30.999+00:00"),
    ],
)
def test_aware_occurred_at_keeps_the_device_offset(sent: str, kept: str) -> None:
    assert decoded(decode(sale(occurred_at=sent))).occurred_at == kept


def test_occurred_at_null_is_none() -> None:
    assert decoded(decode(sale(occurred_at=None))).occurred_at is None


def test_naive_occurred_at_is_invalid() -> None:
    result = rejected(decode(sale(occurred_at="2024-05-01 10:15:30")))
    assert result.reason == "invalid"
    assert result.detail == "occurred_at: Input should have timezone info"


# --- the draft data -------------------------------------------------------------------------------


def test_data_json_excludes_occurred_at_and_validates_as_the_payload() -> None:
    result = decoded(decode(sale()))
    data = orjson.loads(result.data_json)
    assert "occurred_at" not in data
    expected = sale()
    del expected["occurred_at"]
    assert PosSale.model_validate_json(result.data_json) == PosSale.model_validate(expected)


def test_return_data_json_validates_as_pos_return() -> None:
    result = decoded(decode(sale(original_receipt_no="R-0000"), "store/pos/pos1/return"))
    assert PosReturn.model_validate_json(result.data_json).original_receipt_no == "R-0000"


def test_money_and_quantities_are_strings_without_float_noise() -> None:
    body = sale(
        lines=[line(quantity=0.1, unit_price=0.3, discount=0.2), line(quantity="1.500", unit_price=19.9)],
        totals={"subtotal": 0.3, "tax": 0.03, "total": 0.33},
        payments=[{"method": "cash", "amount": 0.33}],
    )
    data = orjson.loads(decoded(decode(body)).data_json)
    assert data["lines"][0] == {
        "sku": "A",
        "gtin": None,
        "quantity": "0.1",
        "unit_price": "0.3",
        "discount": "0.2",
    }
    assert data["lines"][1]["quantity"] == "1.500"
    assert data["lines"][1]["unit_price"] == "19.9"
    assert data["totals"] == {"subtotal": "0.3", "tax": "0.03", "total": "0.33"}
    assert data["payments"] == [{"method": "cash", "amount": "0.33"}]


def test_data_json_has_defaults_filled_in() -> None:
    data = orjson.loads(decoded(decode(sale(lines=[line()], payments=[]))).data_json)
    assert data["lines"][0]["discount"] == "0"
    assert data["lines"][0]["gtin"] is None
    assert data["payments"] == []


def test_decoded_is_immutable() -> None:
    result = decoded(decode(sale()))
    with pytest.raises(AttributeError):
        result.kind = "pos.return"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        result.data.receipt_no = "other"  # type: ignore[misc]


# --- dedup key ------------------------------------------------------------------------------------


def test_dedup_key_format() -> None:
    assert decoded(decode(sale(receipt_no="R/42 b"))).dedup_key == '["pos1","pos.sale","REG1","R/42 b"]'
    assert (
        decoded(decode(sale(), "store/pos/pos-2/return")).dedup_key
        == '["pos-2","pos.return","REG1","R-0001"]'
    )


def test_dedup_key_is_unambiguous() -> None:
    first = decoded(decode(sale(register_id="A/B", receipt_no="C")))
    second = decoded(decode(sale(register_id="A", receipt_no="B/C")))
    assert first.dedup_key != second.dedup_key


def test_dedup_key_separates_devices_and_kinds() -> None:
    keys = {
        decoded(decode(sale(), "store/pos/pos1/sale")).dedup_key,
        decoded(decode(sale(), "store/pos/pos-2/sale")).dedup_key,
        decoded(decode(sale(), "store/pos/pos1/return")).dedup_key,
    }
    assert len(keys) == 3


def test_dedup_key_ignores_occurred_at_and_content() -> None:
    first = decoded(decode(sale()))
    again = decoded(decode(sale(occurred_at="2030-01-01T00:00:00Z", cashier_id="S999")))
    assert first.dedup_key == again.dedup_key


def test_same_receipt_number_on_two_registers_are_different_sales() -> None:
    """receipt_no is unique per register, so the register is part of the key."""
    first = decoded(decode(sale(register_id="REG1")))
    second = decoded(decode(sale(register_id="REG2")))
    assert first.dedup_key != second.dedup_key


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"quantity": "1E-999990"}, "lines.0.quantity: Value error, at most 3 decimal places"),
        ({"quantity": "0.0004"}, "lines.0.quantity: Value error, at most 3 decimal places"),
        ({"quantity": [0, [1], -999999999]}, "lines.0.quantity: Value error, at most 3 decimal places"),
    ],
)
def test_absurd_precision_is_invalid(changes: dict[str, Any], expected: str) -> None:
    """A 30-byte '1E-999990' would otherwise become a megabyte of on-hand text in stock.level."""
    result = rejected(decode(sale(lines=[line(**changes)])))
    assert result.detail == expected


@pytest.mark.parametrize(
    ("changes", "kept"),
    [
        ({"quantity": "0.001"}, "0.001"),
        ({"quantity": "1E+6"}, "1E+6"),
        ({"unit_price": "0.00001"}, "0.00001"),
    ],
)
def test_precision_at_the_limits_is_valid(changes: dict[str, Any], kept: str) -> None:
    data = orjson.loads(decoded(decode(sale(lines=[line(**changes)]))).data_json)
    assert data["lines"][0][next(iter(changes))] == kept


def test_trailing_zeros_do_not_count_as_decimal_places() -> None:
    assert isinstance(decode(sale(lines=[line(quantity="1.5000")])), Decoded)


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("quantity", [None, None, None]),
        ("unit_price", [2, [1], 0]),
        ("discount", [0, [10], 0]),
        ("total", [None, None, None]),
        ("amount", [None, None, None]),
    ],
)
def test_three_item_array_as_a_number_is_rejected_not_raised(where: str, bad: list[Any]) -> None:
    """pydantic passes a 3-item array to Decimal((sign, digits, exp)) (pydantic#12284), which can raise a
    bare ValueError; found by test_random_sale_shaped_json_never_raises."""
    if where == "total":
        body = sale(totals={"subtotal": 1, "total": bad})
    elif where == "amount":
        body = sale(payments=[{"method": "cash", "amount": bad}])
    else:
        body = sale(lines=[line(**{where: bad})])
    result = rejected(decode(body))
    assert result.reason == "invalid"
    assert result.detail.isprintable()


# --- properties: nothing makes the decoder raise --------------------------------------------------


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "1E-9999", "1e400", "-0", "2024-05-01T10:00:00+08:00", "HKD", "cash"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)
SALE_KEYS = st.sampled_from(
    [
        "receipt_no",
        "register_id",
        "cashier_id",
        "currency",
        "lines",
        "totals",
        "payments",
        "occurred_at",
        "reason",
    ]
)
SALE_SHAPED = st.dictionaries(SALE_KEYS, JSON_VALUES, max_size=9) | st.builds(
    lambda changes: sale(**changes), st.dictionaries(SALE_KEYS, JSON_VALUES, max_size=3)
)
LINE_SHAPED = st.builds(
    lambda fields: sale(lines=[line(**fields)]),
    st.dictionaries(
        st.sampled_from(["sku", "gtin", "quantity", "unit_price", "discount"]), JSON_VALUES, max_size=5
    ),
)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUTER = make_router()
ACCEPTING_ROUTER = make_router(unknown_devices="accept", max_payload_bytes=4096)


def check_result(result: Decoded | Rejection, topic: str) -> None:
    if isinstance(result, Rejection):
        assert result.reason in REASONS
        assert isinstance(result.detail, str)
        assert result.detail
        assert result.detail.isprintable()
        assert len(result.detail) <= 2100
        return
    assert isinstance(result, Decoded)
    assert result.kind in ("pos.sale", "pos.return")
    assert f"/{result.device_id}/" in topic
    assert (
        result.dedup_key
        == orjson.dumps(
            (result.device_id, result.kind, result.data.register_id, result.data.receipt_no)
        ).decode()
    )
    data = orjson.loads(result.data_json)
    assert "occurred_at" not in data
    PosReturn.model_validate(data) if result.kind == "pos.return" else PosSale.model_validate(data)


@PROPERTY_SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(payload: bytes) -> None:
    for topic in ("store/pos/pos1/sale", "store/pos/pos1/return"):
        check_result(decode_message(ROUTER, topic, payload), topic)


@PROPERTY_SETTINGS
@given(JSON_VALUES, st.booleans())
def test_random_json_never_raises(value: Any, as_return: bool) -> None:
    topic = "store/pos/pos1/return" if as_return else "store/pos/pos1/sale"
    check_result(decode_message(ROUTER, topic, json.dumps(value).encode()), topic)


@PROPERTY_SETTINGS
@given(SALE_SHAPED | LINE_SHAPED, st.booleans())
def test_random_sale_shaped_json_never_raises(value: dict[str, Any], as_return: bool) -> None:
    topic = "store/pos/pos1/return" if as_return else "store/pos/pos1/sale"
    check_result(decode_message(ROUTER, topic, json.dumps(value).encode()), topic)


@PROPERTY_SETTINGS
@given(st.text(max_size=300))
def test_random_topics_never_raise(topic: str) -> None:
    for router in (ROUTER, ACCEPTING_ROUTER):
        result = decode_message(router, topic, json.dumps(sale()).encode())
        check_result(result, topic)
        if isinstance(result, Rejection):
            assert len(result.detail) <= 2100


@PROPERTY_SETTINGS
@given(st.text(min_size=1, max_size=100), st.sampled_from(["sale", "return"]))
def test_random_device_levels_never_raise(device: str, suffix: str) -> None:
    topic = f"store/pos/{device}/{suffix}"
    result = decode_message(ACCEPTING_ROUTER, topic, json.dumps(sale()).encode())
    check_result(result, topic)
    if isinstance(result, Decoded):
        assert re.match(ID_PATTERN, result.device_id)


def test_an_integer_beyond_64_bits_where_a_decimal_goes_is_rejected() -> None:
    """Found by hypothesis: pydantic raised OverflowError (not a ValidationError) for this quantity."""
    value = sale(lines=[line(sku=None, gtin=None, quantity=[9223372036854775808, None, None])])
    result = decode_message(ROUTER, "store/pos/pos1/sale", json.dumps(value).encode())
    assert isinstance(result, Rejection)
    assert result.reason == "invalid"
