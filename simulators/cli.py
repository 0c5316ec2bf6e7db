"""``store-gateway simulate NAME ...``: one entry per simulator; each module has ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import MqttError

SIMULATORS: Final[dict[str, tuple[str, str]]] = {
    "pos": ("simulators.pos", "POS terminals publishing sales and returns to the store broker (MQTT)."),
    "kiosk": ("simulators.kiosk", "A staff check-in kiosk publishing check-ins (MQTT; never an image)."),
    "rfid-shelf": (
        "simulators.rfid_shelf",
        "An RFID shelf publishing tag reads, tags coming and going (MQTT).",
    ),
    "ble": (
        "simulators.ble",
        "BLE fridge sensors: advertisement bytes in BTHome, Ruuvi, ATC1441 or pvvx format.",
    ),
    "rfid-reader": (
        "simulators.rfid_reader",
        "A Chafon-style UHF RFID reader on a pty, tags coming and going.",
    ),
    "fridge": (
        "simulators.fridge",
        "A fridge controller on Modbus TCP or RTU over a pty, with temperature dynamics.",
    ),
    "sensors": ("simulators.sensors", "Store sensors publishing telemetry readings (MQTT)."),
    "webhooks": ("simulators.webhooks", "Cloud POS sending signed webhooks (Lightspeed, Square, generic)."),
}
"""Simulator name -> (module with ``main(argv) -> int``, one-line help). A new simulator is one line here."""


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port`` and ``--protocol`` of the store broker, for simulators that publish over MQTT."""
    parser.add_argument("--host", default="127.0.0.1", help="Store broker host (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=1883, help="Store broker port (default 1883).")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="5", help="MQTT version (default 5).")


def broker_from(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig(host=args.host, port=args.port, protocol=args.protocol)


def publish_main(
    name: str,
    args: argparse.Namespace,
    run: Callable[[BrokerConfig], Coroutine[Any, Any, int]],
    what: str,
    expected: int,
) -> int:
    """Run a device simulator against the broker its arguments name: 0 when the broker acknowledged all
    ``expected`` messages, 1 when it did not or could not be reached."""
    try:
        acked = asyncio.run(run(broker_from(args)))
    except (MqttError, OSError) as err:
        print(f"{name}: cannot publish to {args.host}:{args.port}: {err}")
        return 1
    print(f"{name} {args.device_id}: {acked} {what} acknowledged by the broker")
    return 0 if acked == expected else 1


def usage() -> str:
    width = max(len(name) for name in SIMULATORS)
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in SIMULATORS.items()]
    return (
        "usage: store-gateway simulate NAME [options]   ('simulate NAME --help' for a simulator's options)\n\n"
        "simulators:\n" + "\n".join(lines)
    )


def simulate_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    entry = SIMULATORS.get(args[0])
    if entry is None:
        print(f"store-gateway simulate: unknown simulator {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    code: int = module.main(args[1:])
    return code
