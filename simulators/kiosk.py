"""A simulated staff check-in kiosk publishing ``staff.checkin`` messages over MQTT (QoS 1).

The message is the checkin-kiosk profile's (firmware_configs/profiles/checkin-kiosk.yaml): employee id, GPS
fix and accuracy, the kiosk's own face-match score and its time; never an image. ``--bad-every N`` makes
every Nth message carry a fake face image (random base64), which the gateway must refuse as
``biometric_refused`` and quarantine without its payload.

:class:`Kiosk` is pure (a seeded :class:`random.Random`); :func:`run_kiosk` publishes over one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import random
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Final

import orjson

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import MqttClient
from simulators.cli import add_broker_arguments, publish_main

DEFAULT_TOPIC_TEMPLATE: Final = "store/kiosk/{device_id}/checkin"
HKT: Final = timezone(timedelta(hours=8), "HKT")
STORE_LAT: Final = 22.2819
STORE_LON: Final = 114.1585
METRES_PER_DEGREE: Final = 111_195.0
"""Along a meridian (mean Earth radius 6,371 km): how far north a latitude step goes."""


def _hk_now() -> datetime:
    return datetime.now(HKT)


class Kiosk:
    """Check-ins of a small staff near the store (a few from far away, a few poor face matches)."""

    def __init__(
        self,
        device_id: str,
        *,
        staff: int = 12,
        seed: int | None = None,
        clock: Callable[[], datetime] = _hk_now,
        location: tuple[float, float] = (STORE_LAT, STORE_LON),
    ) -> None:
        """``location``: the store's latitude and longitude; check-ins come from around it."""
        self.device_id = device_id
        self.latitude, self.longitude = location
        self._rng = random.Random(seed)
        self._staff = [f"E{1000 + n}" for n in range(staff)]
        self._inside: set[str] = set()
        self._clock = clock
        self._sent = 0

    def next_body(self) -> dict[str, object]:
        rng = self._rng
        employee = rng.choice(self._staff)
        direction = "out" if employee in self._inside else "in"
        self._inside.symmetric_difference_update({employee})
        far = rng.random() < 0.05
        spread = 0.05 if far else 0.0003
        self._sent += 1
        # Distinct milliseconds per message: the kiosk time is part of the check-in's dedup key.
        stamp = self._clock() + timedelta(milliseconds=self._sent)
        return {
            "employee_id": employee,
            "direction": direction,
            "latitude": round(self.latitude + rng.uniform(-spread, spread), 6),
            "longitude": round(self.longitude + rng.uniform(-spread, spread), 6),
            "accuracy_m": round(rng.uniform(3, 40), 1),
            "face_match_score": round(
                rng.uniform(0.55, 0.8) if rng.random() < 0.05 else rng.uniform(0.85, 0.99), 3
            ),
            "kiosk_time": stamp.isoformat(timespec="milliseconds"),
        }

    def next_payload(self) -> bytes:
        return orjson.dumps(self.next_body())

    def checkin_payload(self, employee: str, direction: str, distance_m: float = 0.0) -> bytes:
        """One employee's check-in with a good fix (8 m) and face match, ``distance_m`` north of the store."""
        self._sent += 1
        stamp = self._clock() + timedelta(milliseconds=self._sent)
        latitude = self.latitude + distance_m / METRES_PER_DEGREE
        body = {
            "employee_id": employee,
            "direction": direction,
            "latitude": round(latitude, 7),
            "longitude": round(self.longitude, 7),
            "accuracy_m": 8.0,
            "face_match_score": 0.95,
            "kiosk_time": stamp.isoformat(timespec="milliseconds"),
        }
        if not math.isfinite(latitude) or abs(latitude) > 90:
            raise ValueError(f"{distance_m} m north of the store is off the globe")
        return orjson.dumps(body)

    def biometric_payload(self) -> bytes:
        """A check-in that wrongly carries a face image: the gateway must refuse it."""
        body = self.next_body()
        body["face_image"] = base64.b64encode(self._rng.randbytes(600)).decode()
        return orjson.dumps(body)


async def run_kiosk(
    broker: BrokerConfig,
    device_id: str,
    *,
    count: int,
    rate_per_s: float = 1.0,
    bad_every: int = 0,
    seed: int | None = None,
    topic_template: str = DEFAULT_TOPIC_TEMPLATE,
) -> int:
    """Publish ``count`` check-ins QoS 1 and wait for each PUBACK; returns how many the broker acknowledged."""
    kiosk = Kiosk(device_id, seed=seed)
    topic = topic_template.format(device_id=device_id)
    client = MqttClient(broker, f"sim-kiosk-{device_id}", clean_start=True)
    await client.connect()
    acked = 0
    try:
        for n in range(1, count + 1):
            bad = bad_every > 0 and n % bad_every == 0
            await client.publish(topic, kiosk.biometric_payload() if bad else kiosk.next_payload(), qos=1)
            acked += 1
            if rate_per_s > 0:
                await asyncio.sleep(1 / rate_per_s)
    finally:
        await client.disconnect()
    return acked


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="store-gateway simulate kiosk", description=__doc__.split("\n")[0])
    add_broker_arguments(parser)
    parser.add_argument("--device-id", default="kiosk-01", help="Kiosk device id (default kiosk-01).")
    parser.add_argument("--count", type=int, default=20, help="Check-ins to send (default 20).")
    parser.add_argument("--rate", type=float, default=1.0, help="Check-ins per second; 0 = flat out.")
    parser.add_argument("--bad-every", type=int, default=0, help="Every Nth carries a face image (refused).")
    parser.add_argument("--seed", type=int, help="Seed for reproducible check-ins.")
    parser.add_argument("--topic-template", default=DEFAULT_TOPIC_TEMPLATE, help="Default %(default)s.")
    return parser


def main(argv: Sequence[str]) -> int:
    """``store-gateway simulate kiosk ...``: 0 when every check-in was acknowledged by the broker."""
    args = _parser().parse_args(list(argv))

    def run(broker: BrokerConfig) -> Coroutine[Any, Any, int]:
        return run_kiosk(
            broker,
            args.device_id,
            count=args.count,
            rate_per_s=args.rate,
            bad_every=args.bad_every,
            seed=args.seed,
            topic_template=args.topic_template,
        )

    return publish_main("kiosk", args, run, "check-ins", args.count)
