"""Lightspeed Retail X-Series (formerly Vend) ``sale.update`` webhooks -> ``pos.sale`` / ``pos.return``.

X-Series POSTs ``application/x-www-form-urlencoded`` with a ``payload`` field holding the JSON of the object
(for sales, the register sale of API 0.9/1.0) and a ``type`` field such as ``sale.update``
(x-series-api.lightspeedhq.com/docs/webhooks). The fields read here:

- ``id`` (the sale's UUID: its identity, so every later update of a sale is a replay), ``invoice_number``
  (the receipt number), ``register_id``, ``user_id`` (the cashier: an id, never the name), ``status``,
  ``sale_date`` (UTC), ``return_for`` (a return's original sale), ``total_price`` and ``total_tax``;
- ``register_sale_products``: ``product_id``, ``sku``, ``quantity`` (negative for goods coming back),
  ``price`` and ``tax`` (per unit, tax excluded and the tax), ``discount`` (per unit);
- ``register_sale_payments``: ``name`` / ``label`` and ``amount`` (negative for a refund).

Only a sale in :data:`COMPLETED` becomes an event. Lines with negative quantities are a return; a sale with
both (an exchange) becomes a ``pos.sale`` and a ``pos.return``. Numbers may be JSON numbers or strings.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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

COMPLETED: Final = frozenset({"CLOSED", "ONACCOUNT_CLOSED", "LAYBY_CLOSED"})
"""X-Series sale states in which the goods have left and the sale is final."""
MAX_FORM_FIELDS: Final = 32


def _as_text(value: Any) -> Any:
    """X-Series writes some ids and numbers either way: 42 or "42"."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_as_text), Field(min_length=1, max_length=64)]
Number = Annotated[Decimal, Field(ge=-(10**10), le=10**10, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SaleProduct(_Model):
    product_id: Text
    sku: Text | None = None
    quantity: Number
    price: Number
    tax: Number = Decimal(0)
    discount: Number = Decimal(0)


class SalePayment(_Model):
    name: Annotated[str, Field(max_length=200)] | None = None
    label: Annotated[str, Field(max_length=200)] | None = None
    amount: Number


class RegisterSale(_Model):
    id: Text
    register_id: Text
    invoice_number: Text
    status: Annotated[str, Field(min_length=1, max_length=40)]
    user_id: Text | None = None
    sale_date: Annotated[str, Field(max_length=40)] | None = None
    return_for: Text | None = None
    total_price: Number | None = None
    total_tax: Number | None = None
    register_sale_products: list[SaleProduct] = Field(default_factory=list, max_length=1000)
    register_sale_payments: list[SalePayment] = Field(default_factory=list, max_length=100)


def parse_form(raw: bytes) -> tuple[str | None, Any]:
    """(``type``, parsed ``payload`` JSON) of an X-Series webhook body; a field or JSON key given twice is
    refused (``duplicate_key``)."""
    try:
        fields = parse_qs(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FORM_FIELDS
        )
    except UnicodeDecodeError as err:
        raise DecodeError("not_form", "the body is not UTF-8 form data") from err
    except ValueError as err:
        raise DecodeError("not_form", printable(str(err))) from err
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        # parse_qs keeps every value; taking one would let a second 'payload' or 'type' pick the meaning.
        raise DecodeError(
            "duplicate_key", f"form field {printable(repeated[0], 60)!r} appears more than once"
        )
    payload = fields.get("payload")
    if not payload:
        raise DecodeError("invalid", "no 'payload' field in the form body")
    kind = fields.get("type")
    return (kind[0] if kind else None), load_json(payload[0])


def map_lightspeed(raw: bytes, currency: str) -> Outcome:
    """One X-Series webhook body -> its sale and/or return, or why it is not one."""
    event_type, payload = parse_form(raw)
    if event_type is not None and event_type != "sale.update":
        return Ignored(f"event type {printable(event_type, 40)!r}")
    if not isinstance(payload, dict):
        raise DecodeError("invalid", "payload: not a JSON object")
    sale = validate(RegisterSale, payload, "payload")
    if sale.status not in COMPLETED:
        return Ignored(f"sale status {printable(sale.status, 40)}")
    sold = [p for p in sale.register_sale_products if p.quantity > 0]
    returned = [p for p in sale.register_sale_products if p.quantity < 0]
    if not sold and not returned:
        raise DecodeError("invalid", "payload.register_sale_products: no line with a quantity")
    occurred_at = parse_time(sale.sale_date)
    return sale_and_return(
        sold,
        returned,
        lambda kind, lines, exact: _event(sale, kind, lines, currency, occurred_at, exact_totals=exact),
        "payload",
    )


def _event(
    sale: RegisterSale,
    kind: Kind,
    products: list[SaleProduct],
    currency: str,
    occurred_at: str | None,
    *,
    exact_totals: bool,
) -> Mapped:
    sign = 1 if kind == "pos.sale" else -1
    lines = [
        {
            "sku": p.sku or p.product_id,
            "quantity": abs(p.quantity),
            "unit_price": p.price + p.tax,
            "discount": abs(p.discount * p.quantity),
        }
        for p in products
    ]
    if exact_totals and sale.total_price is not None:
        subtotal = sign * sale.total_price
        tax = sign * (sale.total_tax or Decimal(0))
    else:  # an exchange: each half carries its own lines' totals
        subtotal = sum((abs(p.price * p.quantity) for p in products), Decimal(0))
        tax = sum((abs(p.tax * p.quantity) for p in products), Decimal(0))
    payments = [
        {"method": _method(p), "amount": abs(p.amount)}
        for p in sale.register_sale_payments
        if (p.amount > 0) == (sign > 0) and p.amount != 0
    ]
    fields: dict[str, Any] = {
        "receipt_no": sale.invoice_number,
        "register_id": sale.register_id,
        "cashier_id": sale.user_id,
        "currency": currency,
        "lines": lines,
        "totals": {"subtotal": subtotal, "tax": tax, "total": subtotal + tax},
        "payments": payments[:20],
    }
    model: type[PosSale] = PosSale
    if kind == "pos.return":
        model = PosReturn
        fields["original_receipt_no"] = sale.return_for
    return Mapped(kind, validate(model, fields, "payload"), sale.id, occurred_at)


def _method(payment: SalePayment) -> str:
    """X-Series payment types are named by the retailer; the usual names map, the rest are 'other'."""
    name = f"{payment.name or ''} {payment.label or ''}".lower()
    if "cash" in name:
        return "cash"
    if any(word in name for word in ("gift", "voucher", "store credit", "loyalty")):
        return "voucher"
    if any(word in name for word in ("card", "eftpos", "visa", "mastercard", "amex", "credit", "debit")):
        return "card"
    if any(word in name for word in ("wechat", "alipay", "octopus", "apple pay", "google pay", "mobile")):
        return "mobile"
    return "other"
