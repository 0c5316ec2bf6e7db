"""``store-gateway demo``: the whole chain on one machine, with nothing installed but this package.

Two embedded MQTT brokers (amqtt: one for the store, one standing in for HQ), a simulated store played from a
scenario file (``--scenario``, default ``normal-day``: tills, fridge controllers over Modbus TCP and RTU, BLE
thermometers, an RFID reader on a pseudo-terminal, an RFID shelf and a check-in kiosk over MQTT), the gateway
itself (drivers, journal, stock ledger, uplink, local API) and the HQ reference receiver. The terminal shows
live what the tills send, what the gateway commits and what HQ receives. The scenario repeats until Ctrl-C (or
``--duration``), which stops everything cleanly and prints a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

from cloud_bridge.receiver import HqReceiver
from cloud_bridge.receiver_store import ReceiverStore
from drivers.ble.driver import BleDriver
from gateway.config import BrokerConfig
from gateway.config_loader import config_hash, demo_config
from gateway.journal import Committed
from gateway.logs import setup_logging
from gateway.runtime import Gateway
from simulators.pos import PosMessage
from simulators.scenario import ScenarioRun, StepLog
from simulators.scenario_model import Scenario, load_scenario

_LOGGER = logging.getLogger(__name__)

DEFAULT_SCENARIO = "normal-day"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start_broker(port: int) -> Any:
    from amqtt.broker import Broker  # the embedded broker is only for the demo

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    return broker


class LiveView:
    """Prints one line per till message, gateway commit and HQ batch, plus a periodic summary."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._color = out.isatty()
        self.sent: dict[str, int] = {"pos.sale": 0, "pos.return": 0}
        self.committed = 0
        self.alerts = 0
        self.hq_events = 0
        self._started = time.monotonic()

    def _line(self, who: str, color: str, text: str) -> None:
        stamp = f"{time.monotonic() - self._started:7.1f}s"
        tag = f"\033[{color}m{who:<7}\033[0m" if self._color else f"{who:<7}"
        print(f"{stamp} {tag} {text}", file=self._out, flush=True)

    def till(self, message: PosMessage) -> None:
        self.sent[message.kind] += 1
        doc = orjson.loads(message.payload)
        units = sum(int(line["quantity"]) for line in doc["lines"])
        self._line(
            "till",
            "36",
            f"{message.device_id} {message.action:<6} {message.receipt_no}  {units} unit(s)  "
            f"{doc['currency']} {doc['totals']['total']}",
        )

    def gateway(self, committed: Committed) -> None:
        self.committed += len(committed.bodies)
        for body in committed.bodies:
            event = orjson.loads(body)
            kind, data, device = event["kind"], event["data"], event["device_id"]
            color = "33"
            if kind == "stock.level":
                delta = data["delta"] if data["delta"].startswith("-") else "+" + data["delta"]
                text = f"stock  {data['sku']} on hand {data['on_hand']} ({delta})"
            elif kind == "alert.raised":
                self.alerts += 1
                color = "31"
                text = f"ALERT  {data['rule']}: {data['message']}"
            elif kind in ("pos.sale", "pos.return"):
                text = f"{kind:<10} {device} receipt {data['receipt_no']}"
            elif kind == "sensor.sample":
                values = ", ".join(
                    f"{name} {value:g}{data.get('units', {}).get(name, '')}"
                    for name, value in list(data["values"].items())[:4]
                )
                faults = f"  faults: {', '.join(data['faults'])}" if data.get("faults") else ""
                text = f"sample {device}: {values}{faults}"
            elif kind == "rfid.inventory":
                text = (
                    f"rfid   {device}: {len(data['tags'])} tags, {data['reads']} reads, "
                    f"+{len(data.get('appeared', []))} -{len(data.get('departed', []))}"
                )
            elif kind == "staff.checkin":
                text = f"checkin {data['employee_id']} {data['direction']} (face match {data['face_match_score']})"
            elif kind == "device.status":
                color = "35" if data["status"] != "online" else "33"
                text = f"device {device}: {data['status']}" + (
                    f" ({data['reason']})" if data.get("reason") else ""
                )
            else:
                text = f"{kind} {data.get('status', '')}"
            self._line("gateway", color, f"seq {event['seq']:>5}  {text}")
        for rejected in committed.rejected:
            self._line(
                "gateway", "31", f"quarantined from {rejected.device_id or rejected.topic}: {rejected.reason}"
            )

    def step(self, entry: StepLog) -> None:
        self._line("scenario", "34", f"{entry.action} {entry.device or ''} {entry.detail}")

    def hq(self, store: str, gateway: str, first: int, last: int, new: int) -> None:
        self.hq_events += new
        self._line(
            "HQ", "32", f"{store}/{gateway} batch seq {first}..{last}: {new} new, {self.hq_events} in total"
        )


def run_demo(
    duration: float = 0, rate: float = 1.0, data_dir: Path | None = None, scenario: str = DEFAULT_SCENARIO
) -> int:
    setup_logging("WARNING")
    try:
        played = load_scenario(scenario)
    except (OSError, ValueError) as err:
        print(f"store-gateway demo: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="store-gateway-demo-") as tmp:
        directory = data_dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        asyncio.run(_demo(duration, rate, directory, played, Path(tmp)))
    return 0


async def _demo(duration: float, rate: float, data_dir: Path, scenario: Scenario, work: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store_port, hq_port = _free_port(), _free_port()
    token = secrets.token_urlsafe(24)
    view = LiveView(sys.stdout)
    tills = scenario.devices.tills.model_copy(update={"rate_per_s": rate})
    scenario = scenario.model_copy(update={"devices": scenario.devices.model_copy(update={"tills": tills})})
    store = ScenarioRun(
        scenario, BrokerConfig(port=store_port, protocol="3.1.1"), work, on_step=view.step, on_till=view.till
    )
    store_broker = await _start_broker(store_port)
    hq_broker = await _start_broker(hq_port)
    await store.prepare()
    config = demo_config(data_dir, store_port, hq_port, 0, token, sections=store.gateway_config())
    gateway = Gateway(config, config_hash(config))
    gateway.journal.add_listener(view.gateway)
    hq_store = ReceiverStore(data_dir / "hq.db")
    receiver = HqReceiver(
        BrokerConfig(port=hq_port, protocol="3.1.1"), hq_store, client_id="demo-hq-receiver", on_batch=view.hq
    )
    receiver_stop = asyncio.Event()
    gateway_stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            gw_task = tg.create_task(gateway.run(gateway_stop), name="gateway")
            rx_task = tg.create_task(receiver.run(receiver_stop), name="hq-receiver")
            api_port = await gateway.wait_api()
            print(
                f"store-gateway demo: scenario {scenario.scenario!r} ({scenario.description})\n"
                f"store broker 127.0.0.1:{store_port}, HQ broker 127.0.0.1:{hq_port} (embedded)\n"
                f"local API: http://127.0.0.1:{api_port}/health  (token for /api/*, /metrics: {token})\n"
                f"journal: {data_dir / 'journal.db'}   Ctrl-C stops.\n",
                flush=True,
            )
            if duration:
                loop.call_later(duration, stop.set)
            ble = next((d for d in gateway.intakes if isinstance(d, BleDriver)), None)
            while not stop.is_set() and not gw_task.done():
                await store.run(ble, stop)
            gateway_stop.set()
            await gw_task
            # Give HQ a moment for the last batches, then stop it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while view.hq_events < gateway.journal.delivered_seq:  # noqa: ASYNC110 - bounded, 3 s
                        await asyncio.sleep(0.1)
            receiver_stop.set()
            await rx_task
    finally:
        await store.close()
        await store_broker.shutdown()
        await hq_broker.shutdown()
        summary = hq_store.summary()
        hq_store.close()
    gaps = sum(row.gaps for row in summary)
    print(
        f"\nsummary: tills sent {view.sent['pos.sale']} sales and {view.sent['pos.return']} returns; "
        f"the gateway committed {view.committed} events (last seq {gateway.journal.last_seq}, "
        f"{view.alerts} alert(s)); HQ received {view.hq_events}, seq gaps at HQ: {gaps}",
        flush=True,
    )
