"""A simulated RFID shelf publishing tag reads over MQTT (QoS 1), with tags appearing and disappearing.

Every scan (``--interval`` seconds) the shelf publishes one message, a list of reads ``{"epc", "rssi",
"antenna"}`` (the rfid-shelf-mqtt profile), with each tag on the shelf read one to three times. Between
scans a tag leaves with probability ``--leave`` and a new one is stocked with probability ``--arrive``.
EPCs are SGTIN-96 (GS1 EPC Tag Data Standard) for the catalog's GTINs.

:class:`Shelf` is pure (a seeded :class:`random.Random`); :func:`run_shelf` publishes over one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Coroutine, Sequence
from typing import Any, Final

import orjson

from drivers.epc import encode_sgtin96
from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import MqttClient
from simulators.cli import add_broker_arguments, publish_main

DEFAULT_TOPIC_TEMPLATE: Final = "store/rfid/{device_id}/reads"
GTINS: Final = ("80614141123458", "04890008100309", "09501101530003")
"""The TDS worked example's GTIN and two more with valid check digits."""


class Shelf:
    """The tags on one shelf, and the reads a scan of it produces."""

    def __init__(
        self,
        device_id: str,
        *,
        tags: int = 40,
        antennas: int = 2,
        leave: float = 0.02,
        arrive: float = 0.02,
        seed: int | None = None,
    ) -> None:
        self.device_id = device_id
        self._rng = random.Random(seed)
        self._antennas = antennas
        self._leave = leave
        self._arrive = arrive
        self._serial = 0
        self.present: set[str] = {self._new_epc() for _ in range(tags)}

    def _new_epc(self) -> str:
        self._serial += 1
        return encode_sgtin96(self._rng.choice(GTINS), self._serial).hex().upper()

    def step(self) -> None:
        """Between scans: some tags leave, some arrive."""
        rng = self._rng
        self.present = {epc for epc in self.present if rng.random() >= self._leave}
        for _ in range(max(1, len(self.present) // 10)):
            if rng.random() < self._arrive * 10:
                self.present.add(self._new_epc())

    def scan(self) -> list[dict[str, object]]:
        rng = self._rng
        reads: list[dict[str, object]] = []
        for epc in sorted(self.present):
            for _ in range(rng.randint(1, 3)):
                reads.append(
                    {
                        "epc": epc,
                        "rssi": round(rng.uniform(-75, -40), 1),
                        "antenna": rng.randint(1, self._antennas),
                    }
                )
        return reads

    def next_payload(self) -> bytes:
        self.step()
        return orjson.dumps(self.scan())


async def run_shelf(
    broker: BrokerConfig,
    device_id: str,
    *,
    scans: int,
    interval_s: float = 1.0,
    tags: int = 40,
    seed: int | None = None,
    topic_template: str = DEFAULT_TOPIC_TEMPLATE,
) -> int:
    """Publish ``scans`` scans QoS 1; returns how many the broker acknowledged."""
    shelf = Shelf(device_id, tags=tags, seed=seed)
    topic = topic_template.format(device_id=device_id)
    client = MqttClient(broker, f"sim-shelf-{device_id}", clean_start=True)
    await client.connect()
    acked = 0
    try:
        for _ in range(scans):
            await client.publish(topic, shelf.next_payload(), qos=1)
            acked += 1
            if interval_s > 0:
                await asyncio.sleep(interval_s)
    finally:
        await client.disconnect()
    return acked


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate rfid-shelf", description=__doc__.split("\n")[0]
    )
    add_broker_arguments(parser)
    parser.add_argument("--device-id", default="shelf-01", help="Shelf device id (default shelf-01).")
    parser.add_argument("--scans", type=int, default=30, help="Scans to publish (default 30).")
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between scans (default 1).")
    parser.add_argument("--tags", type=int, default=40, help="Tags on the shelf at the start (default 40).")
    parser.add_argument("--seed", type=int, help="Seed for reproducible tags and reads.")
    parser.add_argument("--topic-template", default=DEFAULT_TOPIC_TEMPLATE, help="Default %(default)s.")
    return parser


def main(argv: Sequence[str]) -> int:
    """``store-gateway simulate rfid-shelf ...``: 0 when every scan was acknowledged by the broker."""
    args = _parser().parse_args(list(argv))

    def run(broker: BrokerConfig) -> Coroutine[Any, Any, int]:
        return run_shelf(
            broker,
            args.device_id,
            scans=args.scans,
            interval_s=args.interval,
            tags=args.tags,
            seed=args.seed,
            topic_template=args.topic_template,
        )

    return publish_main("rfid-shelf", args, run, "scans", args.scans)
