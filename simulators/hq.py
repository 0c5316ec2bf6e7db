"""The simulated store's head office: it books the goods the store receives, as a real HQ does.

A store's stock rises only when goods are received. In a real chain HQ's ERP books the delivery and sends the
gateway a ``stock.adjust`` command with reason ``receiving``; :class:`SimulatedHq` does the same, over the HQ
broker on the gateway's commands topic, so the gateway's downlink applies it like any other HQ command:

- **replenishment**: when the gateway raises ``stock.low`` for a SKU, HQ orders it up to ``order_up_to`` units;
  the goods arrive ``lead_time_s`` (real seconds) later, and HQ books them then;
- **deliveries** a scenario plays (the ``delivery`` step): cases whose tags the back-room reader sees arrive.

Without it a simulated store only sells, and its stock runs negative within minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from cloud_bridge.signing import CommandSigner
from cloud_bridge.topics import commands_topic, responses_topic
from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError

_LOGGER = logging.getLogger(__name__)

ORDER_UP_TO: Final = 200
"""Units a replenishment order brings a SKU up to (the demo's shelves start at 200)."""
LEAD_TIME_S: Final = 5.0
"""Real seconds between HQ seeing a SKU low and the goods being booked in."""
RETRY_FIRST_S: Final = 0.5
RETRY_MAX_S: Final = 10.0
"""A booking that could not be published is retried after 0.5 s, doubling up to this."""
ANSWER_WAIT_S: Final = 2.0
"""A command not answered within this long is sent again (same request id: the gateway carries it out once)."""


class CommandRefusedError(MqttError):
    """The gateway answered a command with an error."""


@dataclass
class Delivery:
    """Goods booked in: what the live view shows."""

    sku: str
    units: int
    why: str


@dataclass
class SimulatedHq:
    """Books receiving for one gateway: ``start()``, then ``observe()`` each committed event; ``close()``.

    A SKU seen at or below its safety stock (any ``stock.level``, so a restart or a missed alert cannot leave it
    unstocked) is ordered once: it stays ordered until a level above its safety stock shows the goods arrived.
    A booking that cannot be published is retried, on a new connection, until it is: with the same request id,
    so the gateway applies it once."""

    broker: BrokerConfig
    prefix: str
    store_id: str
    gateway_id: str
    order_up_to: int = ORDER_UP_TO
    lead_time_s: float = LEAD_TIME_S
    on_delivery: Callable[[Delivery], None] | None = None
    signer: CommandSigner | None = None
    """HQ's command key (the gateway pins its public key in hq.command_keys): gateways obey only signed commands."""
    booked: list[Delivery] = field(default_factory=list)
    _client: MqttClient | None = None
    _ordered: set[str] = field(default_factory=set)
    """SKUs with an order on its way or not yet seen above their safety stock."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _closed: bool = False
    _answers: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> MqttClient:
        if self._client is not None and self._client.is_connected:
            return self._client
        if self._client is not None:
            await self._client.disconnect()
        self._client = MqttClient(
            self.broker,
            f"sim-hq-{self.store_id}-{self.gateway_id}",
            clean_start=True,
            on_message=self._answered,
        )
        await self._client.connect()
        await self._client.subscribe([(responses_topic(self.prefix, self.store_id, self.gateway_id), 1)])
        return self._client

    def _answered(self, message: Message) -> None:
        try:
            answer = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict):
            return
        waiting = self._answers.get(str(answer.get("request_id")))
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    async def command(self, command: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Send one signed command and return its result once the gateway answers ``ok`` (or ``duplicate``: a
        repeat of one it carried out). Sent again until answered: the gateway may not be subscribed yet.
        :class:`CommandRefusedError` for an error answer."""
        request_id = f"sim-{uuid.uuid4()}"
        topic = commands_topic(self.prefix, self.store_id, self.gateway_id)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = answer
        try:
            while not answer.done():
                if self.signer is not None:
                    payload = self.signer.sign(topic, request_id, command, dict(args))
                else:
                    payload = orjson.dumps({"request_id": request_id, "command": command, "args": dict(args)})
                with contextlib.suppress(MqttError):
                    client = await self._connect()
                    await client.publish(topic, payload, qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ANSWER_WAIT_S):
                        await asyncio.shield(answer)
            result = answer.result()
        finally:
            del self._answers[request_id]
        if result.get("status") not in ("ok", "duplicate"):
            raise CommandRefusedError(f"{command} refused: {result.get('error')}")
        found = result.get("result")
        return found if isinstance(found, dict) else {}

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.disconnect()

    def observe(self, event: Mapping[str, Any]) -> None:
        """An event the gateway committed (HQ receives it too): a low ``stock.level`` places an order."""
        if event.get("kind") != "stock.level" or self._closed:
            return
        data = event.get("data") or {}
        sku, safety = data.get("sku"), data.get("safety_stock")
        if not isinstance(sku, str) or safety is None:
            return
        try:
            on_hand, threshold = float(str(data.get("on_hand"))), float(str(safety))
        except ValueError:
            return
        if on_hand > threshold:
            self._ordered.discard(sku)  # the goods are in (or it never ran low): a later fall orders again
            return
        units = self.order_up_to - math.floor(on_hand)
        if units <= 0 or sku in self._ordered:
            return
        self._ordered.add(sku)
        self._spawn(self._arrive_later(sku, units), f"sim-hq-order-{sku}")

    def deliver(self, units_by_sku: Mapping[str, int], why: str) -> None:
        """Goods that arrived now (a scenario's delivery): book them at once."""
        for sku, units in units_by_sku.items():
            if units > 0 and not self._closed:
                self._spawn(self._book(sku, units, why), f"sim-hq-delivery-{sku}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _arrive_later(self, sku: str, units: int) -> None:
        await asyncio.sleep(self.lead_time_s)
        await self._book(sku, units, "replenishment")

    async def _book(self, sku: str, units: int, why: str) -> None:
        request_id = f"sim-{uuid.uuid4()}"
        args = {"sku": sku, "delta": units, "reason": "receiving", "note": why}
        topic = commands_topic(self.prefix, self.store_id, self.gateway_id)
        delay = RETRY_FIRST_S
        while True:
            # Signed afresh at each attempt (a retry may come after the last one's validity), with the same
            # request id: the gateway applies it once.
            if self.signer is not None:
                command = self.signer.sign(topic, request_id, "stock.adjust", args)
            else:
                command = orjson.dumps({"request_id": request_id, "command": "stock.adjust", "args": args})
            try:
                client = await self._connect()
                await client.publish(topic, command, qos=1)
                break
            except MqttError as err:
                log = _LOGGER.warning if delay == RETRY_FIRST_S else _LOGGER.debug
                log("simulated HQ: could not book %d x %s yet (retrying): %s", units, sku, err)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
        delivery = Delivery(sku, units, why)
        self.booked.append(delivery)
        if self.on_delivery is not None:
            self.on_delivery(delivery)
