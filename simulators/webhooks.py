"""A cloud POS sending webhooks: signed Lightspeed X-Series, Square or generic sales and returns, over HTTP.

``store-gateway simulate webhooks --source ls-main --format lightspeed`` POSTs to the gateway's local API at
``/webhooks/<source>``, signed as the real service signs (drivers/http/signatures.py), with the payload
shapes of drivers/http/{lightspeed,square,generic}.py built from the demo catalog (simulators/catalog.py).
Some webhooks are sent twice on purpose (``--replay-ratio``), as cloud POS services do when an answer is
late, each signed again with the time of sending (generic): the gateway answers 200 and changes nothing. The
secret is read from an environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import orjson

from drivers.http.config import SIGNATURE_HEADERS, Format
from drivers.http.signatures import TIMESTAMP_HEADER, sign
from simulators.catalog import CATALOG, CURRENCY, CatalogItem, format_cents

KEY_VARIABLE: Final = "STOREGW_WEBHOOK_SECRET"
FORM: Final = "application/x-www-form-urlencoded"
JSON: Final = "application/json"

Line = tuple[CatalogItem, int]
"""A catalog item and a quantity: positive sold, negative returned."""


@dataclass(frozen=True, slots=True)
class Webhook:
    body: bytes
    content_type: str
    deltas: tuple[tuple[str, int], ...]
    """(sku, stock change) once the gateway takes it: negative for goods sold."""


def lightspeed_sale(
    sale_id: str,
    invoice_number: int,
    register_id: str,
    user_id: str,
    lines: Sequence[Line],
    status: str = "CLOSED",
) -> Webhook:
    """An X-Series ``sale.update``: form-encoded ``payload`` (the register sale as JSON) and ``type``."""
    products = []
    total = 0
    for seq, (item, qty) in enumerate(lines):
        products.append(
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{sale_id}/{seq}")),
                "product_id": str(uuid.uuid5(uuid.NAMESPACE_URL, item.sku)),
                "register_id": register_id,
                "sequence": str(seq),
                "handle": item.sku.lower(),
                "sku": item.sku,
                "name": item.name,
                "quantity": qty,
                "price": float(item.unit_price),  # Hong Kong: no sales tax, so price is the shelf price
                "cost": 0,
                "price_set": 0,
                "discount": 0,
                "loyalty_value": 0,
                "tax": 0,
                "tax_total": 0,
                "price_total": float(format_cents(item.unit_price_cents * qty)),
                "status": "CONFIRMED",
            }
        )
        total += item.unit_price_cents * qty
    sale = {
        "id": sale_id,
        "source": "USER",
        "register_id": register_id,
        "market_id": "1",
        "user_id": user_id,
        "sale_date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "status": status,
        "invoice_number": str(invoice_number),
        "total_price": float(format_cents(total)),
        "total_tax": 0,
        "return_for": None,
        "register_sale_products": products,
        "register_sale_payments": [
            {"id": str(uuid.uuid4()), "name": "Cash", "label": "Cash", "amount": float(format_cents(total))}
        ],
        "totals": {"total_tax": 0, "total_price": float(format_cents(total)), "total_to_pay": 0},
    }
    body = urlencode({"payload": orjson.dumps(sale).decode(), "type": "sale.update", "domain_prefix": "demo"})
    return Webhook(body.encode(), FORM, tuple((item.sku, -qty) for item, qty in lines))


def square_order(
    order_id: str,
    location_id: str,
    lines: Sequence[Line],
    state: str = "COMPLETED",
    source_order_id: str | None = None,
) -> Webhook:
    """An ``order.updated`` event carrying the full Order (as a relay that fetched it sends it)."""

    def money(cents: int) -> dict[str, Any]:
        return {"amount": cents, "currency": CURRENCY}

    def item_json(item: CatalogItem, qty: int) -> dict[str, Any]:
        gross = item.unit_price_cents * qty
        return {
            "uid": uuid.uuid4().hex[:22],
            "catalog_object_id": item.sku,
            "name": item.name,
            "quantity": str(qty),
            "base_price_money": money(item.unit_price_cents),
            "gross_sales_money": money(gross),
            "total_discount_money": money(0),
            "total_tax_money": money(0),
            "total_money": money(gross),
        }

    sold = [item_json(item, qty) for item, qty in lines if qty > 0]
    returned = [item_json(item, -qty) for item, qty in lines if qty < 0]
    total = sum(item.unit_price_cents * qty for item, qty in lines if qty > 0)
    order: dict[str, Any] = {
        "id": order_id,
        "location_id": location_id,
        "state": state,
        "version": 4,
        "line_items": sold,
        "total_money": money(total),
        "total_tax_money": money(0),
        "total_discount_money": money(0),
        "tenders": [{"type": "CARD", "amount_money": money(total)}] if total else [],
        "closed_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if returned:
        order["returns"] = [
            {"uid": uuid.uuid4().hex[:22], "source_order_id": source_order_id, "return_line_items": returned}
        ]
    event = {
        "merchant_id": "MLDEMO0000001",
        "type": "order.updated",
        "event_id": str(uuid.uuid4()),
        "created_at": order["closed_at"],
        "data": {"type": "order", "id": order_id, "object": {"order": order}},
    }
    return Webhook(orjson.dumps(event), JSON, tuple((item.sku, -qty) for item, qty in lines))


def generic_sale(
    receipt_no: str, register_id: str, lines: Sequence[Line], original: str | None = None
) -> Webhook:
    """The gateway's own JSON: all lines sold, or all returned (negative quantities)."""
    returning = lines[0][1] < 0
    total = sum(item.unit_price_cents * abs(qty) for item, qty in lines)
    body: dict[str, Any] = {
        "kind": "pos.return" if returning else "pos.sale",
        "receipt_no": receipt_no,
        "register_id": register_id,
        "currency": CURRENCY,
        "lines": [
            {"sku": i.sku, "gtin": i.gtin, "quantity": abs(q), "unit_price": i.unit_price} for i, q in lines
        ],
        "totals": {"subtotal": format_cents(total), "tax": "0.00", "total": format_cents(total)},
        "payments": [{"method": "card", "amount": format_cents(total)}],
        "occurred_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    if returning:
        body["original_receipt_no"] = original
    return Webhook(orjson.dumps(body), JSON, tuple((item.sku, -qty) for item, qty in lines))


def headers(
    fmt: Format,
    secret: str,
    webhook: Webhook,
    notification_url: str | None = None,
    header: str | None = None,
    signed_at: int | None = None,
) -> dict[str, str]:
    """The request headers a real sender puts on ``webhook``; generic with ``signed_at`` (Unix seconds) signs
    that time with the body and sends it in X-Webhook-Timestamp, as the gateway requires by default."""
    timestamp = str(signed_at) if signed_at is not None and fmt == "generic" else None
    signed = {
        "content-type": webhook.content_type,
        header or SIGNATURE_HEADERS[fmt]: sign(fmt, secret, webhook.body, notification_url, timestamp),
    }
    if timestamp is not None:
        signed[TIMESTAMP_HEADER] = timestamp
    return signed


class CloudPos:
    """Makes up sales (and now and then a return of an earlier one) in one format."""

    def __init__(
        self, fmt: Format, rng: random.Random, register_id: str = "web-01", return_ratio: float = 0.1
    ) -> None:
        self.fmt: Format = fmt
        self._rng = rng
        self._register = register_id
        self._return_ratio = return_ratio
        self._n = 0
        self._sold: list[tuple[str, Line]] = []

    def next(self) -> Webhook:
        self._n += 1
        rng = self._rng
        if self._sold and rng.random() < self._return_ratio:
            original, (item, qty) = self._sold.pop(rng.randrange(len(self._sold)))
            lines: list[Line] = [(item, -rng.randint(1, qty))]
        else:
            original = None
            lines = [(item, rng.randint(1, 3)) for item in rng.sample(CATALOG, rng.randint(1, 4))]
        ident = str(uuid.UUID(int=rng.getrandbits(128)))
        if self.fmt == "lightspeed":
            webhook = lightspeed_sale(ident, 1000 + self._n, self._register, "cashier-7", lines)
        elif self.fmt == "square":
            webhook = square_order(
                ident.replace("-", "")[:24].upper(), "LDEMO01", lines, source_order_id=original
            )
        else:
            webhook = generic_sale(f"W-{self._n}", self._register, lines, original)
        if original is None:
            self._sold.extend((ident, line) for line in lines)
        return webhook


async def run(args: argparse.Namespace, secret: str) -> int:
    url = f"{args.gateway.rstrip('/')}/webhooks/{args.source}"
    pos = CloudPos(args.format, random.Random(args.seed), return_ratio=args.return_ratio)
    rng = random.Random(args.seed + 1)
    statuses: collections.Counter[int] = collections.Counter()
    sent: list[Webhook] = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _ in range(args.count):
            replay = bool(sent) and rng.random() < args.replay_ratio
            webhook = rng.choice(sent) if replay else pos.next()
            sent.append(webhook)
            reply = await client.post(
                url,
                content=webhook.body,
                headers=headers(
                    args.format, secret, webhook, args.notification_url or url, signed_at=int(time.time())
                ),
            )
            statuses[reply.status_code] += 1
            print(f"{'replay ' if replay else ''}{reply.status_code} {reply.text[:200]}")
            await asyncio.sleep(1 / args.rate)
    print("answers:", ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())))
    return 0 if set(statuses) <= {200} else 1


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate webhooks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gateway", default="http://127.0.0.1:8080", help="The gateway's local API.")
    parser.add_argument("--source", required=True, help="The source id (the webhook path).")
    parser.add_argument("--format", choices=("generic", "lightspeed", "square"), default="generic")
    parser.add_argument("--secret-env", default=KEY_VARIABLE, help="Environment variable holding the secret.")
    parser.add_argument(
        "--notification-url", help="square: the URL as registered (default: the one posted to)."
    )
    parser.add_argument("--count", type=int, default=10, help="Webhooks to send.")
    parser.add_argument("--rate", type=float, default=2.0, help="Webhooks per second.")
    parser.add_argument(
        "--replay-ratio", type=float, default=0.1, help="Share sent again (must change nothing)."
    )
    parser.add_argument("--return-ratio", type=float, default=0.1, help="Share that are returns.")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"set ${args.secret_env} to the source's secret", file=sys.stderr)
        return 2
    if args.rate <= 0 or args.count < 0:
        parser.error("--rate must be > 0 and --count >= 0")
    try:
        return asyncio.run(run(args, secret))
    except httpx.HTTPError as err:
        print(f"cannot reach the gateway: {err}", file=sys.stderr)
        return 1
