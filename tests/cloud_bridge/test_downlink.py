"""The downlink with real peers: a mosquitto HQ broker, a real journal (SQLite file) with the stock ledger, and
the test acting as HQ with its own MQTT client. Commands are sent one at a time and answered in order, so a
``ping`` after a command that must get no answer proves that none came (no timed waits)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_bridge.downlink import Downlink
from cloud_bridge.topics import commands_topic, responses_topic
from drivers.base import DriverContext
from drivers.commands import DeviceWriter
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from gateway import __version__
from gateway.config import GatewayConfig
from gateway.kernel.clock import BOOT_ID, ClockState
from gateway.kernel.config import BrokerConfig
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import Message, MqttClient
from gateway.ledger.stock import StockLedger
from gateway.runtime import command_handlers
from rules.clock import RuleClock
from rules.engine import RuleEngine
from simulators.fridge import FridgeServer
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import hq_command_keys, sign_command
from tests.harness.pos_drafts import pos_draft

STORE, GW, PREFIX = "hk-001", "gw-1", "retail"
HQ_PASSWORD = "hq-password-never-shown"
API_TOKEN = "api-token-never-shown-0123"
WITHIN = 20.0


def gateway_config(tmp_path: Path, port: int, **hq: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": GW,
            "store": {"id": STORE, "name": "Causeway Bay"},
            "data_dir": str(tmp_path),
            "hq": {
                "port": port,
                "username": "gw",
                "password": HQ_PASSWORD,
                "topic_prefix": PREFIX,
                "command_keys": hq_command_keys(),
                **hq,
            },
            "api": {"enabled": False, "token": API_TOKEN},
            "stock": {
                "items": [
                    {"sku": "TEA", "on_hand": 10, "safety_stock": 2},
                    {"sku": "RICE", "on_hand": 50},
                    {"sku": "BOOM", "on_hand": 5, "safety_stock": 1},
                ],
                "default_safety_stock": 3,
            },
        }
    )


@dataclass
class Rig:
    """A journal with the stock ledger, and what the downlink is built from."""

    config: GatewayConfig
    journal: Journal
    metrics: Metrics
    resends: list[tuple[int, int]] = field(default_factory=list)

    def downlink(
        self, config: GatewayConfig | None = None, writers: dict[str, DeviceWriter] | None = None
    ) -> Downlink:
        return Downlink(
            config or self.config,
            self.journal,
            self.metrics,
            "cfg-hash-1",
            self.resend,
            lambda: {"last_seq": self.journal.last_seq, "backlog": self.journal.backlog, "extra": 1},
            command_handlers(self.journal, writers or {}),
        )

    async def resend(self, first: int, last: int) -> dict[str, list[list[int]]]:
        if first > 1000:
            raise ValueError("nothing that far")
        self.resends.append((first, last))
        return {"resent": [[first, min(last, 5)]], "missing": [[6, last]] if last > 5 else []}

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.journal.path)) as conn:
            return conn.execute(sql, params).fetchall()

    def kinds(self) -> list[str]:
        return [k for (k,) in self.rows("SELECT kind FROM events ORDER BY seq")]

    def stock(self) -> dict[str, tuple[float, float | None]]:
        return {
            s: (on_hand, safety)
            for s, on_hand, safety in self.rows("SELECT sku, on_hand, safety_stock FROM stock")
        }

    def count(self, command: str, status: str) -> float:
        labels = {"command": command, "status": status}
        return self.metrics.registry.get_sample_value("storegw_commands_total", labels) or 0.0


@pytest.fixture
async def rig(tmp_path: Path, hq_broker: Mosquitto) -> AsyncIterator[Rig]:
    config = gateway_config(tmp_path, hq_broker.port)
    metrics = Metrics()
    journal = Journal(
        tmp_path / "journal.db",
        STORE,
        GW,
        config.journal,
        metrics,
        # the ledger, and the rules that raise and clear its stock.low, as the runtime wires them
        [StockLedger(config.stock, metrics), RuleEngine([config.stock.low_alert], RuleClock(lambda: True))],
        ClockState(override=True),
    )
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    try:
        yield Rig(config, journal, metrics)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


@contextlib.asynccontextmanager
async def running(downlink: Downlink) -> AsyncIterator[Downlink]:
    task = asyncio.create_task(downlink.run(), name="downlink-under-test")
    try:
        async with asyncio.timeout(WITHIN):
            await downlink.ready.wait()
        yield downlink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Hq:
    """HQ's side: publishes commands, reads responses in order."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.responses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.raw: list[bytes] = []
        self._n = 0

    def on_message(self, message: Message) -> None:
        self.raw.append(bytes(message.payload))
        self.responses.put_nowait(orjson.loads(message.payload))

    async def send(self, body: Any, topic: str | None = None, retain: bool = False) -> None:
        """Publish a command, signed with HQ's test key when it can be (malformed ones go as they are)."""
        topic = topic or commands_topic(PREFIX, STORE, GW)
        payload = body if isinstance(body, bytes) else orjson.dumps(sign_command(topic, body))
        await self.client.publish(topic, payload, qos=1, retain=retain)

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(WITHIN):
            response = await self.responses.get()
        assert response["store_id"] == STORE
        assert response["gateway_id"] == GW
        return response

    async def ask(self, name: str, args: Any = None, request_id: str | None = None) -> dict[str, Any]:
        self._n += 1
        request_id = request_id or f"r-{self._n}"
        body: dict[str, Any] = {"request_id": request_id, "command": name}
        if args is not None:
            body["args"] = args
        await self.send(body)
        response = await self.next()
        assert (response["request_id"], response["command"]) == (request_id, name), response
        return response


@pytest.fixture
async def hq(hq_broker: Mosquitto) -> AsyncIterator[Hq]:
    client = MqttClient(BrokerConfig(port=hq_broker.port), "hq-under-test", clean_start=True)
    side = Hq(client)
    client.on_message = side.on_message
    await client.connect()
    await client.subscribe([(responses_topic(PREFIX, STORE, GW), 1)])
    try:
        yield side
    finally:
        await client.disconnect()


def ok(response: dict[str, Any]) -> Any:
    assert (response["status"], response["error"]) == ("ok", None), response
    return response["result"]


def error(response: dict[str, Any], code: str) -> str:
    assert response["status"] == "error", response
    assert response["error"]["code"] == code, response
    assert response["result"] is None
    return str(response["error"]["message"])


# --- each command ----------------------------------------------------------------------------------------


async def test_ping_and_config_get(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        pong = ok(await hq.ask("ping"))
        assert pong == {"pong": True, "version": __version__, "boot_id": BOOT_ID, "last_seq": 0, "backlog": 0}
        result = ok(await hq.ask("config.get"))
    assert result["config_hash"] == "cfg-hash-1"
    config = result["config"]
    assert config["hq"]["password"] == "**********"
    assert config["api"]["token"] == "**********"
    assert config["hq"]["port"] == rig.config.hq.port
    assert config["stock"]["default_safety_stock"] == 3
    assert not any(HQ_PASSWORD.encode() in raw or API_TOKEN.encode() in raw for raw in hq.raw)
    assert rig.count("ping", "ok") == rig.count("config.get", "ok") == 1
    assert rig.kinds() == []  # read-only commands commit nothing


async def test_stock_adjust_moves_stock_once(rig: Rig, hq: Hq) -> None:
    receiving = {"sku": "TEA", "delta": 24, "reason": "receiving", "note": "PO-7"}
    async with running(rig.downlink()):
        first = ok(await hq.ask("stock.adjust", receiving, request_id="adj-1"))
        assert first["on_hand"] == "34"
        replay = await hq.ask("stock.adjust", receiving, request_id="adj-1")
        assert (replay["status"], replay["error"]) == ("duplicate", None)
        assert replay["result"] == first  # the seq of the original event, and stock as it is
        count = ok(await hq.ask("stock.adjust", {"sku": "TEA", "set": "1.5", "reason": "stocktake"}))
        assert count["on_hand"] == "1.5"
        fresh = ok(await hq.ask("stock.adjust", {"sku": "NEW-1", "delta": 6, "reason": "transfer_in"}))
        assert fresh["on_hand"] == "6"
    assert rig.stock()["TEA"] == (1.5, 2.0)
    assert rig.kinds() == [
        "stock.adjusted",
        "stock.level",
        "stock.adjusted",
        "stock.level",
        "alert.raised",  # the stock-take went below TEA's safety stock
        "stock.adjusted",
        "stock.level",
    ]
    body = orjson.loads(rig.rows("SELECT body FROM events WHERE seq=?", (first["seq"],))[0][0])
    assert body["kind"] == "stock.adjusted"
    assert body["data"] == {
        "sku": "TEA",
        "delta": "24",
        "set": None,
        "reason": "receiving",
        "note": "PO-7",
        "request_id": "adj-1",
    }
    assert rig.rows("SELECT dedup_key FROM events WHERE seq=?", (first["seq"],)) == [("cmd:adj-1",)]
    assert rig.count("stock.adjust", "ok") == 3
    assert rig.count("stock.adjust", "duplicate") == 1


async def test_stock_adjust_moves_stock_in_seq_order_with_sales(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        assert rig.journal.submit(pos_draft("R1", [("RICE", "5")]))
        ok(await hq.ask("stock.adjust", {"sku": "RICE", "set": 100, "reason": "stocktake"}))
        assert rig.journal.submit(pos_draft("R2", [("RICE", "1")]))
        await rig.journal.flush()
    assert rig.stock()["RICE"] == (99.0, None)
    levels = [
        orjson.loads(b)["data"]["on_hand"]
        for (b,) in rig.rows("SELECT body FROM events WHERE kind='stock.level'")
    ]
    assert levels == ["45", "100", "99"]


async def test_documents_are_stored_versioned_and_announced(rig: Rig, hq: Hq) -> None:
    staff = [{"staff_id": "S-1", "name": "Chan Tai Man", "role": "cashier", "shifts": []}]
    shelves = [{"shelf_id": "A1", "sku": "TEA", "facings": 3, "min_on_shelf": 4}]
    async with running(rig.downlink()):
        assert ok(await hq.ask("roster.set", {"staff": staff}, request_id="ros-1")) == {
            "version": 1,
            "count": 1,
        }
        assert ok(await hq.ask("planogram.set", {"shelves": shelves})) == {"version": 1, "count": 1}
        second = ok(await hq.ask("roster.set", {"staff": [*staff, {**staff[0], "staff_id": "S-2"}]}))
        assert second == {"version": 2, "count": 2}
        replay = await hq.ask("roster.set", {"staff": staff}, request_id="ros-1")
        # A replay is answered with what that request did the first time (the command ledger keeps it).
        assert (replay["status"], replay["result"]) == ("duplicate", {"version": 1, "count": 1})
    stored = dict(rig.rows("SELECT name, version FROM documents"))
    assert stored == {"roster": 2, "planogram": 1}
    body = orjson.loads(rig.rows("SELECT body FROM documents WHERE name='planogram'")[0][0])
    assert body == {"shelves": shelves}
    announced = [orjson.loads(b)["data"] for (b,) in rig.rows("SELECT body FROM events ORDER BY seq")]
    assert [(a["name"], a["version"], a["count"]) for a in announced] == [
        ("roster", 1, 1),
        ("planogram", 1, 1),
        ("roster", 2, 2),
    ]
    assert announced[0]["request_id"] == "ros-1"


async def test_rules_set_applies_thresholds(rig: Rig, hq: Hq) -> None:
    rules = [
        {"id": "default", "type": "stock.low", "sku": None, "threshold": 45},
        {"id": "tea", "type": "stock.low", "sku": "TEA", "threshold": 9},
        {"id": "later", "type": "stock.low", "sku": "LATER", "threshold": 4},
    ]
    async with running(rig.downlink()):
        assert ok(await hq.ask("rules.set", {"rules": rules})) == {"version": 1, "count": 3}
        assert rig.stock()["TEA"] == (10.0, 9.0)
        # RICE has no threshold of its own: the rules' default (45) now applies, not the config's (3).
        assert rig.journal.submit(pos_draft("R1", [("RICE", "5"), ("TEA", "1"), ("LATER", "1")]))
        await rig.journal.flush()
        alerts = [
            orjson.loads(b)["data"]["subject"]
            for (b,) in rig.rows("SELECT body FROM events WHERE kind='alert.raised'")
        ]
        assert sorted(alerts) == ["LATER", "RICE", "TEA"]
        assert rig.stock()["LATER"] == (-1.0, 4.0)
        # Dropping the TEA rule gives TEA its configured threshold back; dropping the default, the config's.
        assert ok(await hq.ask("rules.set", {"rules": []})) == {"version": 2, "count": 0}
    assert rig.stock() == {"TEA": (9.0, 2.0), "RICE": (45.0, None), "BOOM": (5.0, 1.0), "LATER": (-1.0, None)}


async def test_rules_survive_a_restart_over_configured_thresholds(rig: Rig, hq: Hq, tmp_path: Path) -> None:
    rules = [{"id": "tea", "type": "stock.low", "sku": "TEA", "threshold": 7}]
    async with running(rig.downlink()):
        ok(await hq.ask("rules.set", {"rules": rules}))
    ledger = StockLedger(rig.config.stock, Metrics())
    with contextlib.closing(sqlite3.connect(rig.journal.path, isolation_level=None)) as conn:
        ledger.setup(conn)  # what the next start does: config thresholds first, HQ's rules over them
        assert conn.execute("SELECT safety_stock FROM stock WHERE sku='TEA'").fetchall() == [(7.0,)]


async def test_a_failing_rules_set_rolls_back_and_the_old_rules_stay(rig: Rig, hq: Hq) -> None:
    old = [
        {"id": "default", "type": "stock.low", "threshold": 8},
        {"id": "tea", "type": "stock.low", "sku": "TEA", "threshold": 6},
    ]
    new = [
        {"id": "default", "type": "stock.low", "threshold": 0},
        {"id": "tea", "type": "stock.low", "sku": "TEA", "threshold": 1},
        {"id": "boom", "type": "stock.low", "sku": "BOOM", "threshold": 2},
    ]
    async with running(rig.downlink()):
        ok(await hq.ask("rules.set", {"rules": old}))
        before_stock, before_events = rig.stock(), rig.kinds()
        before_doc = rig.rows("SELECT * FROM documents")
        # A real failure in the middle of the transaction: after the rules document is written, setting BOOM's
        # threshold hits an error inside SQLite.
        with contextlib.closing(sqlite3.connect(rig.journal.path)) as conn:
            conn.execute(
                "CREATE TRIGGER fail_boom BEFORE UPDATE OF safety_stock ON stock WHEN NEW.sku='BOOM' "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        message = error(await hq.ask("rules.set", {"rules": new}), "failed")
        assert "injected failure" in message
        assert rig.rows("SELECT * FROM documents") == before_doc
        assert rig.stock() == before_stock
        assert rig.kinds() == before_events
        # The ledger still works with the old rules: RICE (no own threshold) at 8 is low under the old default.
        assert rig.journal.submit(pos_draft("R1", [("RICE", "42")]))
        await rig.journal.flush()
        assert rig.kinds()[-2:] == ["stock.level", "alert.raised"]
        # A rule set that does not validate changes nothing either.
        error(
            await hq.ask("rules.set", {"rules": [{"id": "x", "type": "stock.gone", "threshold": 1}]}),
            "invalid_args",
        )
        assert rig.rows("SELECT version FROM documents WHERE name='rules'") == [(1,)]
    assert rig.count("rules.set", "failed") == rig.count("rules.set", "invalid_args") == 1


async def test_resend_calls_the_uplink(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        assert ok(await hq.ask("resend", {"from_seq": 2, "to_seq": 9})) == {
            "resent": [[2, 5]],
            "missing": [[6, 9]],
        }
        error(await hq.ask("resend", {"from_seq": 9, "to_seq": 2}), "invalid_args")
        assert "nothing that far" in error(
            await hq.ask("resend", {"from_seq": 2000, "to_seq": 2001}), "invalid_args"
        )
    assert rig.resends == [(2, 9)]


async def test_a_resend_of_many_ranges_is_answered_in_one_response(rig: Rig, hq: Hq) -> None:
    """HQ asks for scattered holes in one command; the gateway resends each range (sorted, overlapping and
    adjacent ones joined, so each seq is read once) and answers once, listing every resent and missing range."""
    async with running(rig.downlink()):
        answer = ok(await hq.ask("resend", {"ranges": [[3, 9], [1, 1], [3, 4]]}))
        assert answer == {"resent": [[1, 1], [3, 5]], "missing": [[6, 9]]}
        assert ok(await hq.ask("resend", {"ranges": [[1, 2], [2, 3], [4, 4]]})) == {
            "resent": [[1, 4]],
            "missing": [],
        }
    assert rig.resends == [(1, 1), (3, 9), (1, 4)]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"ranges": [[1, 2]] * 1001}, "at most 1000"),
        ({"ranges": [[1, 60_000], [70_000, 110_000]]}, "at most 100000 seqs"),
        ({"ranges": []}, "at least 1"),
        ({"ranges": [[5, 4]]}, "each range is [first, last]"),
        ({"ranges": [[0, 4]]}, "greater than or equal to 1"),
        ({"ranges": [[1, 2, 3]]}, "ranges.0"),
        ({"ranges": [[True, 2]]}, "valid integer"),
        ({"ranges": [["1", 2]]}, "valid integer"),
        ({"from_seq": 1.0, "to_seq": 2}, "valid integer"),
        ({"ranges": "1-2"}, "ranges"),
        ({"ranges": [[1, 2]], "from_seq": 1, "to_seq": 2}, "either from_seq and to_seq, or ranges"),
        ({"from_seq": 1}, "from_seq and to_seq go together"),
        ({}, "either from_seq and to_seq, or ranges"),
    ],
)
async def test_a_bad_multi_range_resend_is_refused_and_resends_nothing(
    rig: Rig, hq: Hq, args: dict[str, Any], words: str
) -> None:
    async with running(rig.downlink()):
        assert words in error(await hq.ask("resend", args), "invalid_args")
    assert rig.resends == []


async def test_device_write_sets_a_fridge_setpoint_over_modbus(rig: Rig, hq: Hq) -> None:
    """HQ's device.write goes through the Modbus driver to a real pymodbus server (the fridge simulator)."""
    server = FridgeServer([1], speed=0.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await server.start_tcp("127.0.0.1", port)
    ctx = DriverContext(rig.journal, rig.metrics, DeviceRegistry(rig.journal.submit), rig.config)
    driver = ModbusDriver(
        ModbusDriverConfig.model_validate(
            {
                "type": "modbus",
                "transport": "tcp",
                "host": "127.0.0.1",
                "port": port,
                "timeout_s": 0.3,
                "retries": 0,
                "devices": [{"id": "fridge-1", "unit": 1, "profile": "dixell-xr"}],
            }
        ),
        ctx,
    )
    polling = asyncio.create_task(driver.run(), name="modbus-under-test")
    try:
        async with asyncio.timeout(WITHIN):
            while not ctx.states.get("modbus") or not ctx.states["modbus"].connected:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with running(rig.downlink(writers=ctx.device_writers)):
            args = {"device_id": "fridge-1", "point": "setpoint", "value": -2.5}
            assert ok(await hq.ask("device.write", args)) == args
            assert await server.read_point(1, "setpoint") == -2.5
            too_warm = {"device_id": "fridge-1", "point": "setpoint", "value": 40}
            assert "outside" in error(await hq.ask("device.write", too_warm), "invalid_args")
            read_only = {"device_id": "fridge-1", "point": "air_temperature", "value": 1}
            assert "not writable" in error(await hq.ask("device.write", read_only), "invalid_args")
            nobody = {"device_id": "fridge-9", "point": "setpoint", "value": 1}
            assert "no writable device" in error(await hq.ask("device.write", nobody), "invalid_args")
            server.muted.add(1)
            assert "no response" in error(await hq.ask("device.write", args), "failed")
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await server.stop()
    assert rig.count("device.write", "ok") == 1
    assert rig.count("device.write", "invalid_args") == 3


# --- bad input -------------------------------------------------------------------------------------------


async def test_malformed_commands_get_errors_and_change_nothing(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        await hq.send(b'{"request_id": "r-1", "command": ')
        assert error(await hq.next(), "bad_json")
        await hq.send({"command": "ping"})
        response = await hq.next()
        error(response, "bad_request")
        assert response["request_id"] is None
        error(await hq.ask("reboot"), "unknown_command")
        big = {"request_id": "big", "command": "roster.set", "args": {"staff": [], "pad": "x" * 300_000}}
        await hq.send(big)
        response = await hq.next()
        assert "bytes; at most 262144" in error(response, "bad_request")
        assert response["request_id"] is None  # not read from a command that is too large to parse
        face = {"staff_id": "S-1", "name": "A", "role": "cashier", "face_template": "AAECAwQ="}
        assert "biometric" in error(await hq.ask("roster.set", {"staff": [face]}), "invalid_args")
        error(
            await hq.ask("stock.adjust", {"sku": "TEA", "delta": 1, "set": 2, "reason": "receiving"}),
            "invalid_args",
        )
        ok(await hq.ask("ping"))
    assert rig.kinds() == []
    assert rig.rows("SELECT COUNT(*) FROM documents") == [(0,)]
    assert rig.stock()["TEA"] == (10.0, 2.0)
    assert not any(b"AAECAwQ" in raw for raw in hq.raw)
    assert rig.count("other", "bad_json") == rig.count("ping", "bad_request") == 1
    assert rig.count("other", "unknown_command") == rig.count("other", "bad_request") == 1
    assert rig.count("roster.set", "invalid_args") == rig.count("stock.adjust", "invalid_args") == 1


async def test_commands_for_another_store_are_not_seen(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        adjust = {
            "request_id": "x-1",
            "command": "stock.adjust",
            "args": {"sku": "TEA", "delta": 5, "reason": "receiving"},
        }
        await hq.send(adjust, topic=commands_topic(PREFIX, "hk-002", GW))
        await hq.send(adjust, topic=commands_topic(PREFIX, STORE, "gw-2"))
        ok(await hq.ask("ping"))  # answered first: nothing came before it
    assert rig.kinds() == []


async def test_a_command_from_a_stale_subscription_is_forbidden(
    rig: Rig, hq: Hq, hq_broker: Mosquitto
) -> None:
    """The session of our client id still holds a subscription to another store's topic (say the box was moved
    to another store and kept its client id): what arrives there is refused, answered and counted."""
    config = gateway_config(rig.journal.path.parent, hq_broker.port, client_id="moved-box")
    other = commands_topic(PREFIX, "hk-002", GW)
    stale = MqttClient(config.hq, config.client_id("downlink", config.hq), clean_start=False)
    await stale.connect()
    await stale.subscribe([(other, 1)])
    await stale.disconnect()
    adjust = {
        "request_id": "x-1",
        "command": "stock.adjust",
        "args": {"sku": "TEA", "delta": 5, "reason": "receiving"},
    }
    await hq.send(adjust, topic=other)  # queued for the session
    async with running(rig.downlink(config)):
        response = await hq.next()
        assert "own topic" in error(response, "forbidden")
        assert (response["request_id"], response["command"]) == ("x-1", "stock.adjust")
        ok(await hq.ask("ping"))
    assert rig.kinds() == []
    assert rig.count("stock.adjust", "forbidden") == 1


async def test_a_retained_command_is_not_executed(rig: Rig, hq: Hq) -> None:
    adjust = {
        "request_id": "ret-1",
        "command": "stock.adjust",
        "args": {"sku": "TEA", "delta": 5, "reason": "receiving"},
    }
    await hq.send(adjust, retain=True)
    async with running(rig.downlink()):
        response = await hq.next()
        assert "retained" in error(response, "bad_request")
        assert response["request_id"] == "ret-1"
        ok(await hq.ask("ping"))
    assert rig.kinds() == []


# --- persistent session ----------------------------------------------------------------------------------


async def test_commands_sent_while_offline_are_handled_on_return(rig: Rig, hq: Hq) -> None:
    async with running(rig.downlink()):
        ok(await hq.ask("ping"))  # the session and its subscription now exist at the broker
    adjust = {"sku": "TEA", "delta": 5, "reason": "receiving"}
    await hq.send({"request_id": "off-1", "command": "stock.adjust", "args": adjust})
    await hq.send({"request_id": "off-2", "command": "ping"})
    answers: dict[str, dict[str, Any]] = {}
    async with running(rig.downlink()):
        while len(answers) < 2:
            response = await hq.next()
            if response["request_id"] == "r-1":
                # Going offline may beat the PUBACK of the last command answered: it comes again (at least once),
                # and the command ledger knows it was carried out.
                assert response["status"] == "duplicate", response
                continue
            answers[response["request_id"]] = response
    assert ok(answers["off-1"])["on_hand"] == "15"
    assert ok(answers["off-2"])["pong"] is True
    assert rig.stock()["TEA"] == (15.0, 2.0)
