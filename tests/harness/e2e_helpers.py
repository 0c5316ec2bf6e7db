"""End-to-end test helpers: configs, the gateway in-process or as a subprocess, an HQ receiver, polling.

Every peer is real: mosquitto subprocesses (tests/harness/brokers.py), the gateway's SQLite journal in tmp_path, the
HQ reference receiver's SQLite database, real HTTP to the local API. Waits are polls against a deadline; a
deadline that passes fails the test with the state that was being watched, never a timed assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final, Literal

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from cloud_bridge.hq.service import HqReceiver
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.signing import CommandSigner, public_key_text
from cloud_bridge.topics import status_topic
from gateway.config import GatewayConfig
from gateway.config_loader import config_hash, load_config
from gateway.kernel.config import BrokerConfig
from gateway.kernel.mqtt_client import Message, MqttClient
from gateway.runtime import Gateway
from simulators.catalog import CATALOG, CURRENCY
from simulators.sensors import DEFAULT_TOPIC_TEMPLATE as SENSOR_TOPIC_TEMPLATE
from tests.harness.brokers import Mosquitto, free_port

TOKEN_ENV: Final = "STOREGW_E2E_API_TOKEN"
API_TOKEN: Final = "e2e-token-0123456789abcdef"
AUTH: Final = {"Authorization": f"Bearer {API_TOKEN}"}
STORE_ID: Final = "e2e-store-001"
GATEWAY_ID: Final = "gw-e2e"
HQ_PREFIX: Final = "retail"
TERMINALS: Final = tuple(f"till-{n:02d}" for n in range(1, 6))
INITIAL_ON_HAND: Final = 1_000_000
"""Large enough that no test sells a catalog SKU down to a threshold."""
POS_KINDS: Final = ("pos.sale", "pos.return")


MetricValues = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Prometheus samples: {(sample name, sorted (label, value) pairs): value}."""


class PollTimeoutError(AssertionError):
    """A condition did not become true before its deadline; the message carries the watched state."""


# --- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StockSeed:
    sku: str
    on_hand: float
    safety_stock: float | None = None


def catalog_stock(on_hand: float = INITIAL_ON_HAND) -> list[StockSeed]:
    """SKU-0001..SKU-0020 of simulators/catalog.py, each with ``on_hand`` and no threshold."""
    return [StockSeed(item.sku, on_hand) for item in CATALOG]


HQ_KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
"""HQ's command-signing key in the tests (docs/OUTBOX.md, "Signed commands"); pinned by every test config."""
HQ_KEY_ID: Final = "hq-test"
HQ_SIGNER: Final = CommandSigner(HQ_KEY_ID, HQ_KEY)


def hq_command_keys() -> list[dict[str, str]]:
    """The ``hq.command_keys`` that pin HQ_KEY."""
    return [{"id": HQ_KEY_ID, "public_key": public_key_text(HQ_KEY.public_key())}]


def write_signing_key(path: Path) -> Path:
    """HQ_KEY as the PEM file ``--signing-key`` takes."""
    path.write_bytes(
        HQ_KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def sign_command(topic: str, body: Any) -> Any:
    """``body`` signed with HQ_KEY for ``topic`` when it is a command that can be signed (a dict with a string
    request id and command, dict or no args, no signature yet); anything else as it is (malformed commands)."""
    if not isinstance(body, dict) or "signature" in body:
        return body
    request_id, command, args = body.get("request_id"), body.get("command"), body.get("args")
    if not isinstance(request_id, str) or not isinstance(command, str) or not isinstance(args, dict | None):
        return body
    extra = {k: v for k, v in body.items() if k not in ("request_id", "command", "args")}
    return {**HQ_SIGNER.envelope(topic, request_id, command, args), **extra}


def write_config(
    path: Path,
    *,
    store_port: int,
    hq_port: int,
    data_dir: Path,
    devices: Sequence[str] = TERMINALS,
    stock: Sequence[StockSeed] | None = None,
    api_port: int = 0,
    gateway_id: str = GATEWAY_ID,
    store_id: str = STORE_ID,
    log_level: str = "INFO",
    sensors: Sequence[str] = (),
    hq: Mapping[str, Any] | None = None,
    outbox: Mapping[str, Any] | None = None,
    json_sensors: Sequence[str] = (),
    rules: Sequence[Mapping[str, Any]] = (),
    notifications: Mapping[str, Any] | None = None,
    api_users: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a store config (YAML) for brokers on loopback; the API token is read from ``$TOKEN_ENV``.

    ``sensors`` adds devices with the ``sensor`` profile and the ``sensor.reading`` route of
    simulators/sensors.py; ``hq`` adds settings to the ``hq`` section (``inflight_batches``, ``keepalive_s``...)
    and ``outbox`` is the ``outbox`` section (docs/OUTBOX.md). ``json_sensors`` adds generic-json-sensor devices
    (``store/sensor/{id}/state``: sensor.sample) and ``rules`` the ``rules`` section (docs/RULES.md).
    """
    items: list[dict[str, Any]] = []
    for seed in catalog_stock() if stock is None else stock:
        item: dict[str, Any] = {"sku": seed.sku, "on_hand": seed.on_hand}
        if seed.safety_stock is not None:
            item["safety_stock"] = seed.safety_stock
        items.append(item)
    doc: dict[str, Any] = {
        "gateway_id": gateway_id,
        "store": {"id": store_id, "name": "E2E test store", "timezone": "Asia/Hong_Kong"},
        "data_dir": str(data_dir),
        "store_broker": {"host": "127.0.0.1", "port": store_port},
        "hq": {
            "host": "127.0.0.1",
            "port": hq_port,
            "topic_prefix": HQ_PREFIX,
            "command_keys": hq_command_keys(),
            **(hq or {}),
        },
        "drivers": [
            {
                "type": "mqtt",
                "name": "store-mqtt",
                "routes": [
                    {"pattern": "store/pos/{device_id}/sale", "kind": "pos.sale"},
                    {"pattern": "store/pos/{device_id}/return", "kind": "pos.return"},
                ]
                + ([{"pattern": SENSOR_TOPIC_TEMPLATE, "kind": "sensor.reading"}] if sensors else [])
                + (
                    [{"pattern": "store/sensor/{device_id}/state", "profile": "generic-json-sensor"}]
                    if json_sensors
                    else []
                ),
            }
        ],
        "devices": [{"id": d, "profile": "pos_terminal"} for d in devices]
        + [{"id": d, "profile": "sensor"} for d in sensors]
        + [{"id": d, "profile": "generic-json-sensor"} for d in json_sensors],
        "stock": {"items": items},
        "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": {"env": TOKEN_ENV}},
        "log": {"level": log_level},
    }
    if outbox is not None:
        doc["outbox"] = dict(outbox)
    if rules:
        doc["rules"] = [dict(r) for r in rules]
    if notifications is not None:
        doc["notifications"] = dict(notifications)
    if api_users:
        doc["api"]["users"] = [dict(u) for u in api_users]
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(doc, fh)
    return path


def load(path: Path) -> GatewayConfig:
    """Load a config written by :func:`write_config`, with the token in its environment."""
    return load_config(path, env={TOKEN_ENV: API_TOKEN})


def gateway_env() -> dict[str, str]:
    """The environment of a gateway subprocess: ours plus the API token."""
    return {**os.environ, TOKEN_ENV: API_TOKEN}


def broker_config(broker: Mosquitto, protocol: Literal["3.1.1", "5"] = "3.1.1") -> BrokerConfig:
    """How tills, the receiver and test clients reach a test broker (the gateway itself uses MQTT 5)."""
    return BrokerConfig(host=broker.host, port=broker.port, protocol=protocol)


# --- polling ------------------------------------------------------------------------------------------------


async def poll_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = 60.0,
    interval: float = 0.05,
    state: Callable[[], object] | None = None,
) -> None:
    """Return once ``condition()`` is true; past ``within`` seconds fail with ``what`` and ``state()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            shown = state() if state is not None else "(no state given)"
            raise PollTimeoutError(f"gave up after {within:.0f} s waiting for {what}; state: {shown}")
        await asyncio.sleep(interval)


async def time_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = 60.0,
    interval: float = 0.02,
    state: Callable[[], object] | None = None,
) -> float:
    """:func:`poll_until`, returning the ``time.monotonic()`` at which the condition was first seen true (for
    figures a test prints: never assert on them)."""
    await poll_until(condition, what, within=within, interval=interval, state=state)
    return time.monotonic()


def report_figures(
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
    title: str,
    figures: Mapping[str, object],
) -> None:
    """Show a test's measured figures on the terminal even when pytest captures output, and record each as a
    property (JUnit XML). Figures are for people: tests never assert on durations."""
    line = ", ".join(
        f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}"
        for name, value in figures.items()
    )
    with capsys.disabled():
        print(f"\n[figures] {title}: {line}")
    for name, value in figures.items():
        record_property(name, value)


# --- the gateway in-process ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, *, wait_drivers: bool = True, within: float = 30.0
) -> AsyncIterator[Gateway]:
    """Run :class:`Gateway` as a task in this loop; on exit set its stop event and wait for a clean stop.

    With ``wait_drivers`` it yields only once every driver is subscribed, so nothing a test publishes is
    missed. A gateway that dies while the test runs fails the test on exit (its exception propagates).
    """
    gateway = Gateway(config, config_hash(config))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop), name="e2e-gateway")
    try:
        started = asyncio.ensure_future(gateway.started.wait())
        try:
            await asyncio.wait((started, task), timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if task.done():
            task.result()  # raises what stopped it
            raise AssertionError("the gateway returned before it started")
        if wait_drivers:
            await poll_until(
                lambda: task.done() or all(gateway.health()["drivers"].values()),
                "the gateway's drivers to subscribe",
                within=within,
                state=gateway.health,
            )
            if task.done():
                task.result()
        yield gateway
    finally:
        stop.set()
        async with asyncio.timeout(within):
            await task


async def wait_handled(gateway: Gateway, hq: HqView, received: int, *, within: float = 60.0) -> None:
    """Wait until an in-process gateway has received ``received`` device messages, committed (or quarantined)
    all of them, and HQ holds every event committed so far: the outcome is final, assert on it."""
    await poll_until(
        lambda: metric_sum(own_metrics(gateway), "storegw_messages_received_total") >= received,
        f"{received} device messages at the gateway",
        within=within,
        state=gateway.health,
    )
    await gateway.journal.flush()
    await poll_until(
        lambda: hq.max_seq() >= gateway.journal.last_seq,
        "HQ to hold every committed event",
        within=within,
        state=lambda: {"hq": hq.state(), "gateway": gateway.health()},
    )


# --- the gateway as a subprocess ----------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """``store-gateway run --config`` as a subprocess (``python -m gateway.cli``), output to a log file."""

    config_path: Path
    api_port: int
    log_path: Path
    env: Mapping[str, str] = field(default_factory=gateway_env)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)
    """More ``run`` options (``--new-journal``), used from the next ``start()``."""
    launcher: list[str] = field(default_factory=lambda: ["-m", "gateway.cli"])
    """What Python runs before ``run --config``: the CLI, or a script that wraps it (tests/harness/wall_step.py)."""
    _log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("the gateway is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        extra = f" {self.extra_args}" if self.extra_args else ""
        self._log.write(f"\n===== start {self.starts + 1}{extra} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, *self.launcher, "run", "--config", str(self.config_path), *self.extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(self.env),
            cwd=self.config_path.parent,
        )
        self.starts += 1

    async def wait_healthy(self, within: float = 30.0) -> dict[str, Any]:
        """Wait until /health answers 200 (every driver subscribed); fail early if the process exits."""
        last: list[object] = ["no answer yet"]

        async def healthy(client: httpx.AsyncClient) -> bool:
            if not self.running:
                raise AssertionError(f"the gateway exited with {self.returncode()}; log:\n{self.log_tail()}")
            try:
                response = await client.get(f"{self.base_url}/health", timeout=2.0)
            except httpx.HTTPError as err:
                last[0] = repr(err)
                return False
            last[0] = (response.status_code, response.text)
            return response.status_code == 200

        async with httpx.AsyncClient() as client:
            await poll_until(
                lambda: healthy(client),
                f"the gateway's /health on port {self.api_port}",
                within=within,
                interval=0.1,
                state=lambda: f"{last[0]}; log:\n{self.log_tail()}",
            )
            response = await client.get(f"{self.base_url}/health", timeout=2.0)
        health: dict[str, Any] = response.json()
        return health

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.base_url}/health", timeout=5.0)
        result: dict[str, Any] = response.json()
        return result

    async def metrics(self) -> MetricValues:
        """The gateway's /metrics (with the API token), parsed."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.base_url}/metrics", headers=AUTH, timeout=5.0)
        response.raise_for_status()
        return parse_metrics(response.text)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def terminate(self, sig: signal.Signals = signal.SIGTERM, within: float = 30.0) -> int:
        """Send ``sig`` (SIGTERM or SIGINT) and wait, without blocking the loop, for the exit code."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("never started")
        if proc.poll() is None:
            proc.send_signal(sig)
        await poll_until(
            lambda: proc.poll() is not None,
            f"the gateway to exit after {sig.name}",
            within=within,
            state=self.log_tail,
        )
        return int(proc.returncode)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as err:
            return f"(no log: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Kill the process if it still runs, reap it and close the log (for finally blocks)."""
        self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the HQ receiver ----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_receiver(
    broker: Mosquitto,
    db_path: Path,
    *,
    client_id: str = "hq-receiver-e2e",
    within: float = 30.0,
    backoff_cap_s: float = 1.0,
) -> AsyncIterator[SqliteReceiverStore]:
    """The HQ reference receiver in this loop, subscribed before it yields; stopped and closed on exit.
    ``backoff_cap_s`` caps its reconnect backoff (after an HQ outage)."""
    store = SqliteReceiverStore(db_path)
    receiver = HqReceiver(
        broker_config(broker),
        store,
        prefix=HQ_PREFIX,
        client_id=client_id,
        backoff_base_s=min(0.1, backoff_cap_s),
        backoff_cap_s=backoff_cap_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.run(stop), name="e2e-hq-receiver")
    try:
        await poll_until(
            lambda: task.done() or receiver.connected,
            f"the HQ receiver to subscribe on port {broker.port}",
            within=within,
        )
        if task.done():
            task.result()
        yield store
    finally:
        stop.set()
        try:
            async with asyncio.timeout(within):
                await task
        finally:
            store.close()


class HqView:
    """Read-only queries on the receiver's database, on a second connection (WAL: beside the writer)."""

    def __init__(self, db_path: Path, gateway_id: str = GATEWAY_ID) -> None:
        self.gateway_id = gateway_id
        self._db = sqlite3.connect(
            db_path.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HqView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self, *kinds: str) -> int:
        if not kinds:
            sql, params = "SELECT count(*) FROM events WHERE gateway_id = ?", [self.gateway_id]
        else:
            marks = ",".join("?" * len(kinds))
            sql = f"SELECT count(*) FROM events WHERE gateway_id = ? AND kind IN ({marks})"
            params = [self.gateway_id, *kinds]
        (n,) = self._db.execute(sql, params).fetchone()
        return int(n)

    def max_seq(self) -> int:
        (n,) = self._db.execute(
            "SELECT coalesce(max(seq), 0) FROM events WHERE gateway_id = ?", (self.gateway_id,)
        ).fetchone()
        return int(n)

    def kinds(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT kind, count(*) FROM events WHERE gateway_id = ? GROUP BY kind", (self.gateway_id,)
        )
        return {str(k): int(n) for k, n in rows}

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        """Envelopes in seq order, parsed; all kinds if none given."""
        sql = "SELECT body FROM events WHERE gateway_id = ?"
        params: list[Any] = [self.gateway_id]
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params += kinds
        return [orjson.loads(body) for (body,) in self._db.execute(sql + " ORDER BY seq", params)]

    def seqs(self) -> list[int]:
        """Every stored seq of the gateway, ascending."""
        rows = self._db.execute(
            "SELECT seq FROM events WHERE gateway_id = ? ORDER BY seq", (self.gateway_id,)
        )
        return [int(seq) for (seq,) in rows]

    def unexplained_gaps(self, through: int | None = None) -> list[Run]:
        """Seqs in 1..``through`` (default: the highest stored) missing here and not explained by the gateway's
        own reports (:func:`explained_runs`)."""
        seqs = self.seqs()
        last = through if through is not None else (seqs[-1] if seqs else 0)
        return subtract_runs(gap_runs(seqs, last), explained_runs(self.events(*EXPLAINING_KINDS)))

    def count_above(self, seq: int) -> int:
        """Stored events with a seq above ``seq``."""
        (n,) = self._db.execute(
            "SELECT count(*) FROM events WHERE gateway_id = ? AND seq > ?", (self.gateway_id, seq)
        ).fetchone()
        return int(n)

    def counters(self) -> dict[str, int]:
        """The receiver's per-gateway counters: ``duplicates`` (events received again, before dedup) and
        ``conflicts`` (a different event id at a seq already stored)."""
        row = self._db.execute(
            "SELECT duplicates, conflicts FROM gateways WHERE gateway_id = ?", (self.gateway_id,)
        ).fetchone()
        return (
            {"duplicates": 0, "conflicts": 0} if row is None else {"duplicates": row[0], "conflicts": row[1]}
        )

    def state(self) -> dict[str, Any]:
        """What a failed poll prints."""
        return {"kinds": self.kinds(), "max_seq": self.max_seq(), "count": self.count()}


def receipts(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """The receipt numbers of pos.sale/pos.return envelopes."""
    return [str(e["data"]["receipt_no"]) for e in events if e["kind"] in POS_KINDS]


Run = tuple[int, int]
"""An inclusive run of seqs, (first, last)."""


def merge_runs(runs: Iterable[Sequence[int]]) -> list[Run]:
    """Sorted, overlapping or touching runs joined."""
    out: list[Run] = []
    for first, last in sorted((int(r[0]), int(r[1])) for r in runs):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def gap_runs(seqs: Iterable[int], through: int) -> list[Run]:
    """The runs of 1..``through`` missing from ``seqs`` (ascending)."""
    gaps: list[Run] = []
    expect = 1
    for seq in seqs:
        if seq > through:
            break
        if seq > expect:
            gaps.append((expect, seq - 1))
        expect = max(expect, seq + 1)
    if expect <= through:
        gaps.append((expect, through))
    return gaps


def subtract_runs(runs: Iterable[Run], minus: Iterable[Sequence[int]]) -> list[Run]:
    """What of ``runs`` no run of ``minus`` covers."""
    holes = merge_runs(minus)
    out: list[Run] = []
    for first, last in runs:
        at = first
        for a, b in holes:
            if b < at:
                continue
            if a > last:
                break
            if a > at:
                out.append((at, a - 1))
            at = b + 1
            if at > last:
                break
        if at <= last:
            out.append((at, last))
    return out


EXPLAINING_KINDS: Final = ("outbox.evicted", "alert.raised")


def explained_runs(events: Iterable[Mapping[str, Any]]) -> list[Run]:
    """The seqs a gateway told HQ it will never deliver: the ``ranges`` of its ``outbox.evicted`` events and
    the ``possibly_lost`` of its ``journal.corrupt`` and ``journal.missing`` alerts (docs/OUTBOX.md), merged."""
    runs: list[Sequence[int]] = []
    for event in events:
        data = event["data"]
        if event["kind"] == "outbox.evicted":
            runs += data["ranges"]
        elif event["kind"] == "alert.raised" and data.get("rule") in ("journal.corrupt", "journal.missing"):
            lost = data["details"]["possibly_lost"]
            runs += [] if lost is None else [lost]
    return merge_runs(runs)


async def hq_holds_everything(gateway: GatewayProcess, hq: HqView, sales: int = 0) -> bool:
    """The outcome is final: the gateway has nothing left to deliver, and HQ holds at least ``sales`` sales and
    returns and every seq the gateway has committed, except those it reported evicted or lost. (HQ's broker
    acknowledges before the receiver stores, and classes travel in priority order, so neither the gateway's
    backlog nor HQ's highest seq alone says that HQ is complete.)"""
    health = await gateway.health()
    if health["backlog"] != 0 or hq.count(*POS_KINDS) < sales:
        return False
    return hq.unexplained_gaps(int(health["last_seq"])) == []


def last_stock_levels(events: Iterable[Mapping[str, Any]]) -> dict[str, Decimal]:
    """The on_hand of the last stock.level per SKU (events must be in seq order)."""
    levels: dict[str, Decimal] = {}
    for event in events:
        if event["kind"] == "stock.level":
            levels[str(event["data"]["sku"])] = Decimal(str(event["data"]["on_hand"]))
    return levels


# --- the journal (read-only, beside the gateway or after it stopped) ---------------------------------------


def journal_db(data_dir: Path) -> Path:
    return data_dir / "journal.db"


@contextlib.contextmanager
def _journal(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived read-only connection to the journal (WAL: it may run beside the gateway's writer)."""
    uri = journal_db(data_dir).absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        yield db


def read_ledger(data_dir: Path) -> dict[str, Decimal]:
    """The stock table: on_hand per SKU."""
    with _journal(data_dir) as db:
        rows = db.execute("SELECT sku, on_hand FROM stock").fetchall()
    return {str(sku): Decimal(repr(on_hand)) for sku, on_hand in rows}


def read_quarantine(data_dir: Path) -> list[dict[str, Any]]:
    with _journal(data_dir) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM quarantine ORDER BY qid")]


def journal_kinds(data_dir: Path) -> dict[str, int]:
    with _journal(data_dir) as db:
        return {str(k): int(n) for k, n in db.execute("SELECT kind, count(*) FROM events GROUP BY kind")}


def journal_used_bytes(data_dir: Path) -> int:
    """Pages in use x page size: what ``outbox.max_bytes`` caps (the file itself does not shrink)."""
    with _journal(data_dir) as db:
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


def expected_ledger(stock: Iterable[StockSeed], deltas: Mapping[str, int]) -> dict[str, Decimal]:
    """Initial on_hand plus the deltas; SKUs only in ``deltas`` start at 0."""
    ledger = {s.sku: Decimal(repr(float(s.on_hand))) for s in stock}
    for sku, delta in deltas.items():
        ledger[sku] = ledger.get(sku, Decimal(0)) + delta
    return ledger


# --- payloads, MQTT and metrics -----------------------------------------------------------------------------


def sale_payload(
    receipt_no: str, register_id: str, lines: Sequence[tuple[str, int]], *, unit_price: str = "10.00"
) -> bytes:
    """A minimal valid PosSale message (also valid as a PosReturn)."""
    total = Decimal(unit_price) * sum(qty for _, qty in lines)
    body = {
        "receipt_no": receipt_no,
        "register_id": register_id,
        "currency": CURRENCY,
        "lines": [{"sku": sku, "quantity": qty, "unit_price": unit_price} for sku, qty in lines],
        "totals": {"subtotal": str(total), "total": str(total)},
        "payments": [{"method": "cash", "amount": str(total)}],
    }
    return orjson.dumps(body)


async def publish_and_wait(broker: Mosquitto, messages: Sequence[tuple[str, bytes]], client_id: str) -> None:
    """Publish QoS 1, one connection, and wait for every PUBACK."""
    client = MqttClient(broker_config(broker), client_id, clean_start=True)
    await client.connect()
    try:
        futures = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        async with asyncio.timeout(60):
            await asyncio.gather(*futures)
    finally:
        await client.disconnect()


async def read_retained(broker: Mosquitto, topic: str, within: float = 10.0) -> bytes | None:
    """The retained message on ``topic``, or None if there is none (no message within a short grace)."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(message: Message) -> None:
        if message.retain and not got.done():
            got.set_result(bytes(message.payload))

    client = MqttClient(broker_config(broker), "e2e-retained-reader", clean_start=True, on_message=on_message)
    await client.connect()
    try:
        await client.subscribe([(topic, 1)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                return await got
        return None
    finally:
        got.cancel()
        await client.disconnect()


def gateway_status_topic(store_id: str = STORE_ID, gateway_id: str = GATEWAY_ID) -> str:
    return status_topic(HQ_PREFIX, store_id, gateway_id)


def parse_metrics(text: str) -> MetricValues:
    """Prometheus text exposition -> :data:`MetricValues`."""
    out: MetricValues = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def own_metrics(gateway: Gateway) -> MetricValues:
    """An in-process gateway's metrics, as /metrics would show them."""
    return parse_metrics(generate_latest(gateway.metrics.registry).decode())


def metric_sum(metrics: MetricValues, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in metrics.items() if n == name and wanted <= set(lbls))


def gateway_process(
    tmp_path: Path,
    store_broker: Mosquitto,
    hq_broker: Mosquitto,
    *,
    env: Mapping[str, str] | None = None,
    **config: Any,
) -> GatewayProcess:
    """A gateway process (not started) on this test's brokers, its config (:func:`write_config`, with ``config``)
    at ``tmp_path/store.yaml``, its data in ``tmp_path/data``, its log at ``tmp_path/gateway.log``."""
    api_port = free_port()
    path = write_config(
        tmp_path / "store.yaml",
        store_port=store_broker.port,
        hq_port=hq_broker.port,
        data_dir=tmp_path / "data",
        api_port=api_port,
        **config,
    )
    return GatewayProcess(
        path, api_port, tmp_path / "gateway.log", env=env if env is not None else gateway_env()
    )
