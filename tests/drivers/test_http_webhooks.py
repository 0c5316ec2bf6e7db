"""Pure tests of the HTTP webhook intake: signatures per scheme, the three mappers, the config, and hypothesis
runs proving that random bodies and headers raise nothing but DecodeError."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.base import DecodeError
from drivers.http.config import HttpDriverConfig, HttpSource, Window
from drivers.http.freshness import check, square_signed_at
from drivers.http.generic import map_generic
from drivers.http.lightspeed import map_lightspeed
from drivers.http.mapped import Ignored, Mapped, Outcome
from drivers.http.signatures import sign, signed_timestamp, verify
from drivers.http.square import map_square
from gateway.kernel.events import PosReturn
from simulators.catalog import CATALOG
from simulators.webhooks import generic_sale, lightspeed_sale, square_order

# --- signatures -------------------------------------------------------------------------------------------

# square-python-sdk tests/utilities/test_webhooks_helper.py (Square's own SDK test vector).
SQ_BODY = (
    b'{"merchant_id":"MLEFBHHSJGVHD","type":"webhooks.test_notification",'
    b'"event_id":"ac3ac95b-f97d-458c-a6e6-18981597e05f","created_at":"2022-07-13T20:30:59.037339943Z",'
    b'"data":{"type":"webhooks","id":"bc368e64-01aa-407e-b46e-3231809b1129"}}'
)
SQ_SIGNATURE = "GF4YkrJgGBDZ9NIYbNXBnMzqb2HoL4RW/S6vkZ9/2N4="
SQ_KEY = "Ibxx_5AKakO-3qeNVR61Dw"
SQ_URL = "https://webhook.site/679a4f3a-dcfa-49ee-bac5-9d0edad886b9"

# docs.github.com "Validating webhook deliveries", section "Testing the webhook payload validation".
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# Derived (the X-Series docs give no example): the GitHub vector's HMAC in X-Series' header format.
LS_SIGNATURE = (
    "signature=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17, algorithm=HMAC-SHA256"
)


def test_square_sdk_vector_verifies() -> None:
    verify("square", SQ_KEY, SQ_SIGNATURE, SQ_BODY, SQ_URL)


def test_square_sign_reproduces_the_sdk_vector() -> None:
    assert sign("square", SQ_KEY, SQ_BODY, SQ_URL) == SQ_SIGNATURE


@pytest.mark.parametrize(
    ("key", "header", "body", "url"),
    [
        # The SDK's negative cases: URL, key, header and body each changed.
        (SQ_KEY, SQ_SIGNATURE, SQ_BODY, "https://webhook.site/79a4f3a-dcfa-49ee-bac5-9d0edad886b9"),
        ("MCmhFRxGX82xMwg5FsaoQA", SQ_SIGNATURE, SQ_BODY, SQ_URL),
        (SQ_KEY, "1z2n3DEJJiUPKcPzQo1ftvbxGdw=", SQ_BODY, SQ_URL),
        (SQ_KEY, SQ_SIGNATURE, SQ_BODY.replace(b"2022-07-13", b"2022-06-13"), SQ_URL),
        (SQ_KEY, SQ_SIGNATURE.lower(), SQ_BODY, SQ_URL),  # base64 is case-sensitive
    ],
)
def test_square_mismatches_are_bad_signatures(key: str, header: str, body: bytes, url: str) -> None:
    with pytest.raises(DecodeError) as caught:
        verify("square", key, header, body, url)
    assert caught.value.reason == "bad_signature"


def test_github_docs_vector_verifies_as_generic() -> None:
    verify("generic", GH_SECRET, GH_SIGNATURE, GH_BODY)


def test_generic_sign_reproduces_the_github_vector() -> None:
    assert sign("generic", GH_SECRET, GH_BODY) == GH_SIGNATURE


def test_generic_hex_case_does_not_matter() -> None:
    verify("generic", GH_SECRET, GH_SIGNATURE.upper().replace("SHA256=", "sha256="), GH_BODY)


def test_generic_other_body_is_a_bad_signature() -> None:
    with pytest.raises(DecodeError) as caught:
        verify("generic", GH_SECRET, GH_SIGNATURE, b"Hello, World?")
    assert caught.value.reason == "bad_signature"


def test_generic_without_the_sha256_prefix_is_no_signature() -> None:
    with pytest.raises(DecodeError) as caught:
        verify("generic", GH_SECRET, GH_SIGNATURE.removeprefix("sha256="), GH_BODY)
    assert caught.value.reason == "no_signature"


def test_lightspeed_vector_verifies() -> None:
    verify("lightspeed", GH_SECRET, LS_SIGNATURE, GH_BODY)


def test_lightspeed_sign_gives_the_header_format() -> None:
    assert sign("lightspeed", GH_SECRET, GH_BODY) == LS_SIGNATURE


def test_lightspeed_parameters_in_any_order() -> None:
    verify("lightspeed", GH_SECRET, "algorithm=hmac-sha256,signature=" + LS_SIGNATURE[10:74], GH_BODY)


def test_lightspeed_other_algorithm_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        verify("lightspeed", GH_SECRET, LS_SIGNATURE.replace("HMAC-SHA256", "MD5"), GH_BODY)
    assert caught.value.reason == "no_signature"


def test_lightspeed_without_signature_parameter_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        verify("lightspeed", GH_SECRET, "algorithm=HMAC-SHA256", GH_BODY)
    assert caught.value.reason == "no_signature"


@pytest.mark.parametrize("header", [None, "", "   ", "sha256=é", "x" * 2000])
def test_missing_or_unreadable_header_is_no_signature(header: str | None) -> None:
    with pytest.raises(DecodeError) as caught:
        verify("generic", GH_SECRET, header, GH_BODY)
    assert caught.value.reason == "no_signature"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["generic", "lightspeed", "square"]),
    header=st.none() | st.text(max_size=200),
    body=st.binary(max_size=300),
)
def test_verify_raises_only_decode_error(fmt: Any, header: str | None, body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        verify(fmt, "secret-1234", header, body, "https://example.com/hook")


# --- Lightspeed X-Series ----------------------------------------------------------------------------------

REGISTER = "b1e198a9-f019-11e3-a0f5-b8ca3a64f8f4"
SALE_ID = "0a6f6e36-8b1a-11e7-f43a-0e7a1d1b5a8e"
WATER, TEA = CATALOG[0], CATALOG[1]


def _ls(sale: dict[str, Any], kind: str = "sale.update") -> bytes:
    return urlencode({"payload": json.dumps(sale), "type": kind, "domain_prefix": "demo"}).encode()


def _ls_sale(**changes: Any) -> dict[str, Any]:
    """A register sale shaped like the X-Series API 0.9 register_sales resource."""
    sale: dict[str, Any] = {
        "id": SALE_ID,
        "register_id": REGISTER,
        "user_id": "b1ed6d2f-f019-11e3-a0f5-b8ca3a64f8f4",
        "sale_date": "2017-08-01 04:51:25",
        "status": "CLOSED",
        "invoice_number": 1042,
        "total_price": 26.09,
        "total_tax": 3.91,
        "register_sale_products": [
            {
                "product_id": "p-1",
                "sku": "SKU-0001",
                "quantity": 2,
                "price": 13.045,
                "tax": 1.955,
                "discount": "0.5",
            }
        ],
        "register_sale_payments": [{"name": "Cash", "label": "Cash", "amount": 30}],
    }
    sale.update(changes)
    return sale


def _events(outcome: Outcome) -> list[Mapped]:
    assert not isinstance(outcome, Ignored), outcome
    return outcome


def test_lightspeed_closed_sale_maps_to_pos_sale() -> None:
    (event,) = _events(map_lightspeed(_ls(_ls_sale()), "HKD"))
    sale = event.data
    assert (event.kind, event.identity, sale.receipt_no, sale.register_id) == (
        "pos.sale",
        SALE_ID,
        "1042",
        REGISTER,
    )
    assert event.occurred_at == "2017-08-01T04:51:25.000+00:00"  # X-Series times are UTC
    line = sale.lines[0]
    assert (line.sku, line.quantity, line.unit_price, line.discount) == (
        "SKU-0001",
        Decimal(2),
        Decimal("15.000"),
        Decimal(1),
    )
    assert (sale.totals.subtotal, sale.totals.tax, sale.totals.total) == (
        Decimal("26.09"),
        Decimal("3.91"),
        Decimal("30.00"),
    )
    assert [(p.method, p.amount) for p in sale.payments] == [("cash", Decimal(30))]


def test_lightspeed_line_without_sku_uses_product_id() -> None:
    products = [{"product_id": "p-9", "quantity": "1", "price": "5", "tax": "0"}]
    (event,) = _events(map_lightspeed(_ls(_ls_sale(register_sale_products=products)), "HKD"))
    assert event.data.lines[0].sku == "p-9"


def test_lightspeed_negative_quantities_are_a_return() -> None:
    products = [{"product_id": "p-1", "sku": "SKU-0001", "quantity": -1, "price": 11.5, "tax": 0}]
    sale = _ls_sale(register_sale_products=products, total_price=-11.5, total_tax=0, return_for="orig-sale")
    sale["register_sale_payments"] = [{"name": "Cash", "amount": -11.5}]
    (event,) = _events(map_lightspeed(_ls(sale), "HKD"))
    assert event.kind == "pos.return"
    assert isinstance(event.data, PosReturn)
    assert event.data.original_receipt_no == "orig-sale"
    assert (event.data.lines[0].quantity, event.data.totals.total) == (Decimal(1), Decimal("11.5"))
    assert [(p.method, p.amount) for p in event.data.payments] == [("cash", Decimal("11.5"))]


def test_lightspeed_exchange_is_a_sale_and_a_return() -> None:
    products = [
        {"product_id": "p-1", "sku": "SKU-0001", "quantity": 1, "price": 20, "tax": 0},
        {"product_id": "p-2", "sku": "SKU-0002", "quantity": -1, "price": 6.5, "tax": 0},
    ]
    sale, ret = _events(map_lightspeed(_ls(_ls_sale(register_sale_products=products)), "HKD"))
    assert (sale.kind, ret.kind) == ("pos.sale", "pos.return")
    assert (sale.data.totals.total, ret.data.totals.total) == (Decimal(20), Decimal("6.5"))
    assert sale.dedup_key("ls") != ret.dedup_key("ls")


@pytest.mark.parametrize("status", ["SAVED", "OPEN", "LAYBY", "ONACCOUNT", "VOIDED"])
def test_lightspeed_unfinished_sales_are_ignored(status: str) -> None:
    assert isinstance(map_lightspeed(_ls(_ls_sale(status=status)), "HKD"), Ignored)


def test_lightspeed_other_event_types_are_ignored() -> None:
    assert isinstance(map_lightspeed(_ls({"id": "x"}, "product.update"), "HKD"), Ignored)


def test_lightspeed_replayed_update_has_the_same_dedup_key() -> None:
    first = _events(map_lightspeed(_ls(_ls_sale()), "HKD"))[0]
    later = _events(map_lightspeed(_ls(_ls_sale(status="ONACCOUNT_CLOSED")), "HKD"))[0]
    assert first.dedup_key("ls-main") == later.dedup_key("ls-main")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not_form"),
        (b"type=sale.update", "invalid"),
        (b"payload=%7Bnot+json", "not_json"),
        (b"payload=%5B1%5D", "invalid"),
        (_ls(_ls_sale(register_sale_products="many")), "invalid"),
        (_ls(_ls_sale(register_sale_products=[])), "invalid"),
        (_ls(_ls_sale(invoice_number=None)), "invalid"),
        (_ls(_ls_sale(sale_date="yesterday")), "invalid"),
        (_ls(_ls_sale(register_sale_products=[{"product_id": "p", "quantity": "x", "price": 1}])), "invalid"),
        (b"&".join([b"a=1"] * 40), "not_form"),
    ],
)
def test_lightspeed_malformed_bodies_raise_decode_error(body: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        map_lightspeed(body, "HKD")
    assert caught.value.reason == reason


def test_lightspeed_simulator_body_maps() -> None:
    webhook = lightspeed_sale(SALE_ID, 7, REGISTER, "u-1", [(WATER, 2), (TEA, 1)])
    (event,) = _events(map_lightspeed(webhook.body, "HKD"))
    assert [(line.sku, line.quantity) for line in event.data.lines] == [
        ("SKU-0001", Decimal(2)),
        ("SKU-0002", Decimal(1)),
    ]


# --- Square -----------------------------------------------------------------------------------------------


def _sq_event(obj: dict[str, Any], kind: str = "order.updated") -> bytes:
    return json.dumps(
        {
            "merchant_id": "MLEFBHHSJGVHD",
            "type": kind,
            "event_id": "ac3ac95b-f97d-458c-a6e6-18981597e05f",
            "created_at": "2022-07-13T20:30:59.037339943Z",
            "data": {"type": "order", "id": "ORDER-1", "object": obj},
        }
    ).encode()


def _order(**changes: Any) -> dict[str, Any]:
    """An Orders API Order (developer.squareup.com/reference/square/objects/Order)."""
    order: dict[str, Any] = {
        "id": "CAISENgvlJ6jLWAzERDzjyHVybY",
        "location_id": "L88917AVBK2S5",
        "state": "COMPLETED",
        "line_items": [
            {
                "catalog_object_id": "SKU-0004",
                "quantity": "2",
                "base_price_money": {"amount": 2890, "currency": "HKD"},
                "total_discount_money": {"amount": 100, "currency": "HKD"},
                "total_money": {"amount": 5680, "currency": "HKD"},
            },
            {"quantity": "1", "base_price_money": {"amount": 500, "currency": "HKD"}},  # a custom amount
        ],
        "total_money": {"amount": 6180, "currency": "HKD"},
        "total_tax_money": {"amount": 0, "currency": "HKD"},
        "tenders": [{"type": "CARD", "amount_money": {"amount": 6180, "currency": "HKD"}}],
        "closed_at": "2022-07-13T20:30:59.037339943Z",
    }
    order.update(changes)
    return order


def test_square_completed_order_maps_to_pos_sale() -> None:
    (event,) = _events(map_square(_sq_event({"order": _order()})))
    sale = event.data
    assert (event.kind, sale.receipt_no, sale.register_id, sale.currency) == (
        "pos.sale",
        "CAISENgvlJ6jLWAzERDzjyHVybY",
        "L88917AVBK2S5",
        "HKD",
    )
    assert [(li.sku, li.quantity, li.unit_price, li.discount) for li in sale.lines] == [
        ("SKU-0004", Decimal(2), Decimal("28.90"), Decimal("1.00"))
    ]
    assert sale.totals.total == Decimal("61.80")
    assert [(p.method, p.amount) for p in sale.payments] == [("card", Decimal("61.80"))]
    assert event.occurred_at == "2022-07-13T20:30:59.037+00:00"


def test_square_register_id_from_config() -> None:
    (event,) = _events(map_square(_sq_event({"order": _order()}), register_id="till-web"))
    assert event.data.register_id == "till-web"


def test_square_zero_decimal_currency() -> None:
    items = [
        {"catalog_object_id": "A", "quantity": "1", "base_price_money": {"amount": 1500, "currency": "JPY"}}
    ]
    order = _order(line_items=items, total_money={"amount": 1500, "currency": "JPY"}, total_tax_money=None)
    (event,) = _events(map_square(_sq_event({"order": order})))
    assert event.data.lines[0].unit_price == 1500


def test_square_return_order_maps_to_pos_return() -> None:
    returned = {
        "source_order_id": "ORIGINAL-ORDER",
        "return_line_items": [
            {
                "catalog_object_id": "SKU-0004",
                "quantity": "1",
                "base_price_money": {"amount": 2890, "currency": "HKD"},
            }
        ],
    }
    order = _order(line_items=[], returns=[returned], total_money={"amount": -2890, "currency": "HKD"})
    (event,) = _events(map_square(_sq_event({"order": order})))
    assert event.kind == "pos.return"
    assert isinstance(event.data, PosReturn)
    assert (event.data.original_receipt_no, event.data.totals.total) == ("ORIGINAL-ORDER", Decimal("28.90"))


def test_square_order_summary_is_ignored() -> None:
    # What Square itself sends for order.updated (developer.squareup.com/reference/square/webhooks/order.updated).
    summary = {"order_updated": {"order_id": "X", "version": 3, "location_id": "L", "state": "COMPLETED"}}
    assert isinstance(map_square(_sq_event(summary)), Ignored)


@pytest.mark.parametrize("kind", ["payment.updated", "refund.created", "customer.created"])
def test_square_events_without_line_items_are_ignored(kind: str) -> None:
    assert isinstance(map_square(_sq_event({"payment": {"id": "P"}}, kind)), Ignored)


@pytest.mark.parametrize("state", ["OPEN", "CANCELED", "DRAFT"])
def test_square_unfinished_orders_are_ignored(state: str) -> None:
    assert isinstance(map_square(_sq_event({"order": _order(state=state)})), Ignored)


def test_square_custom_amounts_only_are_ignored() -> None:
    items = [{"quantity": "1", "base_price_money": {"amount": 500, "currency": "HKD"}}]
    assert isinstance(map_square(_sq_event({"order": _order(line_items=items)})), Ignored)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        orjson.dumps({"type": 5}),
        orjson.dumps({"type": "order.updated", "data": []}),
        _sq_event({"order": _order(state=None)}),
        _sq_event(
            {
                "order": _order(
                    line_items=[
                        {
                            "catalog_object_id": "A",
                            "quantity": "NaN",
                            "base_price_money": {"amount": 1, "currency": "HKD"},
                        }
                    ]
                )
            }
        ),
        _sq_event(
            {
                "order": _order(
                    line_items=[
                        {
                            "catalog_object_id": "A",
                            "quantity": "1",
                            "base_price_money": {"amount": "1", "currency": "HKD"},
                        }
                    ]
                )
            }
        ),
        _sq_event(
            {
                "order": _order(
                    line_items=[
                        {
                            "catalog_object_id": "A",
                            "quantity": "0",
                            "base_price_money": {"amount": 1, "currency": "HKD"},
                        }
                    ]
                )
            }
        ),
    ],
)
def test_square_malformed_bodies_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        map_square(body)


def test_square_simulator_body_maps() -> None:
    (event,) = _events(map_square(square_order("ORDER-9", "L1", [(WATER, 3)]).body))
    assert [(line.sku, line.quantity) for line in event.data.lines] == [("SKU-0001", Decimal(3))]


# --- generic ----------------------------------------------------------------------------------------------


def test_generic_sale_and_return() -> None:
    (sale,) = _events(map_generic(generic_sale("W-1", "web-01", [(WATER, 2)]).body))
    (ret,) = _events(map_generic(generic_sale("W-2", "web-01", [(WATER, -1)], "W-1").body))
    assert (sale.kind, sale.identity, sale.data.lines[0].quantity) == ("pos.sale", "W-1", Decimal(2))
    assert isinstance(ret.data, PosReturn)
    assert (ret.kind, ret.data.original_receipt_no) == ("pos.return", "W-1")
    assert sale.occurred_at is not None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        orjson.dumps({"kind": "pos.refund"}),
        orjson.dumps({"kind": "pos.sale", "receipt_no": "1"}),
        generic_sale("W-1", "web-01", [(WATER, 2)]).body.replace(b'"quantity":2', b'"quantity":-2'),
    ],
)
def test_generic_malformed_bodies_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        map_generic(body)


# --- property tests: nothing but DecodeError ------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


def _survives(outcome: Any) -> None:
    assert isinstance(outcome, Ignored | list)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=400))
def test_mappers_on_random_bytes_raise_only_decode_error(body: bytes) -> None:
    for mapper in (map_generic, lambda b: map_lightspeed(b, "HKD"), map_square):
        with contextlib.suppress(DecodeError):
            _survives(mapper(body))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=JSON,
    products=st.lists(
        st.dictionaries(st.sampled_from(["product_id", "sku", "quantity", "price", "tax", "discount"]), JSON),
        max_size=3,
    ),
)
def test_mappers_on_random_json_raise_only_decode_error(doc: Any, products: list[dict[str, Any]]) -> None:
    lightspeed = _ls_sale(register_sale_products=products)
    square = _order(line_items=[dict(p, base_price_money=doc) for p in products])
    bodies = [
        (map_generic, json.dumps(doc).encode()),
        (map_generic, json.dumps({"kind": "pos.sale", "lines": doc}).encode()),
        (lambda b: map_lightspeed(b, "HKD"), _ls(lightspeed)),
        (lambda b: map_lightspeed(b, "HKD"), _ls(doc if isinstance(doc, dict) else {"x": doc})),
        (map_square, _sq_event({"order": square})),
        (map_square, _sq_event({"order": doc})),
    ]
    for mapper, body in bodies:
        with contextlib.suppress(DecodeError):
            _survives(mapper(body))


DECIMAL_TEXT = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{1,4})?[eE][+-]?[0-9]{1,10}", fullmatch=True),
    st.sampled_from(["1e999999999", "-1e999999999", "1e-999999999", "9" * 20, "sNaN", "-Infinity", "0"]),
)
"""Decimal strings, the huge and tiny exponents included ("1e999999999" once overflowed Square's mapper)."""


def _with_number(doc: Any, text: str) -> list[bytes]:
    """``doc`` (JSON with the string "@N@" in places) with the number as a string and as a bare literal."""
    body = json.dumps(doc)
    return [body.replace('"@N@"', json.dumps(text)).encode(), body.replace('"@N@"', text).encode()]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(number=DECIMAL_TEXT, where=st.sampled_from(["quantity", "price", "tax", "discount"]))
def test_mappers_on_decimal_strings_raise_only_decode_error(number: str, where: str) -> None:
    line = {"product_id": "p-1", "sku": "SKU-0001", "quantity": 1, "price": 2, "tax": 0, "discount": 0}
    sale = _ls_sale(register_sale_products=[dict(line, **{where: "@N@"})], total_price="@N@")
    generic = orjson.loads(generic_sale("W-1", "web-01", [(WATER, 2)]).body)
    generic["lines"][0]["quantity" if where == "quantity" else "unit_price"] = "@N@"
    square_line = {"catalog_object_id": "SKU-0004", "quantity": number, "base_price_money": _money_of(2890)}
    priced = dict(square_line, quantity="2", base_price_money={"amount": "@N@", "currency": "HKD"})
    cases: list[tuple[Any, bytes]] = [(map_square, _sq_event({"order": _order(line_items=[square_line])}))]
    square = json.loads(_sq_event({"order": _order(line_items=[priced])}))
    cases += [(map_square, body) for body in _with_number(square, number)]
    cases += [(map_generic, body) for body in _with_number(generic, number)]
    cases += [
        (lambda b: map_lightspeed(b, "HKD"), _ls(json.loads(text)))
        for text in _with_number(sale, number)
        if _json_ok(text)
    ]
    for mapper, body in cases:
        with contextlib.suppress(DecodeError):
            _survives(mapper(body))


def _money_of(amount: int) -> dict[str, Any]:
    return {"amount": amount, "currency": "HKD"}


def _json_ok(text: bytes) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# --- config -----------------------------------------------------------------------------------------------


def _source(**fields: Any) -> dict[str, Any]:
    return {
        "id": "ls-main",
        "format": "lightspeed",
        "secret": "client-secret-123",
        "currency": "HKD",
        **fields,
    }


def test_config_defaults() -> None:
    config = HttpDriverConfig.model_validate({"type": "http", "sources": [_source()]})
    source = config.sources[0]
    assert (source.header, source.profile_name, config.name) == (
        "X-Signature",
        "webhook-lightspeed-x-series",
        "webhooks",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "square"}, "notification_url"),
        ({"currency": None}, "currency"),
        ({"secret": "short"}, "8 characters"),
        ({"id": "bad/id"}, "pattern"),
        ({"profile": "webhook-squar"}, "did you mean 'webhook-square'"),
    ],
)
def test_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HttpSource.model_validate(_source(**fields))


def test_config_duplicate_sources() -> None:
    with pytest.raises(ValidationError, match="duplicate"):
        HttpDriverConfig.model_validate({"type": "http", "sources": [_source(), _source()]})


# --- signed times and freshness -------------------------------------------------------------------------


def test_generic_signs_the_timestamp_with_the_body() -> None:
    # The message signed is "<timestamp>.<body>" (Stripe's construction): the GitHub vector's HMAC shows the
    # body alone is no longer what is signed once a timestamp is given.
    signature = sign("generic", GH_SECRET, GH_BODY, timestamp="1700000000")
    assert signature == sign("generic", GH_SECRET, b"1700000000." + GH_BODY)
    verify("generic", GH_SECRET, signature, GH_BODY, timestamp="1700000000")
    with pytest.raises(DecodeError, match="does not match") as err:
        verify("generic", GH_SECRET, signature, GH_BODY, timestamp="1700000001")
    assert err.value.reason == "bad_signature"
    with pytest.raises(DecodeError):
        verify("generic", GH_SECRET, GH_SIGNATURE, GH_BODY, timestamp="1700000000")


@pytest.mark.parametrize("header", [None, "", " ", "17e8", "-1", "1700000000.5", "１７", "9" * 13])
def test_an_unreadable_timestamp_header_is_no_timestamp(header: str | None) -> None:
    with pytest.raises(DecodeError) as err:
        signed_timestamp(header)
    assert err.value.reason == "no_timestamp"


def test_freshness_window_edges() -> None:
    window = Window(max_age_s=300, max_ahead_s=60)
    check(1000.0, 1300.0, window)
    check(1060.0, 1000.0, window)
    with pytest.raises(DecodeError) as err:
        check(1000.0, 1300.5, window)
    assert err.value.reason == "stale"
    with pytest.raises(DecodeError) as err:
        check(1061.0, 1000.0, window)
    assert err.value.reason == "ahead"


def test_square_created_at_is_its_signed_time() -> None:
    # SQ_BODY (Square's SDK vector) carries nanoseconds: read to the microsecond.
    assert square_signed_at(SQ_BODY) == pytest.approx(
        datetime(2022, 7, 13, 20, 30, 59, 37339, tzinfo=UTC).timestamp()
    )
    assert square_signed_at(b"not json") is None
    assert square_signed_at(b"[1]") is None
    for body in (b"{}", b'{"created_at": 5}', b'{"created_at": "yesterday"}'):
        with pytest.raises(DecodeError) as err:
            square_signed_at(body)
        assert err.value.reason == "no_timestamp"


def test_config_freshness_defaults() -> None:
    generic = HttpSource.model_validate(_source(id="web", format="generic", currency=None))
    square = HttpSource.model_validate(_source(format="square", notification_url="https://x.example/w"))
    lightspeed = HttpSource.model_validate(_source())
    assert generic.freshness == Window(300, 60)
    assert square.freshness == Window(25 * 3600, 60)  # Square resends for 24 h with the same created_at
    assert lightspeed.freshness is None  # X-Series signs no time
    assert HttpSource.model_validate(_source(format="generic", signed_timestamp=False)).freshness is None
    tuned = HttpSource.model_validate(_source(format="generic", max_age_s=60, max_ahead_s=5))
    assert tuned.freshness == Window(60, 5)
    with pytest.raises(ValidationError, match="no signed time"):
        HttpSource.model_validate(_source(max_age_s=60))


# --- duplicate keys ---------------------------------------------------------------------------------------


def _reason(call: Any) -> str:
    with pytest.raises(DecodeError) as err:
        call()
    return err.value.reason


def test_a_second_kind_is_refused_not_last_wins() -> None:
    sale = generic_sale("W-1", "web-01", [(WATER, 1)]).body
    assert _reason(lambda: map_generic(sale[:-1] + b',"kind":"pos.return"}')) == "duplicate_key"
    # Escaped, the key is still "kind" once decoded.
    assert _reason(lambda: map_generic(sale[:-1] + b',"\\u006bind":"pos.return"}')) == "duplicate_key"


def test_square_duplicate_keys_at_any_depth_are_refused() -> None:
    body = square_order("ORDER-9", "L1", [(WATER, 3)]).body
    nested = body.replace(b'"state":"COMPLETED"', b'"state":"OPEN","state":"COMPLETED"')
    assert nested != body
    assert _reason(lambda: map_square(nested)) == "duplicate_key"


def test_lightspeed_duplicate_fields_and_keys_are_refused() -> None:
    body = lightspeed_sale("s-1", 1, "r-1", "u-1", [(WATER, 1)]).body
    assert _reason(lambda: map_lightspeed(body + b"&payload=%7B%7D", "HKD")) == "duplicate_key"
    doubled = json.dumps(_ls_sale())[:-1] + ', "status": "SAVED"}'
    raw = urlencode({"payload": doubled, "type": "sale.update"}).encode()
    assert _reason(lambda: map_lightspeed(raw, "HKD")) == "duplicate_key"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    deep = b'{"kind":' + b"[" * 5000 + b"]" * 5000 + b"}"
    for mapper in (map_generic, map_square):
        with pytest.raises(DecodeError):
            mapper(deep)
