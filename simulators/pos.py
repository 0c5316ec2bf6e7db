"""Simulated POS terminals: realistic sales and returns published over MQTT, as fast as the broker allows.

A till publishes each completed receipt once, QoS 1, to ``store/pos/<device_id>/sale`` or ``.../return``.
The payload is the JSON of :class:`gateway.kernel.events.PosSale` or :class:`gateway.kernel.events.PosReturn` plus an
optional top-level ``occurred_at`` (ISO 8601 with an offset). Money is a JSON string ("12.50"); quantities
are numbers.

:class:`PosTerminal` is pure (a seeded :class:`random.Random`, no I/O) and builds payloads with orjson from
integer cents: no pydantic or ``Decimal`` on the hot path. :func:`run_terminals` drives one MQTT connection
per terminal with a bounded number of publishes awaiting PUBACK, and keeps the stock deltas a gateway must
end up with: only for messages the broker acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Final, Literal, NamedTuple

import orjson

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import MqttClient, MqttError
from simulators.catalog import CATALOG, CURRENCY, CatalogItem, format_cents
from simulators.cli import add_broker_arguments, broker_from

_LOGGER = logging.getLogger(__name__)

Action = Literal["sale", "return"]

DEFAULT_TOPIC_TEMPLATE: Final = "store/pos/{device_id}/{action}"
HKT: Final = timezone(timedelta(hours=8), "HKT")

KIND_BY_ACTION: Final[dict[str, str]] = {"sale": "pos.sale", "return": "pos.return"}

_RETURNABLE_LINES: Final = 256
"""How many recent sale lines a terminal remembers as candidates for a return."""

_RETURN_REASONS: Final = ("damaged packaging", "wrong item", "past expiry date", "changed mind")


def _hk_now() -> datetime:
    return datetime.now(HKT)


@dataclass(frozen=True, slots=True)
class PosMessage:
    """One message a till publishes, and what it does to stock."""

    device_id: str
    action: Action
    receipt_no: str
    payload: bytes
    deltas: tuple[tuple[str, int], ...]
    """(sku, stock change): negative for goods sold, positive for goods returned."""

    @property
    def kind(self) -> str:
        return KIND_BY_ACTION[self.action]


_SoldLine = tuple[str, CatalogItem, int, str]
"""(receipt_no, item, quantity, payment method) of a line sold earlier."""


def _pick_payment(u: float) -> str:
    """Payment method for a uniform draw in [0, 1): card (incl. Octopus) 45%, mobile wallets 30%, cash 25%."""
    if u < 0.45:
        return "card"
    return "mobile" if u < 0.75 else "cash"


class PosTerminal:
    """A till that makes up receipts: 1-4 lines, quantities 1-3, and sometimes a return of an earlier sale.

    Receipt numbers are ``<receipt_prefix>-<n>``; the default prefix is ``<device_id>-<random nonce>``, so
    numbers stay unique for this device across runs (a gateway deduplicates on them). With ``seed``,
    ``receipt_prefix`` and ``clock`` fixed, the output is byte-for-byte reproducible.
    """

    def __init__(
        self,
        device_id: str,
        *,
        seed: int | str | None = None,
        return_ratio: float = 0.1,
        receipt_prefix: str | None = None,
        register_id: str | None = None,
        catalog: Sequence[CatalogItem] = CATALOG,
        clock: Callable[[], datetime] | None = _hk_now,
    ) -> None:
        """``clock`` gives ``occurred_at`` (aware datetimes only); ``None`` leaves it out of the payload."""
        if not 0.0 <= return_ratio <= 1.0:
            raise ValueError(f"return_ratio must be within [0, 1], got {return_ratio}")
        if len(catalog) < 4:
            raise ValueError("the catalog needs at least 4 items")
        self.device_id = device_id
        self.register_id = register_id or device_id
        self.receipt_prefix = receipt_prefix or f"{device_id}-{os.urandom(3).hex()}"
        if len(self.receipt_prefix) > 50:
            raise ValueError(
                f"receipt prefix {self.receipt_prefix!r} is too long: receipt numbers are <= 64 chars"
            )
        if not 1 <= len(self.register_id) <= 64:
            raise ValueError(f"register id {self.register_id!r} must be 1 to 64 characters")
        self.return_ratio = return_ratio
        self._rng = random.Random(seed)
        self._catalog = tuple(catalog)
        self._clock = clock
        self._cashiers = [f"C{self._rng.randrange(100, 1000)}" for _ in range(3)]
        self._returnable: list[_SoldLine] = []
        self._n = 0
        self.expected_deltas: dict[str, int] = {}
        """Stock change per SKU over every message this terminal has made."""

    def next_message(self) -> PosMessage:
        """The next receipt: a return with probability ``return_ratio`` (if a sale is left to return)."""
        if self._returnable and self._rng.random() < self.return_ratio:
            return self.make_return()
        return self.make_sale()

    def make_sale(self, basket: Sequence[tuple[CatalogItem, int]] | None = None) -> PosMessage:
        """A receipt of 1 - 4 random lines, or of ``basket``: (item, quantity) pairs."""
        rnd = self._rng.random
        receipt_no = self._next_receipt_no()
        if basket is None:
            basket = [
                (item, 1 + int(rnd() * 3)) for item in self._rng.sample(self._catalog, 1 + int(rnd() * 4))
            ]
        method = _pick_payment(rnd())
        lines: list[dict[str, Any]] = []
        deltas: list[tuple[str, int]] = []
        subtotal = 0
        for item, qty in basket:
            gross = qty * item.unit_price_cents
            line: dict[str, Any] = {"sku": item.sku, "quantity": qty, "unit_price": item.unit_price}
            if rnd() < 0.95:  # the rest were keyed in by hand: no barcode
                line["gtin"] = item.gtin
            if qty >= 2 and rnd() < 0.15:  # multi-buy offer: 10% off the line, to 10 cents
                discount = gross // 100 * 10
                line["discount"] = format_cents(discount)
                gross -= discount
            subtotal += gross
            lines.append(line)
            deltas.append((item.sku, -qty))
            self._remember((receipt_no, item, qty, method))
        if subtotal > 5000 and rnd() < 0.05:
            payments = [
                {"method": "voucher", "amount": "50.00"},
                {"method": method, "amount": format_cents(subtotal - 5000)},
            ]
        else:
            payments = [{"method": method, "amount": format_cents(subtotal)}]
        total = format_cents(subtotal)
        body: dict[str, Any] = {
            "receipt_no": receipt_no,
            "register_id": self.register_id,
            "cashier_id": self._cashiers[int(rnd() * len(self._cashiers))],
            "currency": CURRENCY,
            "lines": lines,
            "totals": {"subtotal": total, "tax": "0.00", "total": total},
            "payments": payments,
        }
        return self._finish("sale", receipt_no, body, deltas)

    def make_return(self) -> PosMessage:
        """A return of part or all of one line of an earlier sale (a sale if none is left to return)."""
        if not self._returnable:
            return self.make_sale()
        rng = self._rng
        original_receipt_no, item, sold_qty, method = self._returnable.pop(
            rng.randrange(len(self._returnable))
        )
        qty = rng.randint(1, sold_qty)
        amount = format_cents(qty * item.unit_price_cents)
        body: dict[str, Any] = {
            "receipt_no": self._next_receipt_no(),
            "register_id": self.register_id,
            "cashier_id": rng.choice(self._cashiers),
            "currency": CURRENCY,
            "lines": [{"sku": item.sku, "gtin": item.gtin, "quantity": qty, "unit_price": item.unit_price}],
            "totals": {"subtotal": amount, "tax": "0.00", "total": amount},
            "payments": [{"method": method, "amount": amount}],
            "original_receipt_no": original_receipt_no,
            "reason": rng.choice(_RETURN_REASONS),
        }
        return self._finish("return", body["receipt_no"], body, [(item.sku, qty)])

    def _next_receipt_no(self) -> str:
        self._n += 1
        return f"{self.receipt_prefix}-{self._n}"

    def _remember(self, line: _SoldLine) -> None:
        self._returnable.append(line)
        if len(self._returnable) > _RETURNABLE_LINES:
            del self._returnable[0]

    def _finish(
        self, action: Action, receipt_no: str, body: dict[str, Any], deltas: list[tuple[str, int]]
    ) -> PosMessage:
        if self._clock is not None:
            body["occurred_at"] = self._clock().isoformat(timespec="milliseconds")
        for sku, delta in deltas:
            self.expected_deltas[sku] = self.expected_deltas.get(sku, 0) + delta
        return PosMessage(self.device_id, action, receipt_no, orjson.dumps(body), tuple(deltas))


# --- publishing ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SimulationResult:
    """What the broker acknowledged: a gateway that lost nothing ends up with exactly these effects."""

    published: dict[str, int] = field(default_factory=lambda: {"pos.sale": 0, "pos.return": 0})
    """Acknowledged messages per event kind."""
    expected_deltas: dict[str, int] = field(default_factory=dict)
    """Stock change per SKU, over acknowledged messages only."""
    receipts: list[str] = field(default_factory=list)
    """Receipt numbers of acknowledged messages, in acknowledgement order."""
    failed: int = 0
    """Publishes whose PUBACK never came (the connection dropped)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Per device id, why that terminal stopped early."""
    first_publish_monotonic: float | None = None
    last_puback_monotonic: float | None = None

    @property
    def total(self) -> int:
        return sum(self.published.values())

    @property
    def elapsed_s(self) -> float:
        if self.first_publish_monotonic is None or self.last_puback_monotonic is None:
            return 0.0
        return self.last_puback_monotonic - self.first_publish_monotonic

    @property
    def rate(self) -> float:
        """Acknowledged messages per second, first publish to last PUBACK."""
        elapsed = self.elapsed_s
        return self.total / elapsed if elapsed > 0 else 0.0

    def record(self, message: PosMessage, acked_at: float) -> None:
        """Count one message the broker acknowledged at ``acked_at`` (``time.monotonic()``)."""
        self.published[message.kind] += 1
        deltas = self.expected_deltas
        for sku, delta in message.deltas:
            deltas[sku] = deltas.get(sku, 0) + delta
        self.receipts.append(message.receipt_no)
        self.last_puback_monotonic = acked_at


async def run_terminals(
    broker: BrokerConfig,
    device_ids: Sequence[str],
    *,
    count_per_terminal: int | None = None,
    duration_s: float | None = None,
    rate_per_s: float = 0.0,
    qos: Literal[0, 1] = 1,
    max_inflight: int = 200,
    seed: int | None = None,
    return_ratio: float = 0.1,
    topic_template: str = DEFAULT_TOPIC_TEMPLATE,
    on_publish: Callable[[PosMessage], None] | None = None,
    terminals: Sequence[PosTerminal] | None = None,
) -> SimulationResult:
    """Publish from one MQTT connection per terminal until each sent ``count_per_terminal`` or
    ``duration_s`` passed (whichever comes first), then wait for the outstanding PUBACKs.

    ``rate_per_s`` is per terminal; 0 means as fast as the broker acknowledges. ``on_publish`` is called
    for each acknowledged message (for a live display). ``terminals``: the tills to drive, one per device id,
    instead of new ones (a scenario also sells through them). Cannot connect: raises :class:`MqttError`. A
    terminal whose connection drops later stops; the reason lands in ``SimulationResult.errors``.
    """
    if count_per_terminal is None and duration_s is None:
        raise ValueError("give count_per_terminal or duration_s")
    if count_per_terminal is not None and count_per_terminal < 0:
        raise ValueError("count_per_terminal must be >= 0")
    if rate_per_s < 0 or max_inflight < 1:
        raise ValueError("rate_per_s must be >= 0 and max_inflight >= 1")
    if len(set(device_ids)) != len(device_ids):
        raise ValueError("device ids must be unique")
    if terminals is None:
        terminals = [
            PosTerminal(d, seed=None if seed is None else f"{seed}:{d}", return_ratio=return_ratio)
            for d in device_ids
        ]
    elif [t.device_id for t in terminals] != list(device_ids):
        raise ValueError("one terminal per device id, in the same order")
    result = SimulationResult()
    clients: list[MqttClient] = []
    try:
        for device_id in device_ids:
            client = MqttClient(broker, f"sim-{device_id}", clean_start=True)
            clients.append(client)
        await asyncio.gather(*(c.connect() for c in clients))
        loop = asyncio.get_running_loop()
        deadline = None if duration_s is None else loop.time() + duration_s
        async with asyncio.TaskGroup() as tg:
            for terminal, client in zip(terminals, clients, strict=True):
                topics = {
                    a: topic_template.format(device_id=terminal.device_id, action=a) for a in KIND_BY_ACTION
                }
                run = _TerminalRun(terminal, client, topics, result, qos, max_inflight, on_publish)
                tg.create_task(
                    run.drive(count_per_terminal, deadline, rate_per_s), name=f"sim-{terminal.device_id}"
                )
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))
    return result


class _TerminalRun:
    """One terminal's publish loop over its own connection."""

    def __init__(
        self,
        terminal: PosTerminal,
        client: MqttClient,
        topics: dict[str, str],
        result: SimulationResult,
        qos: int,
        max_inflight: int,
        on_publish: Callable[[PosMessage], None] | None,
    ) -> None:
        self.terminal = terminal
        self.client = client
        self.topics = topics
        self.result = result
        self.qos = qos
        self.max_inflight = max_inflight
        self.on_publish = on_publish
        self.window = asyncio.Semaphore(max_inflight)
        self.error: BaseException | None = None

    async def drive(self, count: int | None, deadline: float | None, rate_per_s: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        started = loop.time()
        publish = self.client.publish
        topics = self.topics
        result = self.result
        n = 0
        while self.error is None and (count is None or n < count):
            if interval:
                delay = started + n * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(
                        delay if deadline is None else min(delay, max(0.0, deadline - loop.time()))
                    )
            if deadline is not None and loop.time() >= deadline:
                break
            await self.window.acquire()
            if self.error is not None:
                self.window.release()
                break
            message = self.terminal.next_message()
            if result.first_publish_monotonic is None:
                result.first_publish_monotonic = time.monotonic()
            publish(topics[message.action], message.payload, self.qos).add_done_callback(
                partial(self._acked, message)
            )
            n += 1
        for _ in range(self.max_inflight):  # wait for every outstanding PUBACK (or failure)
            await self.window.acquire()
        if self.error is not None:
            _LOGGER.warning(
                "terminal %s stopped after %d messages: %s", self.terminal.device_id, n, self.error
            )
            result.errors[self.terminal.device_id] = str(self.error)

    def _acked(self, message: PosMessage, fut: asyncio.Future[None]) -> None:
        self.window.release()
        error = MqttError("publish cancelled") if fut.cancelled() else fut.exception()
        if error is not None:
            self.result.failed += 1
            if self.error is None:
                self.error = error
            return
        self.result.record(message, time.monotonic())
        if self.on_publish is not None:
            self.on_publish(message)


# --- bad input -------------------------------------------------------------------------------------------


class BadMessage(NamedTuple):
    action: str
    """Topic suffix: the ``{action}`` of the topic template."""
    payload: bytes
    reason: str
    """Roughly why a gateway must reject it: not_json, not_utf8, not_object, invalid or too_large."""


TOO_LARGE_BYTES: Final = 10 * 1024 * 1024


def garbage_messages() -> Iterator[BadMessage]:
    """Messages a gateway must quarantine, never commit, each with a unique receipt number.

    A decoder that does not tell encoding errors apart may report ``not_utf8`` as ``not_json``;
    random bytes are also invalid UTF-8.
    """
    fixed = datetime(2024, 1, 2, 9, 30, tzinfo=HKT)
    terminal = PosTerminal("bad-till", seed=0, receipt_prefix="bad-till-garbage", clock=lambda: fixed)

    def sale(**changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(terminal.make_sale().payload)
        body.update(changes)
        return body

    rng = random.Random(0)
    yield BadMessage("sale", b"\xc0" + rng.randbytes(255), "not_json")
    yield BadMessage("sale", b"", "not_json")
    yield BadMessage("sale", b'{"receipt_no": "abc', "not_json")
    valid = terminal.make_sale().payload
    yield BadMessage("sale", valid.replace(b'"register_id":"', b'"register_id":"\xff\xfe', 1), "not_utf8")
    yield BadMessage("sale", orjson.dumps([sale()]), "not_object")
    yield BadMessage("sale", b"null", "not_object")
    body = sale()
    body["lines"][0]["quantity"] = "abc"
    yield BadMessage("sale", orjson.dumps(body), "invalid")
    yield BadMessage("sale", orjson.dumps(sale(lines="SKU-0001")), "invalid")
    body = sale()
    del body["receipt_no"]
    yield BadMessage("sale", orjson.dumps(body), "invalid")
    body = sale()
    del body["lines"]
    yield BadMessage("sale", orjson.dumps(body), "invalid")
    body = sale()
    body["lines"][0]["quantity"] = -2
    yield BadMessage("sale", orjson.dumps(body), "invalid")
    yield BadMessage("sale", orjson.dumps(sale(lines=[])), "invalid")
    yield BadMessage("sale", orjson.dumps(sale(unexpected_field=1)), "invalid")
    body = orjson.loads(terminal.make_return().payload)
    body["original_receipt_no"] = 12345
    yield BadMessage("return", orjson.dumps(body), "invalid")
    head = orjson.dumps(sale())[:-1] + b',"padding":"'
    yield BadMessage("sale", head + b"x" * (TOO_LARGE_BYTES - len(head) - 2) + b'"}', "too_large")


# --- command line ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate", description="Simulated devices for demos and tests."
    )
    sub = parser.add_subparsers(dest="simulator", required=True)
    pos = sub.add_parser("pos", help="POS terminals publishing sales and returns to the store broker.")
    add_broker_arguments(pos)
    pos.add_argument(
        "--terminals", type=int, default=1, help="Number of terminals, named till-01, till-02..."
    )
    pos.add_argument("--device-ids", help="Comma-separated device ids; overrides --terminals.")
    pos.add_argument(
        "--rate", type=float, default=1.0, help="Messages per second per terminal; 0 = flat out."
    )
    pos.add_argument("--count", type=int, help="Messages per terminal (default 100 without --duration).")
    pos.add_argument("--duration", type=float, help="Stop after this many seconds.")
    pos.add_argument("--seed", type=int, help="Seed for reproducible receipts (receipt numbers stay unique).")
    pos.add_argument("--return-ratio", type=float, default=0.1, help="Share of returns (default 0.1).")
    pos.add_argument("--max-inflight", type=int, default=200, help="Unacknowledged publishes per terminal.")
    pos.add_argument("--topic-template", default=DEFAULT_TOPIC_TEMPLATE, help="Default %(default)s.")
    pos.add_argument("--json", action="store_true", help="Print the summary as JSON, with per-SKU deltas.")
    return parser


def main(argv: Sequence[str]) -> int:
    """``store-gateway simulate pos ...`` (see :mod:`simulators.cli`)."""
    return simulate_main(["pos", *argv])


def simulate_main(argv: Sequence[str]) -> int:
    """``store-gateway simulate pos ...``: run the simulator and print a summary; 0 if all went through."""
    args = _parser().parse_args(list(argv))
    if args.device_ids:
        device_ids = [d.strip() for d in args.device_ids.split(",") if d.strip()]
    else:
        device_ids = [f"till-{i:02d}" for i in range(1, args.terminals + 1)]
    count = args.count if args.count is not None or args.duration is not None else 100
    broker = broker_from(args)
    try:
        result = asyncio.run(
            run_terminals(
                broker,
                device_ids,
                count_per_terminal=count,
                duration_s=args.duration,
                rate_per_s=args.rate,
                max_inflight=args.max_inflight,
                seed=args.seed,
                return_ratio=args.return_ratio,
                topic_template=args.topic_template,
            )
        )
    except (MqttError, ValueError) as err:
        print(f"simulate pos: {err}", file=sys.stderr)
        return 1
    if args.json:
        summary = {
            "published": result.published,
            "failed": result.failed,
            "errors": result.errors,
            "elapsed_s": round(result.elapsed_s, 3),
            "msgs_per_s": round(result.rate, 1),
            "expected_deltas": dict(sorted(result.expected_deltas.items())),
        }
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print(
            f"{result.total} messages acknowledged ({result.published['pos.sale']} sales, "
            f"{result.published['pos.return']} returns) from {len(device_ids)} terminals "
            f"in {result.elapsed_s:.2f} s ({result.rate:.0f} msg/s); {result.failed} failed"
        )
        for device_id, error in result.errors.items():
            print(f"  {device_id}: {error}")
    return 0 if not result.errors and not result.failed else 1
