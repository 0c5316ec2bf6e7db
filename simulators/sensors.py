"""Simulated store sensors: telemetry readings (``sensor.reading``) published over MQTT, QoS 1.

A sensor publishes each reading to ``store/sensor/<device_id>/reading``; the payload is the JSON of
:class:`gateway.kernel.events.SensorReading` plus ``occurred_at`` (ISO 8601 with an offset). Readings are the
telemetry class of the outbox (docs/OUTBOX.md): the first evicted when the gateway's disk budget runs out, so
tests use this simulator to fill a journal while HQ is down.

:class:`SensorProbe` is pure (a seeded :class:`random.Random`, no I/O); :func:`run_sensors` drives one MQTT
connection per sensor with a bounded number of publishes awaiting PUBACK and counts what the broker
acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Final

import orjson

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import MqttClient, MqttError
from simulators.cli import add_broker_arguments, broker_from

DEFAULT_TOPIC_TEMPLATE: Final = "store/sensor/{device_id}/reading"
HKT: Final = timezone(timedelta(hours=8), "HKT")

_METRICS: Final = (("temperature", "C", 4.0, 1.5), ("humidity", "%", 55.0, 8.0), ("power", "W", 900.0, 120.0))
"""(metric, unit, mean, standard deviation): a chiller probe, a humidity probe, a power meter."""


def _hk_now() -> datetime:
    return datetime.now(HKT)


class SensorProbe:
    """A sensor that reads one metric (picked from the seed) around a plausible mean."""

    def __init__(
        self, device_id: str, *, seed: int | str | None = None, clock: Callable[[], datetime] = _hk_now
    ) -> None:
        self.device_id = device_id
        self._rng = random.Random(seed)
        self.metric, self.unit, self._mean, self._sd = self._rng.choice(_METRICS)
        self._clock = clock

    def next_payload(self) -> bytes:
        value = round(self._rng.gauss(self._mean, self._sd), 2)
        body = {
            "metric": self.metric,
            "value": value,
            "unit": self.unit,
            "occurred_at": self._clock().isoformat(timespec="milliseconds"),
        }
        return orjson.dumps(body)


@dataclass(slots=True)
class SensorResult:
    """What the broker acknowledged, per sensor."""

    published: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    """Publishes whose PUBACK never came (the connection dropped)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Per device id, why that sensor stopped early."""

    @property
    def total(self) -> int:
        return sum(self.published.values())


async def run_sensors(
    broker: BrokerConfig,
    device_ids: Sequence[str],
    *,
    count_per_sensor: int,
    rate_per_s: float = 0.0,
    max_inflight: int = 200,
    seed: int | None = None,
    topic_template: str = DEFAULT_TOPIC_TEMPLATE,
) -> SensorResult:
    """Publish ``count_per_sensor`` readings from each sensor (one connection each), then wait for the
    outstanding PUBACKs. ``rate_per_s`` is per sensor; 0 means as fast as the broker acknowledges. Cannot
    connect: raises :class:`MqttError`; a connection that drops later stops that sensor (``errors``)."""
    if count_per_sensor < 0 or rate_per_s < 0 or max_inflight < 1:
        raise ValueError("count_per_sensor and rate_per_s must be >= 0, max_inflight >= 1")
    if len(set(device_ids)) != len(device_ids):
        raise ValueError("device ids must be unique")
    result = SensorResult(published=dict.fromkeys(device_ids, 0))
    clients = [MqttClient(broker, f"sim-{d}", clean_start=True) for d in device_ids]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        async with asyncio.TaskGroup() as tg:
            for index, (device_id, client) in enumerate(zip(device_ids, clients, strict=True)):
                probe = SensorProbe(device_id, seed=None if seed is None else f"{seed}:{device_id}")
                topic = topic_template.format(device_id=device_id)
                tg.create_task(
                    _drive(
                        probe,
                        client,
                        topic,
                        result,
                        count_per_sensor,
                        rate_per_s,
                        max_inflight,
                        phase=index / len(device_ids),
                    ),
                    name=f"sim-{device_id}",
                )
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))
    return result


async def _drive(
    probe: SensorProbe,
    client: MqttClient,
    topic: str,
    result: SensorResult,
    count: int,
    rate_per_s: float,
    max_inflight: int,
    *,
    phase: float = 0.0,
) -> None:
    """Publish ``count`` readings; with a rate, ``phase`` (a fraction of the interval) staggers the sensors as
    real ones are, each on its own clock."""
    loop = asyncio.get_running_loop()
    window = asyncio.Semaphore(max_inflight)
    interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    started = loop.time() + phase * interval
    error: list[BaseException] = []

    def acked(fut: asyncio.Future[None]) -> None:
        window.release()
        failure = MqttError("publish cancelled") if fut.cancelled() else fut.exception()
        if failure is None:
            result.published[probe.device_id] += 1
        else:
            result.failed += 1
            error.append(failure)

    for n in range(count):
        if error:
            break
        if interval and (delay := started + n * interval - loop.time()) > 0:
            await asyncio.sleep(delay)
        await window.acquire()
        client.publish(topic, probe.next_payload(), qos=1).add_done_callback(acked)
    for _ in range(max_inflight):  # every outstanding PUBACK (or failure)
        await window.acquire()
    if error:
        result.errors[probe.device_id] = str(error[0])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate sensors",
        description="Store sensors publishing telemetry readings (sensor.reading) to the store broker, QoS 1.",
    )
    add_broker_arguments(parser)
    parser.add_argument(
        "--device-ids", default="sensor-01", help="Comma-separated sensor ids (default sensor-01)."
    )
    parser.add_argument("--count", type=int, default=100, help="Readings per sensor (default 100).")
    parser.add_argument("--rate", type=float, default=1.0, help="Readings per second per sensor (default 1).")
    parser.add_argument("--seed", type=int, help="Seed for reproducible readings.")
    parser.add_argument("--topic-template", default=DEFAULT_TOPIC_TEMPLATE, help="Default %(default)s.")
    return parser


def main(argv: Sequence[str]) -> int:
    """``store-gateway simulate sensors ...``: 0 when the broker acknowledged every reading."""
    args = _parser().parse_args(list(argv))
    device_ids = [d.strip() for d in args.device_ids.split(",") if d.strip()]
    try:
        result = asyncio.run(
            run_sensors(
                broker_from(args),
                device_ids,
                count_per_sensor=args.count,
                rate_per_s=args.rate,
                seed=args.seed,
                topic_template=args.topic_template,
            )
        )
    except (MqttError, OSError, ValueError) as err:
        print(f"simulate sensors: {err}", file=sys.stderr)
        return 1
    print(
        f"{result.total} readings acknowledged by the broker from {len(device_ids)} sensors; {result.failed} failed"
    )
    for device_id, error in result.errors.items():
        print(f"  {device_id}: {error}")
    return 0 if result.total == args.count * len(device_ids) else 1
