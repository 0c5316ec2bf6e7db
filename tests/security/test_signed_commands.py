"""HQ commands are obeyed only when signed by a pinned HQ key and inside their validity (docs/OUTBOX.md,
"Signed commands"). The threat: someone with HQ broker credentials (another store's, or a leaked HQ account)
publishing on a gateway's commands topic. Real peers: the Downlink with a real journal and stock ledger (SQLite
files) and its command ledger; mosquitto and the ``store-gateway hq-command`` process for the end-to-end case.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sqlite3
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from cloud_bridge.commands import ARGS
from cloud_bridge.downlink import Downlink
from cloud_bridge.signing import (
    CommandSigner,
    canonical_json,
    load_public_key,
    public_key_text,
    signature_valid,
    signed_message,
)
from cloud_bridge.topics import commands_topic
from gateway.config import GatewayConfig
from gateway.kernel.clock import ClockState
from gateway.kernel.config import BrokerConfig, CommandName
from gateway.kernel.journal import Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import MqttClient, MqttError
from gateway.ledger.stock import StockLedger
from gateway.runtime import command_handlers
from tests.harness.brokers import Mosquitto

STORE, GW, PREFIX = "hk-001", "gw-1", "retail"
TOPIC = commands_topic(PREFIX, STORE, GW)
KEY_A = Ed25519PrivateKey.generate()
KEY_B = Ed25519PrivateKey.generate()
ATTACKER = Ed25519PrivateKey.generate()

# RFC 8032 section 7.1, TEST 1: the secret key and its public key (d75a9801...).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def keys(*pairs: tuple[str, Ed25519PrivateKey]) -> list[dict[str, str]]:
    return [{"id": key_id, "public_key": public_key_text(k.public_key())} for key_id, k in pairs]


def config(data_dir: Path, port: int = 1883, command_keys: Any = None) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": GW,
            "store": {"id": STORE, "name": "Causeway Bay"},
            "data_dir": str(data_dir),
            "hq": {
                "port": port,
                "topic_prefix": PREFIX,
                "command_keys": keys(("hq-a", KEY_A)) if command_keys is None else command_keys,
            },
            "api": {"enabled": False},
            "stock": {"items": [{"sku": "TEA", "on_hand": 10}]},
        }
    )


class Clock:
    def __init__(self, synced: bool) -> None:
        self.value = synced

    def synced(self) -> bool:
        return self.value


@dataclass
class Rig:
    tmp_path: Path
    journal: Journal
    metrics: Metrics
    clock: Clock

    def downlink(self, command_keys: Any = None) -> Downlink:
        return Downlink(
            config(self.tmp_path, command_keys=command_keys),
            self.journal,
            self.metrics,
            None,
            self.resend,
            lambda: {"last_seq": self.journal.last_seq, "backlog": 0},
            command_handlers(self.journal, {}),
            clock=self.clock,
        )

    async def resend(self, first: int, last: int) -> dict[str, list[list[int]]]:
        return {"resent": [[first, last]], "missing": []}

    def on_hand(self) -> float:
        with contextlib.closing(sqlite3.connect(self.journal.path)) as conn:
            return float(conn.execute("SELECT on_hand FROM stock WHERE sku='TEA'").fetchone()[0])

    def count(self, command: str, status: str) -> float:
        labels = {"command": command, "status": status}
        return self.metrics.registry.get_sample_value("storegw_commands_total", labels) or 0.0


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    metrics = Metrics()
    cfg = config(tmp_path)
    journal = Journal(
        tmp_path / "journal.db",
        STORE,
        GW,
        cfg.journal,
        metrics,
        [StockLedger(cfg.stock, metrics)],
        ClockState(override=True),
    )
    await journal.open()
    writer = asyncio.create_task(journal.run(), name="journal-writer-under-test")
    try:
        yield Rig(tmp_path, journal, metrics, Clock(synced=True))
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()


@contextlib.asynccontextmanager
async def opened(downlink: Downlink) -> AsyncIterator[Downlink]:
    try:
        yield downlink
    finally:
        downlink.close()


def signed(
    command: str,
    args: Any = None,
    *,
    key: Ed25519PrivateKey = KEY_A,
    key_id: str = "hq-a",
    request_id: str = "r-1",
    topic: str = TOPIC,
    issued_at: int | None = None,
    valid_for_s: int = 300,
) -> dict[str, Any]:
    return CommandSigner(key_id, key).envelope(
        topic, request_id, command, args, issued_at=issued_at, valid_for_s=valid_for_s
    )


async def answer(downlink: Downlink, body: dict[str, Any] | bytes) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    response: dict[str, Any] = orjson.loads(await downlink.handle(TOPIC, payload))
    return response


def code(response: dict[str, Any]) -> str:
    assert response["status"] == "error", response
    return str(response["error"]["code"])


ADJUST = {"sku": "TEA", "delta": 5, "reason": "receiving"}


# --- the canonical form and its test vectors (docs/OUTBOX.md) ----------------------------------------------


def test_the_documented_test_vector() -> None:
    """The vector in docs/OUTBOX.md, "Test vector": RFC 8032's TEST 1 key, one stock.adjust."""
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
    public = key.public_key()
    assert public.public_bytes_raw().hex() == RFC8032_PUBLIC
    assert public_key_text(public) == "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    args = {"sku": "SKU-1", "reason": "receiving", "delta": 2.5, "note": 'café "B"\n\U0001f600'}
    message = signed_message(
        "retail/hk-001/gw-1/commands", "hq-2026a", "r-123", 1796083200, 1796083500, "stock.adjust", args
    )
    assert (
        message
        == (
            '["store-gateway.command.v1","retail/hk-001/gw-1/commands","hq-2026a","r-123",1796083200,1796083500,'
            '"stock.adjust",{"delta":2.5,"note":"café \\"B\\"\\n\U0001f600","reason":"receiving","sku":"SKU-1"}]'
        ).encode()
    )
    envelope = CommandSigner("hq-2026a", key).envelope(
        "retail/hk-001/gw-1/commands", "r-123", "stock.adjust", args, issued_at=1796083200, valid_for_s=300
    )
    assert base64.b64decode(envelope["signature"]).hex() == (
        "779875f507d225ef52b8d03bd6bcfa27fe565eedbb746059b2cd871e11f14466"
        "83d63d7ca7055acd9f03619a33e10a8643910c738eb07433d5c9144782597707"
    )
    assert signature_valid(public, base64.b64decode(envelope["signature"]), message)


# RFC 8785 Appendix B: IEEE-754 doubles (hex) and their canonical text.
NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


def test_numbers_and_key_order_follow_rfc_8785() -> None:
    for bits, text in NUMBERS.items():
        assert canonical_json(struct.unpack(">d", bytes.fromhex(bits))[0]) == text.encode(), bits
    # RFC 8785 section 3.2.3: keys sort by UTF-16 code units (the emoji's surrogates sort before U+FB33).
    keys_in = ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]
    order = list(orjson.loads(canonical_json(dict.fromkeys(keys_in, 0))))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert (
        canonical_json([15, 15.0, 1.5, True, None, "\u2028\x1f"])
        == b'[15,15,1.5,true,null,"\xe2\x80\xa8\\u001f"]'
    )


# --- refused and counted ------------------------------------------------------------------------------------


async def test_a_valid_command_executes_and_bad_ones_change_nothing(rig: Rig) -> None:
    async with opened(rig.downlink()) as downlink:
        unsigned = {"request_id": "u-1", "command": "stock.adjust", "args": {**ADJUST, "delta": 5000}}
        assert code(await answer(downlink, unsigned)) == "unsigned"
        wrong_key = signed("stock.adjust", {**ADJUST, "delta": 5000}, key=ATTACKER, request_id="w-1")
        assert code(await answer(downlink, wrong_key)) == "bad_signature"
        unknown = signed("stock.adjust", ADJUST, key=ATTACKER, key_id="hq-evil", request_id="k-1")
        assert code(await answer(downlink, unknown)) == "unknown_key"
        tampered = signed("stock.adjust", ADJUST, request_id="t-1")
        tampered["args"] = {**ADJUST, "delta": 5000}
        assert code(await answer(downlink, tampered)) == "bad_signature"
        other_gateway = signed(
            "stock.adjust", ADJUST, request_id="o-1", topic=commands_topic(PREFIX, STORE, "gw-2")
        )
        assert code(await answer(downlink, other_gateway)) == "bad_signature"
        now = int(time.time())
        expired = signed("stock.adjust", ADJUST, request_id="e-1", issued_at=now - 1000, valid_for_s=300)
        assert code(await answer(downlink, expired)) == "expired"
        future = signed("stock.adjust", ADJUST, request_id="f-1", issued_at=now + 3600)
        assert code(await answer(downlink, future)) == "not_yet_valid"
        too_long = signed("ping", request_id="l-1", valid_for_s=2 * 86400)
        assert code(await answer(downlink, too_long)) == "bad_request"
        assert rig.on_hand() == 10
        for status in ("unsigned", "bad_signature", "unknown_key", "expired", "not_yet_valid"):
            assert rig.count("stock.adjust", status) >= 1, status
        response = await answer(downlink, signed("stock.adjust", ADJUST, request_id="ok-1"))
        assert (response["status"], response["result"]["on_hand"]) == ("ok", "15")
        assert rig.on_hand() == 15


async def test_a_replayed_request_id_is_a_duplicate_even_after_its_event_is_gone(rig: Rig) -> None:
    command = signed("stock.adjust", ADJUST, request_id="r-replay")
    async with opened(rig.downlink()) as downlink:
        assert (await answer(downlink, command))["status"] == "ok"

        # The event that carried the dedup key is evicted (disk budget, TTL): the ledger still knows the id.
        def evict(conn: sqlite3.Connection) -> tuple[None, list[Any]]:
            conn.execute("DELETE FROM events WHERE dedup_key='cmd:r-replay'")
            return None, []

        await rig.journal.transact(evict)
        again = await answer(downlink, command)
        assert again["status"] == "duplicate"
        assert again["result"]["on_hand"] == "15"  # the first answer's result
        ping = signed("ping", request_id="p-replay")
        assert (await answer(downlink, ping))["status"] == "ok"
        assert (await answer(downlink, ping))["status"] == "duplicate"
    assert rig.on_hand() == 15
    async with opened(rig.downlink()) as restarted:  # the ledger is on disk
        assert (await answer(restarted, command))["status"] == "duplicate"
    assert rig.on_hand() == 15


async def test_duplicate_json_keys_are_refused(rig: Rig) -> None:
    async with opened(rig.downlink()) as downlink:
        body = orjson.dumps(signed("ping", request_id="d-1"))
        sneaky = body[:-1] + b',"command":"config.get"}'
        response = await answer(downlink, sneaky)
        assert code(response) == "bad_json"
        assert "duplicate key 'command'" in response["error"]["message"]
        nested = signed("stock.adjust", ADJUST, request_id="d-2")
        raw = orjson.dumps(nested).replace(b'"delta":5', b'"delta":5,"delta":5000')
        assert code(await answer(downlink, raw)) == "bad_json"
    assert rig.on_hand() == 10


async def test_rotation_two_keys_then_revocation(rig: Rig) -> None:
    both = keys(("hq-a", KEY_A), ("hq-b", KEY_B))
    async with opened(rig.downlink(both)) as downlink:
        assert (await answer(downlink, signed("ping", request_id="a-1")))["status"] == "ok"
        assert (await answer(downlink, signed("ping", key=KEY_B, key_id="hq-b", request_id="b-1")))[
            "status"
        ] == "ok"
        # A key id is bound to its key: hq-b's id with hq-a's key does not verify.
        assert code(await answer(downlink, signed("ping", key=KEY_A, key_id="hq-b", request_id="x-1"))) == (
            "bad_signature"
        )
    async with opened(rig.downlink(keys(("hq-b", KEY_B)))) as revoked:  # hq-a removed from the config
        assert code(await answer(revoked, signed("ping", request_id="a-2"))) == "unknown_key"
        assert (await answer(revoked, signed("ping", key=KEY_B, key_id="hq-b", request_id="b-2")))[
            "status"
        ] == "ok"


async def test_a_key_scoped_to_resend_signs_nothing_else(rig: Rig) -> None:
    """The HQ receiver's key, limited to what the receiver does: a host holding it cannot command a store."""
    scoped = [{**keys(("hq-a", KEY_A))[0], "commands": ["resend"]}, *keys(("hq-b", KEY_B))]
    async with opened(rig.downlink(scoped)) as downlink:
        before = rig.on_hand()
        adjust = signed("stock.adjust", {"sku": "SKU-1", "delta": 5, "reason": "receiving"}, request_id="s-1")
        response = await answer(downlink, adjust)
        assert code(response) == "forbidden"
        assert "may not sign stock.adjust" in response["error"]["message"]
        assert rig.on_hand() == before
        resend = signed("resend", {"from_seq": 1, "to_seq": 1}, request_id="s-2")
        assert (await answer(downlink, resend))["status"] == "ok"
        other = signed("ping", key=KEY_B, key_id="hq-b", request_id="s-3")
        assert (await answer(downlink, other))["status"] == "ok"


def test_the_config_names_every_command_and_no_other() -> None:
    assert set(get_args(CommandName)) == set(ARGS)


async def test_without_keys_every_command_is_refused(rig: Rig) -> None:
    async with opened(rig.downlink([])) as downlink:
        assert downlink.command_keys == []
        response = await answer(downlink, signed("ping"))
        assert code(response) == "forbidden"
        assert "hq.command_keys" in response["error"]["message"]


async def test_an_unsynchronised_clock_judges_expiry_by_the_time_floor(rig: Rig) -> None:
    async with opened(rig.downlink()) as downlink:
        rig.clock.value = False
        now = int(time.time())
        # No floor yet: a future-dated command cannot be told from a slow clock, and nothing is expired.
        assert (await answer(downlink, signed("ping", request_id="f-1", issued_at=now + 3600)))[
            "status"
        ] == "ok"
        # The floor is now HQ's issued_at: a command that expired before it is refused.
        old = signed("ping", request_id="f-2", issued_at=now - 1000, valid_for_s=300)
        assert code(await answer(downlink, old)) == "expired"
    rig.clock.value = True
    async with opened(rig.downlink()) as synced:
        fresh = signed("ping", request_id="f-3", issued_at=now)
        assert (await answer(synced, fresh))["status"] == "ok"


def test_public_keys_in_every_form_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    public = KEY_A.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for text in (pem.decode(), base64.b64encode(der).decode(), public_key_text(public)):
        assert load_public_key(text).public_bytes_raw() == public.public_bytes_raw()
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        config(tmp_path, command_keys=[{"id": "k", "public_key": "bm90IGEga2V5"}])
    with pytest.raises(ValueError, match="duplicate key id"):
        config(tmp_path, command_keys=keys(("k", KEY_A), ("k", KEY_B)))


# --- end to end: hq-command through mosquitto to a running downlink ----------------------------------------


async def test_hq_command_signs_sends_and_shows_the_answer(
    rig: Rig, tmp_path: Path, hq_broker: Mosquitto
) -> None:
    key_file = tmp_path / "hq-a.key"
    key_file.write_bytes(
        KEY_A.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    downlink = Downlink(
        config(tmp_path, hq_broker.port),
        rig.journal,
        rig.metrics,
        None,
        rig.resend,
        lambda: {"last_seq": rig.journal.last_seq, "backlog": 0},
        command_handlers(rig.journal, {}),
        clock=rig.clock,
    )
    task = asyncio.create_task(downlink.run(), name="downlink-under-test")
    try:
        async with asyncio.timeout(20):
            await downlink.ready.wait()

        async def hq_command(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import sys; from gateway.cli import main; sys.exit(main())",
                "hq-command",
                "--port",
                str(hq_broker.port),
                "--store",
                STORE,
                "--gateway",
                GW,
                "--signing-key",
                str(key_file),
                "--key-id",
                "hq-a",
                "--timeout",
                "20",
                "--json",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ},
            )
            out, err = await process.communicate()
            assert process.returncode is not None
            return process.returncode, out.decode() + err.decode()

        status, output = await hq_command(
            "--request-id", "cli-1", "stock.adjust", orjson.dumps(ADJUST).decode()
        )
        assert status == 0, output
        assert orjson.loads(output)["result"]["on_hand"] == "15"
        status, output = await hq_command(
            "--request-id", "cli-1", "stock.adjust", orjson.dumps(ADJUST).decode()
        )
        assert (status, orjson.loads(output)["status"]) == (4, "duplicate"), output
        status, output = await hq_command(
            "device.write", '{"device_id": "f-1", "point": "setpoint", "value": "5"}'
        )
        assert (status, orjson.loads(output)["error"]["code"]) == (3, "invalid_args"), output
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the sample HQ ACL (docker/hq/mosquitto-hq.acl) on a real mosquitto -----------------------------------


async def test_the_sample_mosquitto_acl_keeps_each_store_to_its_own_topics(tmp_path: Path) -> None:
    acl = Path(__file__).parents[2] / "docker" / "hq" / "mosquitto-hq.acl"
    passwd = tmp_path / "hq.passwd"
    users = ("gw-hk-001-gw-1", "gw-hk-002-gw-1", "hq-commands")
    for n, user in enumerate(users):
        flags = ["-c"] if n == 0 else []
        process = await asyncio.create_subprocess_exec(
            "mosquitto_passwd", *flags, "-b", str(passwd), user, f"pw-{user}"
        )
        assert await process.wait() == 0
    passwd.chmod(0o600)
    broker = Mosquitto(extra_conf=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n").start()
    try:
        received: asyncio.Queue[bytes] = asyncio.Queue()

        def login(user: str) -> BrokerConfig:
            return BrokerConfig(port=broker.port, username=user, password=SecretStr(f"pw-{user}"))

        own = MqttClient(login("gw-hk-001-gw-1"), "acl-own", clean_start=True)
        own.on_message = lambda message: received.put_nowait(bytes(message.payload))
        other = MqttClient(login("gw-hk-002-gw-1"), "acl-other", clean_start=True)
        other.on_message = lambda message: received.put_nowait(b"LEAK " + bytes(message.payload))
        sender = MqttClient(login("hq-commands"), "acl-hq", clean_start=True)
        for client in (own, other, sender):
            await client.connect()
        try:
            await own.subscribe([(TOPIC, 1)])
            with contextlib.suppress(MqttError):  # MQTT 5: refused with a reason code
                await other.subscribe([(TOPIC, 1)])
            with contextlib.suppress(MqttError):
                await other.publish(TOPIC, b"from another store", qos=1)
            await sender.publish(TOPIC, b"from HQ", qos=1)
            await sender.publish(TOPIC, b"marker", qos=1)
            async with asyncio.timeout(10):
                assert await received.get() == b"from HQ"  # in order: the other store's publish never came
                assert await received.get() == b"marker"
            assert received.empty()  # and the other store's account got neither
        finally:
            for client in (own, other, sender):
                await client.disconnect()
    finally:
        broker.close()


async def test_an_unreadable_command_ledger_is_moved_aside_and_commands_go_on(rig: Rig) -> None:
    (rig.tmp_path / "hq-commands.db").write_bytes(b"not a database" * 100)
    async with opened(rig.downlink()) as downlink:
        assert (await answer(downlink, signed("ping", request_id="c-1")))["status"] == "ok"
        assert (await answer(downlink, signed("ping", request_id="c-1")))["status"] == "duplicate"
    assert [p.name.split(".corrupt-")[0] for p in rig.tmp_path.glob("hq-commands.db.corrupt-*")] == [
        "hq-commands.db"
    ]


async def test_a_key_scoped_to_rules_set_cannot_make_the_store_write_devices(rig: Rig) -> None:
    """A rule's modbus_write action writes a device as device.write does: a rules.set carrying one needs a key
    that may also sign device.write; its MQTT messages and plain rules need only rules.set."""
    rule = {"id": "dairy-warm", "type": "temperature", "max_c": 8}
    defrost = {
        "id": "defrost",
        "type": "modbus_write",
        "device": "fridge-1",
        "point": "defrost_start",
        "value": True,
        "interlock": [{"metric": "door_open", "eq": 0}],
    }
    buzzer = {"id": "buzzer", "type": "mqtt_publish", "topic": "store/buzzer/{device_id}"}
    writing = {"rules": [{**rule, "actions": [buzzer, defrost]}]}
    only_rules = [{**keys(("hq-a", KEY_A))[0], "commands": ["rules.set"]}]
    async with opened(rig.downlink(only_rules)) as downlink:
        response = await answer(downlink, signed("rules.set", writing, request_id="w-1"))
        assert code(response) == "forbidden"
        assert response["command"] == "rules.set"
        assert response["request_id"] == "w-1"
        assert "may not sign device.write" in response["error"]["message"]
        assert "dairy-warm/defrost" in response["error"]["message"]
        assert rig.count("rules.set", "forbidden") == 1
        quiet = {"rules": [{**rule, "actions": [buzzer]}]}
        assert (await answer(downlink, signed("rules.set", quiet, request_id="w-2")))["status"] == "ok"
    both = [{**keys(("hq-a", KEY_A))[0], "commands": ["rules.set", "device.write"]}]
    async with opened(rig.downlink(both)) as downlink:
        assert (await answer(downlink, signed("rules.set", writing, request_id="w-3")))["status"] == "ok"
