"""A device acting as another (docs/SECURITY.md): logged in with one till's password, a client published a
sale as another till, forged a staff check-in, read every topic with '#', and sent a 10 MB message.

One real mosquitto for the module, run with the shipped docker/mosquitto/mosquitto.conf (paths and ports
moved to a temporary folder and free loopback ports) and the accounts that ``broker provision`` makes from
a store config (STORE_CONFIG): the gateway on the plain listener, the devices over TLS, as in a store. Every "never
arrived" is proved by a later message on the same path that did arrive, never by waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import ipaddress
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from gateway.broker_accounts import BROKER_MAX_PACKET_BYTES, provision, too_large_for_broker
from gateway.config import GatewayConfig
from gateway.config_loader import load_config
from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError
from tests.harness.brokers import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "docker" / "mosquitto" / "mosquitto.conf"
WAIT_S = 5.0
"""Upper bound on any single wait for a message that must arrive (it takes milliseconds)."""
STORE_CONFIG = """\
gateway_id: gw-01
store:
  id: hk-001
  name: Test Store
store_broker:
  username: gateway
  password: {env: STORE_MQTT_PASSWORD}
hq:
  host: hq.example.com
api:
  token: {env: API_TOKEN}
drivers:
  - type: mqtt
    routes:
      - {pattern: "store/pos/{device_id}/sale", kind: pos.sale}
      - {pattern: "store/pos/{device_id}/return", kind: pos.return}
      - {pattern: "store/kiosk/{device_id}/checkin", profile: checkin-kiosk}
      - {pattern: "store/sensor/{device_id}/state", profile: generic-json-sensor}
  - type: modbus
    transport: tcp
    host: 192.0.2.40
    devices:
      - {id: chiller-01, unit: 1, profile: dixell-xr}
devices:
  - {id: pos-01, profile: pos-terminal}
  - {id: pos-02, profile: pos-terminal}
  - {id: kiosk-staff, profile: checkin-kiosk}
  - {id: fridge-01, profile: generic-json-sensor}
"""
"""Tills, a kiosk and a sensor on MQTT, and a fridge controller on Modbus (which gets no account)."""
ROUTES = ["store/pos/+/sale", "store/pos/+/return", "store/kiosk/+/checkin", "store/sensor/+/state"]
"""The config's route subscriptions: what the gateway's account reads."""


@dataclass(frozen=True)
class Store:
    broker: Mosquitto
    tls_port: int
    ca: Path
    passwords: dict[str, str]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """The broker's certificate as docker/README.md has the technician make it: self-signed, for the box's
    address (here 127.0.0.1), which each till is given to trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "store-broker")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir()
    cert_file, key_file = folder / "broker.crt", folder / "broker.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def store_config(folder: Path) -> Path:
    path = folder / "store.yaml"
    path.write_text(STORE_CONFIG)
    return path


def load(config: Path) -> GatewayConfig:
    """The config as ``broker provision`` reads it: without its secrets."""
    return load_config(config, {}, no_secrets=True)


def shipped_conf(folder: Path, plain_port: int, tls_port: int) -> str:
    """docker/mosquitto/mosquitto.conf with its paths in ``folder`` and its listeners on loopback ports."""
    text = CONF.read_text()
    for old, new in {
        "/mosquitto/config/accounts/": f"{folder}/accounts/",
        "/mosquitto/config/certs/": f"{folder}/certs/",
        "/mosquitto/data/": f"{folder}/data/",
        "listener 1883\n": f"listener {plain_port} 127.0.0.1\n",
        "listener 8883\n": f"listener {tls_port} 127.0.0.1\n",
    }.items():
        assert old in text, f"{CONF.name} no longer has {old!r}"
        text = text.replace(old, new)
    # As root, mosquitto would drop to user 'mosquitto', which cannot read the test's private folder.
    return text + f"user {getpass.getuser()}\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    folder = tmp_path_factory.mktemp("store-broker")
    config = store_config(folder)
    done = provision(load(config), folder / "accounts", source=str(config))
    ca, _ = self_signed(folder / "certs")
    (folder / "data").mkdir()
    tls_port = free_port()
    broker = Mosquitto()
    broker.conf.write_text(shipped_conf(folder, broker.port, tls_port))
    broker.start()
    try:
        yield Store(broker, tls_port, ca, dict(done.new_passwords))
    finally:
        broker.close()


class Inbox:
    """What one client received, in order, with a wait for the next."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def __call__(self, message: Message) -> None:
        item = (message.topic, bytes(message.payload))
        self.messages.append(item)
        self._queue.put_nowait(item)

    async def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload)."""
        async with asyncio.timeout(WAIT_S):
            while await self._queue.get() != (topic, payload):
                pass
        return self.messages[: self.messages.index((topic, payload)) + 1]


def account(store: Store, user: str, *, protocol: str = "5", password: str | None = None) -> BrokerConfig:
    """A device's connection: TLS, checked with the broker's certificate; the gateway's: the plain listener."""
    secret = SecretStr(password if password is not None else store.passwords[user])
    if user == "gateway":
        return BrokerConfig(port=store.broker.port, protocol="5", username=user, password=secret)
    return BrokerConfig(
        port=store.tls_port,
        protocol=protocol,
        username=user,
        password=secret,
        tls=TlsConfig(ca_file=store.ca),
    )


@asynccontextmanager
async def connected(
    broker: BrokerConfig, client_id: str, inbox: Inbox | None = None
) -> AsyncIterator[MqttClient]:
    client = MqttClient(broker, client_id, clean_start=True, on_message=inbox)
    try:
        await client.connect()
        yield client
    finally:
        await client.disconnect()


@asynccontextmanager
async def gateway(store: Store) -> AsyncIterator[Inbox]:
    """The gateway's account, subscribed to every route, as the intake is."""
    inbox = Inbox()
    async with connected(account(store, "gateway"), "gw-intake", inbox) as client:
        await client.subscribe([(route, 1) for route in ROUTES])
        yield inbox


async def test_a_device_cannot_publish_as_another_device(store: Store) -> None:
    async with gateway(store) as seen, connected(account(store, "pos-02"), "pos-02") as pos02:
        # MQTT 5, QoS 1: mosquitto answers the forged sale with PUBACK "not authorized" and drops it.
        with pytest.raises(MqttError, match="Not authorized"):
            await pos02.publish("store/pos/pos-01/sale", b'{"receipt_no": "R-000124"}')
        for topic in ("store/pos/pos-01/return", "store/pos/pos-02/checkin", "store/pos/pos-02"):
            with pytest.raises(MqttError, match="Not authorized"):
                await pos02.publish(topic, b"forged")
        await pos02.publish("store/pos/pos-02/sale", b"own sale")
        assert await seen.until("store/pos/pos-02/sale", b"own sale") == [
            ("store/pos/pos-02/sale", b"own sale")
        ]


async def test_an_mqtt3_device_cannot_publish_as_another_device_either(store: Store) -> None:
    """MQTT 3.1.1 has no reason codes: the broker acknowledges the forged sale and drops it silently."""
    async with (
        gateway(store) as seen,
        connected(account(store, "pos-02", protocol="3.1.1"), "pos-02") as pos02,
    ):
        await pos02.publish("store/pos/pos-01/sale", b"forged", qos=0)
        await pos02.publish("store/pos/pos-01/sale", b"forged")
        await pos02.publish("store/pos/pos-02/sale", b"own sale")
        assert await seen.until("store/pos/pos-02/sale", b"own sale") == [
            ("store/pos/pos-02/sale", b"own sale")
        ]


async def test_a_till_cannot_forge_a_checkin_and_the_kiosks_own_arrives(store: Store) -> None:
    async with (
        gateway(store) as seen,
        connected(account(store, "pos-02"), "pos-02") as pos02,
        connected(account(store, "kiosk-staff"), "kiosk-staff") as kiosk,
    ):
        for topic in ("store/kiosk/kiosk-staff/checkin", "store/kiosk/pos-02/checkin"):
            with pytest.raises(MqttError, match="Not authorized"):
                await pos02.publish(topic, b'{"employee_id": "E-1"}')
        await kiosk.publish("store/kiosk/kiosk-staff/checkin", b'{"employee_id": "E-7"}')
        assert await seen.until("store/kiosk/kiosk-staff/checkin", b'{"employee_id": "E-7"}') == [
            ("store/kiosk/kiosk-staff/checkin", b'{"employee_id": "E-7"}')
        ]


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "$SYS/#", "store/kiosk/+/checkin", "store/kiosk/kiosk-staff/checkin", "store/pos/+/sale"],
)
async def test_a_device_subscribed_to_what_it_does_not_own_receives_nothing(
    store: Store, topic_filter: str
) -> None:
    """mosquitto 2.0 grants the subscription (SUBACK 0x01) and checks the ACL on each message it would deliver
    through it: none is. (A broker that refuses the subscription outright does as well.)"""
    spied = Inbox()
    async with (
        gateway(store) as seen,
        connected(account(store, "pos-02"), "pos-02", spied) as pos02,
        connected(account(store, "kiosk-staff"), "kiosk-staff") as kiosk,
        connected(account(store, "pos-01"), "pos-01") as pos01,
    ):
        with contextlib.suppress(MqttError):
            await pos02.subscribe([(topic_filter, 1)])
        await kiosk.publish("store/kiosk/kiosk-staff/checkin", b"check-in")
        await pos01.publish("store/pos/pos-01/sale", b"sale")
        await seen.until("store/pos/pos-01/sale", b"sale")
        assert ("store/kiosk/kiosk-staff/checkin", b"check-in") in seen.messages
        # The broker writes to one connection in order: whatever it had sent pos-02 for those two messages, or
        # for the retained $SYS topics, would have come before the SUBACK of a later subscription.
        await pos02.subscribe([(topic_filter, 1)])
    assert spied.messages == []


async def test_a_publish_over_max_packet_size_closes_the_connection(store: Store) -> None:
    big = b"x" * (300 * 1024)
    async with (
        gateway(store) as seen,
        connected(account(store, "pos-02", protocol="3.1.1"), "pos-02") as pos02,
        connected(account(store, "pos-01"), "pos-01") as pos01,
    ):
        with pytest.raises(MqttError, match="connection lost"):
            await pos02.publish("store/pos/pos-02/sale", big)
        async with asyncio.timeout(WAIT_S):
            await pos02.wait_closed()
        await pos01.publish("store/pos/pos-01/sale", b"after")
        await seen.until("store/pos/pos-01/sale", b"after")
        assert all(len(payload) < len(big) for _, payload in seen.messages)


async def test_a_device_needs_its_own_password_and_tls(store: Store) -> None:
    for broker in (
        account(store, "pos-02", password=store.passwords["pos-01"]),
        account(store, "pos-02", password=""),
        BrokerConfig(port=store.tls_port, tls=TlsConfig(ca_file=store.ca)),  # anonymous
        # Plain MQTT on the devices' port: TLS only.
        BrokerConfig(port=store.tls_port, username="pos-02", password=SecretStr(store.passwords["pos-02"])),
    ):
        client = MqttClient(broker, "intruder", clean_start=True)
        with pytest.raises(MqttError):
            await client.connect()
        await client.disconnect()


async def test_a_device_cannot_throw_another_off_by_taking_its_client_id(store: Store) -> None:
    async with gateway(store) as seen, connected(account(store, "pos-01"), "till") as pos01:
        async with connected(account(store, "pos-02"), "till") as pos02:
            await pos02.publish("store/pos/pos-02/sale", b"pos-02 connected")
            await seen.until("store/pos/pos-02/sale", b"pos-02 connected")
        await pos01.publish("store/pos/pos-01/sale", b"still here")
        await seen.until("store/pos/pos-01/sale", b"still here")
        assert pos01.is_connected


async def test_the_gateway_account_reads_the_devices_but_publishes_nothing(store: Store) -> None:
    async with gateway(store) as seen, connected(account(store, "gateway"), "gw-other") as gw:
        with pytest.raises(MqttError, match="Not authorized"):
            await gw.publish("store/pos/pos-01/sale", b"forged by the gateway account")
        async with connected(account(store, "fridge-01"), "fridge-01") as fridge:
            await fridge.publish("store/sensor/fridge-01/state", b'{"temperature": 4.1}')
            await seen.until("store/sensor/fridge-01/state", b'{"temperature": 4.1}')


def test_the_broker_takes_every_message_the_gateway_accepts(tmp_path: Path) -> None:
    assert f"\nmax_packet_size {BROKER_MAX_PACKET_BYTES}\n" in CONF.read_text()
    assert too_large_for_broker(load(store_config(tmp_path))) == []
    raised = STORE_CONFIG.replace(
        "  - type: mqtt\n", "  - type: mqtt\n    max_payload_bytes: 1048576\n"
    ).replace(
        "{id: pos-02, profile: pos-terminal}",
        "{id: pos-02, profile: pos-terminal, max_payload_bytes: 1048576}",
    )
    (tmp_path / "store.yaml").write_text(raised)
    assert too_large_for_broker(load(tmp_path / "store.yaml")) == [
        ("pos-02", 1048576 + len("store/pos/pos-02/return") + 16)
    ]
