"""Square webhooks -> ``pos.sale`` / ``pos.return``.

A Square event is ``{merchant_id, type, event_id, created_at, data: {type, id, object}}``
(developer.squareup.com/reference/square/webhooks). What Square itself sends for ``order.created`` /
``order.updated`` is only a summary (``order_updated``: order_id, version, location_id, state), and
``payment.*`` / ``refund.*`` carry money without line items: none of them says which goods left. So an
event becomes a sale only when ``data.object.order`` holds a full Orders API ``Order`` (a relay that fetched
it with RetrieveOrder, or the simulator); the rest are acknowledged and counted as ignored.

From the Order (developer.squareup.com/reference/square/objects/Order): ``id`` (the identity and receipt
number), ``location_id``, ``state`` (only ``COMPLETED`` counts), ``line_items`` (``catalog_object_id`` as the
SKU, ``quantity`` as a decimal string, ``base_price_money``, ``total_discount_money``), ``returns``
(``source_order_id`` and ``return_line_items``: a return), ``total_money``, ``total_tax_money``, ``tenders``
(``type``, ``amount_money``) and ``closed_at``. Money is an integer in the currency's smallest unit.
Line items without a ``catalog_object_id`` (custom amounts) move no stock and are left out.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from drivers.errors import DecodeError
from drivers.http.mapped import (
    Ignored,
    Kind,
    Mapped,
    Outcome,
    load_json,
    parse_time,
    printable,
    sale_and_return,
    validate,
)
from gateway.kernel.events import PosReturn, PosSale

ORDER_EVENTS: Final = frozenset({"order.created", "order.updated"})
MAX_QUANTITY: Final = Decimal(10**6)
MIN_QUANTITY_EXPONENT: Final = -12
"""A line's quantity is at most a million units (gateway.kernel.events.Quantity) with a few decimals."""
MINOR_UNITS: Final[dict[str, int]] = {
    **dict.fromkeys(
        (
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ),
        0,
    ),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
}
"""ISO 4217 currencies whose minor unit is not 1/100."""
TENDERS: Final[dict[str, str]] = {
    "CARD": "card",
    "CASH": "cash",
    "SQUARE_GIFT_CARD": "voucher",
    "WALLET": "mobile",
    "BANK_ACCOUNT": "other",
    "BUY_NOW_PAY_LATER": "other",
    "SQUARE_ACCOUNT": "other",
    "NO_SALE": "other",
    "OTHER": "other",
}

Id = Annotated[str, Field(min_length=1, max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Money(_Model):
    amount: Annotated[StrictInt, Field(ge=-(10**15), le=10**15)]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


class LineItem(_Model):
    catalog_object_id: Id | None = None
    quantity: Annotated[str, Field(min_length=1, max_length=20)]
    base_price_money: Money
    total_discount_money: Money | None = None


class Return(_Model):
    source_order_id: Id | None = None
    return_line_items: list[LineItem] = Field(default_factory=list, max_length=1000)


class Tender(_Model):
    type: Annotated[str, Field(max_length=40)]
    amount_money: Money


class Order(_Model):
    id: Id
    location_id: Id
    state: Annotated[str, Field(min_length=1, max_length=40)]
    line_items: list[LineItem] = Field(default_factory=list, max_length=1000)
    returns: list[Return] = Field(default_factory=list, max_length=100)
    total_money: Money | None = None
    total_tax_money: Money | None = None
    tenders: list[Tender] = Field(default_factory=list, max_length=100)
    closed_at: Annotated[str, Field(max_length=40)] | None = None
    updated_at: Annotated[str, Field(max_length=40)] | None = None


def map_square(raw: bytes, register_id: str | None = None) -> Outcome:
    """One Square event body -> its sale and/or return, or why it is not one."""
    event: Any = load_json(raw)
    if not isinstance(event, dict):
        raise DecodeError("invalid", "the event is not a JSON object")
    event_type = event.get("type")
    if not isinstance(event_type, str):
        raise DecodeError("invalid", "type: missing or not a string")
    if event_type not in ORDER_EVENTS:
        return Ignored(f"event type {printable(event_type, 40)!r} carries no line items")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise DecodeError("invalid", "data.object: missing or not an object")
    if "order" not in obj:
        return Ignored("the notification carries the order's state only, not its line items")
    order = validate(Order, obj["order"], "data.object.order")
    if order.state != "COMPLETED":
        return Ignored(f"order state {printable(order.state, 40)}")
    sold = [li for li in order.line_items if li.catalog_object_id]
    returned = [li for r in order.returns for li in r.return_line_items if li.catalog_object_id]
    if not sold and not returned:
        return Ignored("no catalog items (custom amounts only)")
    occurred_at = parse_time(order.closed_at or order.updated_at)
    register = register_id or order.location_id
    return sale_and_return(
        sold,
        returned,
        lambda kind, lines, exact: _event(order, kind, lines, register, occurred_at, exact_totals=exact),
        "data.object.order",
    )


def _event(
    order: Order,
    kind: Kind,
    items: list[LineItem],
    register_id: str,
    occurred_at: str | None,
    *,
    exact_totals: bool,
) -> Mapped:
    currency = items[0].base_price_money.currency
    lines: list[dict[str, Any]] = []
    net = Decimal(0)
    for li in items:
        if li.base_price_money.currency != currency:
            raise DecodeError("invalid", "data.object.order: line items in more than one currency")
        quantity = _quantity(li.quantity)
        unit_price = _money(li.base_price_money)
        discount = abs(_money(li.total_discount_money)) if li.total_discount_money else Decimal(0)
        net += unit_price * quantity - discount
        lines.append(
            {
                "sku": li.catalog_object_id,
                "quantity": quantity,
                "unit_price": unit_price,
                "discount": discount,
            }
        )
    if exact_totals and order.total_money is not None:
        total = abs(_money(order.total_money))
        tax = abs(_money(order.total_tax_money)) if order.total_tax_money is not None else Decimal(0)
    else:  # an exchange: each half carries its own lines' totals
        total, tax = net, Decimal(0)
    fields: dict[str, Any] = {
        "receipt_no": order.id,
        "register_id": register_id,
        "currency": currency,
        "lines": lines,
        "totals": {"subtotal": total - tax, "tax": tax, "total": total},
        "payments": [
            {"method": TENDERS.get(t.type, "other"), "amount": abs(_money(t.amount_money))}
            for t in order.tenders[:20]
        ]
        if kind == "pos.sale"
        else [],
    }
    model: type[PosSale] = PosSale
    if kind == "pos.return":
        model = PosReturn
        fields["original_receipt_no"] = next(
            (r.source_order_id for r in order.returns if r.source_order_id), None
        )
    return Mapped(kind, validate(model, fields, "data.object.order"), order.id, occurred_at)


def _money(money: Money) -> Decimal:
    return Decimal(money.amount).scaleb(-MINOR_UNITS.get(money.currency, 2))


def _quantity(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except ArithmeticError as err:
        raise DecodeError("invalid", f"quantity {printable(text, 20)!r} is not a number") from err
    if not value.is_finite():
        raise DecodeError("invalid", f"quantity {printable(text, 20)!r} is not a number")
    # Bounded before any arithmetic: "1e999999999" would overflow the decimal context, "1e-999999999" underflow.
    if value.copy_abs() > MAX_QUANTITY or int(value.as_tuple().exponent) < MIN_QUANTITY_EXPONENT:
        raise DecodeError("invalid", f"quantity {printable(text, 20)!r} is out of range")
    return value
