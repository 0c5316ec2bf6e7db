"""A lean QoS 1 subscriber: the other half of the broker's own ceiling in bench/e2e_throughput.py.

It subscribes as the gateway's intake does (persistent session, QoS 1, the same Receive Maximum, the gateway's
own MQTT client and its buffered receive path), acknowledges every message at once (no decode, no commit), and
prints the wall-clock time of the ``count``-th message as one line, then exits.

    python bench/mqtt_sink.py --port 1883 --topic 'store/pos/+/sale' --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient


async def sink(port: int, topic: str, count: int) -> float:
    """Wall-clock time at which the ``count``-th message arrived."""
    done = asyncio.Event()
    received = 0
    last = 0.0

    def on_message(_message: Message) -> None:
        nonlocal received, last
        received += 1
        if received == count:
            last = time.time()
            done.set()

    client = MqttClient(
        BrokerConfig(host="127.0.0.1", port=port), "bench-sink", clean_start=False, on_message=on_message
    )
    await client.connect()
    await client.subscribe([(topic, 1)])
    print("subscribed", flush=True)
    await done.wait()
    await client.disconnect()
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    print(f"last {asyncio.run(sink(args.port, args.topic, args.count)):.6f}", flush=True)


if __name__ == "__main__":
    main()
