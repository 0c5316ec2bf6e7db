"""``store-gateway demo``: the whole chain on one machine, with nothing installed but this package.

Two embedded MQTT brokers (amqtt: one for the store, one standing in for HQ), a simulated store played from a
scenario file (``--scenario``, default ``normal-day``: tills, fridge controllers over Modbus TCP and RTU, BLE
thermometers, an RFID reader on a pseudo-terminal, an RFID shelf and a check-in kiosk over MQTT), the gateway
itself (drivers, journal, stock ledger, uplink, local API), the HQ reference receiver, and a simulated HQ that
books the store's deliveries. The scenario's rules run in the gateway, and their alerts go to a local chat
robot (:mod:`simulators.chat`, a DingTalk robot that checks each message's signature) through a ``dingtalk``
channel. The terminal shows a calm live view: what each device did in the last seconds, the stock that moved,
alerts as they are raised and cleared (the gateway's, and the fridge controllers' own alarm bits), the chat
robot's messages, and what HQ has. ``--verbose`` prints every till message, commit, alert, chat message and HQ
batch as a line stream instead. The scenario repeats until Ctrl-C (or ``--duration``), which stops everything
cleanly and prints a summary.
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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.config import CommandKey
from cloud_bridge.hq.service import HqReceiver
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.signing import CommandSigner, public_key_text
from drivers.ble.driver import BleDriver
from gateway.config_loader import config_hash, demo_config
from gateway.kernel.clock import ClockState
from gateway.kernel.config import BrokerConfig
from gateway.kernel.journal import Committed
from gateway.kernel.logs import setup_logging
from gateway.runtime import Gateway
from simulators.ble import SimulatedRadio
from simulators.chat import ChatRobot
from simulators.hq import Delivery, SimulatedHq
from simulators.pos import PosMessage
from simulators.scenario import ScenarioRun, StepLog
from simulators.scenario_model import Scenario, load_scenario

_LOGGER = logging.getLogger(__name__)

DEFAULT_SCENARIO: Final = "normal-day"
WINDOW_S: Final = 10.0
"""The live view shows what each device did in the last this many seconds."""
TTY_REFRESH_S: Final = 1.0
PIPE_REFRESH_S: Final = 5.0
"""Written to a pipe or file, the view is a block of lines every this many seconds (nothing is redrawn)."""
ALERTS_SHOWN: Final = 6
CHAT_SHOWN: Final = 4
CHAT_CHANNEL: Final = "demo-chat"
"""The demo's dingtalk channel: every rule of the scenario, and the stock.low alerts, notify it."""


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


def is_alarm_value(name: str) -> bool:
    """A controller's alarm bit, as profiles name them (``high_temp_alarm``, ``alarm_probe``)."""
    return name.endswith("_alarm") or name.startswith("alarm_")


def sample_text(data: dict[str, Any]) -> str:
    """One reading in a few words: its temperatures first, then door, defrost and battery."""
    values: dict[str, float] = data.get("values", {})
    units: dict[str, str] = data.get("units", {})
    parts = [
        f"{name.removesuffix('_temperature').removesuffix('temperature') or 'temp'} {value:.1f}{units.get(name, '')}"
        for name, value in values.items()
        if "temperature" in name and "threshold" not in name
    ][:3]
    if values.get("door_open") or values.get("opening"):
        parts.append("door OPEN")
    if values.get("defrost") or values.get("defrost_active"):
        parts.append("defrosting")
    if "battery" in values and values["battery"] < 20:
        parts.append(f"battery {values['battery']:g} %")
    if data.get("faults"):
        parts.append(f"faults: {', '.join(data['faults'])}")
    return ", ".join(parts) or ", ".join(f"{k} {v:g}" for k, v in list(values.items())[:3])


@dataclass
class _Activity:
    """What one device did within the window."""

    counts: dict[str, int] = field(default_factory=dict)
    last: str = ""


@dataclass
class _Alert:
    at: float
    text: str
    active: bool = True


class LiveView:
    """What the demo shows: a calm screen (default) or a line per message, commit and HQ batch (verbose).

    Fed from the gateway's commit listener, the scenario's steps, the tills and the HQ receiver; ``render()``
    draws the screen from what it gathered."""

    def __init__(self, out: TextIO, scenario: Scenario, verbose: bool = False) -> None:
        self._out = out
        self._scenario = scenario
        self._verbose = verbose
        self._tty = out.isatty()
        self._color = self._tty
        self.sent: dict[str, int] = {"pos.sale": 0, "pos.return": 0}
        self.committed = 0
        self.alerts = 0
        self.cleared = 0
        self.chat_messages = 0
        self.controller_alarms = 0
        self.hq_events = 0
        self.negative_stock: set[str] = set()
        self.hq_line = "HQ: waiting for the first batch"
        self._started = time.monotonic()
        self._activity: dict[str, deque[tuple[float, str, str]]] = {}
        self._status: dict[str, str] = {}
        self._stock: dict[str, tuple[str, str | None]] = {}
        self._moves: deque[tuple[float, str, float]] = deque(maxlen=10_000)
        self._alarm_bits: dict[tuple[str, str], _Alert] = {}
        self._alert_log: deque[_Alert] = deque(maxlen=ALERTS_SHOWN)
        self._open: dict[str, _Alert] = {}
        """The gateway's open alerts, by alert id."""
        self._chat: deque[str] = deque(maxlen=CHAT_SHOWN)
        self._notes: deque[str] = deque(maxlen=4)
        self._last_step = ""
        self._values: dict[str, dict[str, dict[str, Any]]] = {}
        self.footer: list[str] = []
        """Lines under the view: where the local API is, how to stop."""

    # --- feeds --------------------------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _line(self, who: str, color: str, text: str) -> None:
        tag = f"\033[{color}m{who:<8}\033[0m" if self._color else f"{who:<8}"
        print(f"{self._now():7.1f}s {tag} {text}", file=self._out, flush=True)

    def till(self, message: PosMessage) -> None:
        self.sent[message.kind] += 1
        if self._verbose:
            doc = orjson.loads(message.payload)
            units = sum(int(line["quantity"]) for line in doc["lines"])
            self._line(
                "till",
                "36",
                f"{message.device_id} {message.action:<6} {message.receipt_no}  {units} unit(s)  "
                f"{doc['currency']} {doc['totals']['total']}",
            )

    def _did(self, device: str, what: str, text: str) -> None:
        self._activity.setdefault(device, deque(maxlen=2000)).append((self._now(), what, text))

    def _alert(self, text: str, active: bool = True) -> _Alert:
        alert = _Alert(self._now(), text, active)
        self._alert_log.append(alert)
        return alert

    def chat(self, text: str) -> None:
        """A message the chat robot took (its signature checked)."""
        self.chat_messages += 1
        self._chat.append(f"{self._now():6.0f} s  {text}")
        if self._verbose:
            self._line("chat", "35", text)

    def gateway(self, committed: Committed) -> None:
        self.committed += len(committed.bodies)
        for body in committed.bodies:
            event = orjson.loads(body)
            text = self._take(event)
            if self._verbose:
                color = "31" if event["kind"].startswith("alert") or text.startswith("ALARM") else "33"
                self._line("gateway", color, f"seq {event['seq']:>5}  {text}")
        for rejected in committed.rejected:
            who = rejected.device_id or rejected.topic or "unknown"
            self._did(who, "quarantined", rejected.reason)
            if self._verbose:
                self._line("gateway", "31", f"quarantined from {who}: {rejected.reason}")

    def _take(self, event: dict[str, Any]) -> str:
        """Update the view's state from one committed event; returns its one-line description."""
        kind, data, device = event["kind"], event["data"], event["device_id"]
        if kind == "stock.level":
            sku, on_hand = data["sku"], data["on_hand"]
            self._stock[sku] = (on_hand, data.get("safety_stock"))
            self._moves.append((self._now(), sku, float(data["delta"])))
            if float(on_hand) < 0:
                self.negative_stock.add(sku)
            delta = data["delta"] if data["delta"].startswith("-") else "+" + data["delta"]
            return f"stock  {sku} on hand {on_hand} ({delta})"
        if kind == "stock.adjusted":
            return f"stock  {data['sku']} {data.get('reason')} {data.get('delta') or data.get('set')}"
        if kind == "alert.raised":
            self.alerts += 1
            alert = self._alert(f"{data['rule']}: {data['message']}")
            self._open[str(data.get("details", {}).get("alert_id"))] = alert
            return f"ALERT  {data['rule']}: {data['message']}"
        if kind == "alert.cleared":
            self.cleared += 1
            opened = self._open.pop(str(data.get("alert_id")), None)
            if opened is not None:
                opened.active = False
            self._alert(f"{data['rule']} cleared: {data['message']}", active=False)
            return f"CLEARED {data['rule']}: {data['message']}"
        if kind == "document.updated":
            self._notes.append(
                f"HQ's {data['name']} stored (version {data['version']}, {data['count']} entries)"
            )
            return f"HQ's {data['name']} stored: version {data['version']}, {data['count']} entries"
        if kind in ("notification.sent", "notification.failed"):
            outcome = "sent to" if kind == "notification.sent" else "FAILED to reach"
            return f"notify {data['level']} {data['alert_id']} {outcome} {data['channel']}"
        if kind in ("pos.sale", "pos.return"):
            self._did(device, "sales" if kind == "pos.sale" else "returns", "")
            return f"{kind:<10} {device} receipt {data['receipt_no']}"
        if kind == "sensor.sample":
            # A controller's groups come in separate samples: describe the device from all its latest values.
            latest = self._values.setdefault(device, {"values": {}, "units": {}})
            latest["values"].update(data.get("values", {}))
            latest["units"].update(data.get("units", {}))
            text = sample_text({**latest, "faults": data.get("faults")})
            alarms = self._alarm_changes(device, data.get("values", {}), text)
            self._did(device, "readings", text)
            return f"sample {device}: {text}" + (f"  {alarms}" if alarms else "")
        if kind == "rfid.inventory":
            text = (
                f"{len(data['tags'])} tags (+{len(data.get('appeared', []))}"
                f" -{len(data.get('departed', []))})"
            )
            self._did(device, "scans", text)
            return f"rfid   {device}: {text}, {data['reads']} reads"
        if kind == "staff.checkin":
            text = f"{data['employee_id']} {data['direction']}"
            self._did(device, "check-ins", text)
            return f"checkin {text} (face match {data['face_match_score']})"
        if kind == "device.status":
            status = data["status"]
            self._status[device] = status + (f" ({data['reason']})" if data.get("reason") else "")
            if status != "online":
                self._notes.append(f"{device}: {self._status[device]}")
            return f"device {device}: {self._status[device]}"
        return f"{kind} {data.get('status', '')}"

    def _alarm_changes(self, device: str, values: dict[str, float], reading: str) -> str:
        """The fridge controller's own alarm bits: set and cleared ones become alerts of the view."""
        said = []
        for name, value in values.items():
            if not is_alarm_value(name):
                continue
            key = (device, name)
            active = key in self._alarm_bits
            if value and not active:
                self.controller_alarms += 1
                self._alarm_bits[key] = self._alert(f"{device} controller ALARM {name} ({reading})")
                said.append(f"ALARM {name} set")
            elif not value and active:
                self._alarm_bits.pop(key).active = False
                self._alert(f"{device} controller alarm {name} cleared ({reading})")
                said.append(f"alarm {name} cleared")
        return "; ".join(said)

    def step(self, entry: StepLog) -> None:
        self._last_step = f"{entry.action} {entry.device or ''} {entry.detail}".strip()
        if self._verbose:
            self._line("scenario", "34", self._last_step)

    def delivery(self, delivery: Delivery) -> None:
        self._notes.append(f"HQ booked {delivery.units} x {delivery.sku} in ({delivery.why})")
        if self._verbose:
            self._line("HQ", "32", f"booked {delivery.units} x {delivery.sku} in ({delivery.why})")

    def hq(self, store: str, gateway: str, first: int, last: int, new: int) -> None:
        self.hq_events += new
        if self._verbose:
            self._line("HQ", "32", f"{store}/{gateway} stored seq {first}..{last} ({new} new)")

    def hq_state(self, through: int, missing: int, last_seq: int) -> None:
        """What HQ's database holds: everything up to ``through``, ``missing`` seqs lost below the top."""
        on_way = max(0, last_seq - through)
        self.hq_line = f"HQ has everything up to seq {through}; {missing} missing" + (
            f" ({on_way} more on the way)" if on_way else ""
        )

    # --- the screen ---------------------------------------------------------------------------------------

    def render(self) -> None:
        """Draw the view (nothing in verbose mode: the lines are the view)."""
        if self._verbose:
            return
        lines = self.screen()
        if self._tty:
            self._out.write("\033[H\033[2J" + "\n".join(lines) + "\n")
        else:
            self._out.write("\n".join(lines) + "\n\n")
        self._out.flush()

    def screen(self) -> list[str]:
        now = self._now()
        scenario = self._scenario
        store_s = (now * scenario.time_scale) % scenario.duration_s
        hh, mm = int(store_s // 3600), int(store_s % 3600 // 60)
        bold = "\033[1m" if self._color else ""
        red = "\033[31m" if self._color else ""
        off = "\033[0m" if self._color else ""
        lines = [
            f"{bold}store-gateway demo{off}  {scenario.scenario}  {now:5.0f} s running, scenario time"
            f" {hh:02d}:{mm:02d} of {int(scenario.duration_s // 3600):02d}:{int(scenario.duration_s % 3600 // 60):02d}",
            f"last step: {self._last_step}" if self._last_step else "",
            "",
            f"{bold}Devices{off} (last {WINDOW_S:g} s)",
        ]
        for device in sorted(set(self._activity) | set(self._status)):
            recent = [a for a in self._activity.get(device, ()) if a[0] >= now - WINDOW_S]
            counts: dict[str, int] = {}
            for _, what, _text in recent:
                counts[what] = counts.get(what, 0) + 1
            last = next((text for _, _, text in reversed(recent) if text), "")
            did = ", ".join(f"{n} {what}" for what, n in counts.items()) or "quiet"
            status = self._status.get(device, "")
            flag = red if status and not status.startswith("online") else ""
            lines.append(f"  {device:<15} {flag}{status.split(' (')[0]:<12}{off} {did:<22} {last}")
        lines += ["", f"{bold}Stock that moved{off} (last {WINDOW_S:g} s)"]
        while self._moves and self._moves[0][0] < now - WINDOW_S:
            self._moves.popleft()
        by_sku: dict[str, float] = {}
        for _, sku, delta in self._moves:
            by_sku[sku] = by_sku.get(sku, 0.0) + delta
        moved = sorted(by_sku.items())
        for sku, delta in moved[:8]:
            on_hand, safety = self._stock[sku]
            low = safety is not None and float(on_hand) <= float(safety)
            mark = f"  {red}LOW{off}" if low else ""
            lines.append(f"  {sku}  on hand {on_hand:>6} ({delta:+g}){mark}")
        if len(moved) > 8:
            lines.append(f"  ... and {len(moved) - 8} more SKU(s)")
        if not moved:
            lines.append("  none")
        lines += ["", f"{bold}Alerts{off}"]
        for alert in self._alert_log:
            color = red if alert.active else ""
            lines.append(f"  {alert.at:6.0f} s  {color}{alert.text}{off}")
        active = [a.text for a in self._alarm_bits.values()]
        if not self._alert_log:
            lines.append("  none")
        if self._open:
            lines.append(f"  {red}{len(self._open)} alert(s) open{off}")
        if active:
            lines.append(f"  {red}{len(active)} controller alarm(s) active{off}")
        lines += ["", f"{bold}Chat{off} (the alerts' DingTalk robot, signatures checked)"]
        lines += [f"  {text}" for text in self._chat] or ["  none"]
        if self._notes:
            lines += ["", f"{bold}Notes{off}"] + [f"  {note}" for note in self._notes]
        lines += ["", f"{bold}{self.hq_line}{off}", *self.footer]
        return lines

    def summary(self, last_seq: int, gaps: int) -> str:
        negative = (
            f"; negative stock: {', '.join(sorted(self.negative_stock))}" if self.negative_stock else ""
        )
        return (
            f"summary: tills sent {self.sent['pos.sale']} sales and {self.sent['pos.return']} returns; "
            f"the gateway committed {self.committed} events (last seq {last_seq}, {self.alerts} alert(s) raised"
            f" and {self.cleared} cleared, {self.controller_alarms} controller alarm(s){negative}); the chat robot"
            f" took {self.chat_messages} message(s); HQ received {self.hq_events}, "
            f"seq gaps at HQ: {gaps}"
        )


def run_demo(
    duration: float = 0,
    rate: float | None = None,
    data_dir: Path | None = None,
    scenario: str = DEFAULT_SCENARIO,
    verbose: bool = False,
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
        asyncio.run(_demo(duration, rate, directory, played, Path(tmp), verbose))
    return 0


async def _watch_hq(
    view: LiveView, store: SqliteReceiverStore, gateway: Gateway, stop: asyncio.Event
) -> None:
    """Refresh the view's HQ line from HQ's database, and draw the view, until ``stop``."""
    refresh = TTY_REFRESH_S if sys.stdout.isatty() else PIPE_REFRESH_S
    gateway_id = gateway.config.gateway_id
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(refresh):
                await stop.wait()
        try:
            gaps = await asyncio.to_thread(store.gaps, gateway_id)
            rows = await asyncio.to_thread(store.summary)
        except Exception as err:  # the view is best effort; the receiver reports its own trouble
            _LOGGER.debug("demo view: reading HQ's database: %r", err)
        else:
            row = next((r for r in rows if r.gateway_id == gateway_id), None)
            if row is not None:
                through = gaps[0][0] - 1 if gaps else row.max_seq
                view.hq_state(through, row.lost, gateway.journal.last_seq)
        view.render()


async def _demo(
    duration: float, rate: float | None, data_dir: Path, scenario: Scenario, work: Path, verbose: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store_port = _free_port()
    token = secrets.token_urlsafe(24)
    view = LiveView(sys.stdout, scenario, verbose)
    if rate is not None:
        tills = scenario.devices.tills.model_copy(update={"rate_per_s": rate})
        scenario = scenario.model_copy(
            update={"devices": scenario.devices.model_copy(update={"tills": tills})}
        )
    store = ScenarioRun(
        scenario,
        BrokerConfig(port=store_port, protocol="3.1.1"),
        work,
        on_step=view.step,
        on_till=view.till,
        modbus_timeout_s=2.0,
    )
    robot = ChatRobot(view.chat)
    async with robot.serving():
        await _run_store(duration, data_dir, scenario, view, store, robot, token, stop)


def demo_sections(store: ScenarioRun, robot: ChatRobot) -> dict[str, Any]:
    """The scenario's sections of the demo's config, with a dingtalk channel to the chat robot that every rule of
    the scenario notifies (http to this box is allowed for channels)."""
    sections = store.gateway_config()
    sections["rules"] = [
        {**rule, "notify": [*rule.get("notify", []), CHAT_CHANNEL]} for rule in sections.get("rules", [])
    ]
    sections["notifications"] = {
        "channels": [
            {
                "id": CHAT_CHANNEL,
                "type": "dingtalk",
                "url": robot.url,
                "secret": robot.secret,
                "per_minute": 60,
            }
        ]
    }
    return sections


async def _run_store(
    duration: float,
    data_dir: Path,
    scenario: Scenario,
    view: LiveView,
    store: ScenarioRun,
    robot: ChatRobot,
    token: str,
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    store_port, hq_port = store.store_broker.port, _free_port()
    hq_broker_config = BrokerConfig(port=hq_port, protocol="3.1.1")
    store_broker = await _start_broker(store_port)
    hq_broker = await _start_broker(hq_port)
    await store.prepare()
    config = demo_config(data_dir, store_port, hq_port, 0, token, sections=demo_sections(store, robot))
    low_alert = config.stock.low_alert.model_copy(update={"notify": [CHAT_CHANNEL]})
    config = config.model_copy(update={"stock": config.stock.model_copy(update={"low_alert": low_alert})})
    store.store_location = config.store.location  # the kiosks check staff in around the store
    # The simulated HQ signs its commands with a key made for this run; the gateway pins its public key.
    hq_key = Ed25519PrivateKey.generate()
    pinned = CommandKey(id="demo-hq", public_key=public_key_text(hq_key.public_key()))
    config = config.model_copy(update={"hq": config.hq.model_copy(update={"command_keys": [pinned]})})
    # A simulated store's clock is trusted, as a store's synchronised box: the attendance rule reads times of day
    # only from a synchronised clock.
    gateway = Gateway(config, config_hash(config), clock=ClockState(override=True))
    for intake in gateway.intakes:
        if isinstance(intake, BleDriver):
            intake.scanner_factory = SimulatedRadio  # the scenario feeds the advertisements: no host radio
    hq = SimulatedHq(
        hq_broker_config,
        config.hq.topic_prefix,
        config.store.id,
        config.gateway_id,
        lead_time_s=1800 / scenario.time_scale,  # half an hour of store time
        on_delivery=view.delivery,
        signer=CommandSigner("demo-hq", hq_key),
    )
    store.hq = hq

    def on_commit(committed: Committed) -> None:
        view.gateway(committed)
        for body in committed.bodies:
            if b'"stock.level"' in body:
                hq.observe(orjson.loads(body))

    gateway.journal.add_listener(on_commit)
    hq_store = SqliteReceiverStore(data_dir / "hq.db")
    view_store = SqliteReceiverStore(data_dir / "hq.db")
    receiver = HqReceiver(hq_broker_config, hq_store, client_id="demo-hq-receiver", on_batch=view.hq)
    receiver_stop = asyncio.Event()
    gateway_stop = asyncio.Event()
    view_stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            gw_task = tg.create_task(gateway.run(gateway_stop), name="gateway")
            rx_task = tg.create_task(receiver.run(receiver_stop), name="hq-receiver")
            api_port = await gateway.wait_api()
            await hq.start()
            print(
                f"store-gateway demo: scenario {scenario.scenario!r} ({scenario.description})\n"
                f"store broker 127.0.0.1:{store_port}, HQ broker 127.0.0.1:{hq_port} (embedded)\n"
                f"local API: http://127.0.0.1:{api_port}/health  (token for /api/*, /metrics: {token})\n"
                f"chat robot (DingTalk, signed): {robot.url.split('?')[0]}\n"
                f"journal: {data_dir / 'journal.db'}   Ctrl-C stops.\n"
                + "".join(f"  expect: {line}\n" for line in scenario.expect_text()),
                flush=True,
            )
            view.footer = ["", f"local API http://127.0.0.1:{api_port}/health (token {token})   Ctrl-C stops"]
            view_task = tg.create_task(_watch_hq(view, view_store, gateway, view_stop), name="demo-view")
            if duration:
                loop.call_later(duration, stop.set)
            ble = next((d for d in gateway.intakes if isinstance(d, BleDriver)), None)
            while not stop.is_set() and not gw_task.done():
                await store.run(ble, stop)
            await hq.close()
            gateway_stop.set()
            await gw_task
            # Give HQ a moment for the last batches, then stop it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while view.hq_events < gateway.journal.delivered_seq:  # noqa: ASYNC110 - bounded, 3 s
                        await asyncio.sleep(0.1)
            receiver_stop.set()
            await rx_task
            view_stop.set()
            await view_task
    finally:
        await hq.close()
        await store.close()
        await store_broker.shutdown()
        await hq_broker.shutdown()
        summary = hq_store.summary()
        hq_store.close()
        view_store.close()
    gaps = sum(row.gaps for row in summary)
    print("\n" + view.summary(gateway.journal.last_seq, gaps), flush=True)
