"""TLS to HQ with client certificates (mTLS), against a real mosquitto that requires them.

The test makes its own CA, a server certificate for 127.0.0.1 and two client certificates: one signed by
the CA (accepted) and one self-signed (refused).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.mqtt_client import MqttClient, MqttError
from tests.harness.brokers import Mosquitto


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = _key()
    ca = _cert("test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    files = {
        "ca": _write(tmp_path / "ca.pem", ca),
        "server": _write(
            tmp_path / "server.pem", _cert("hq", server_key, ca, ca_key, ip="127.0.0.1"), server_key
        ),
        "client": _write(tmp_path / "client.pem", _cert("gw-01", client_key, ca, ca_key), client_key),
        "rogue": _write(tmp_path / "rogue.pem", _cert("gw-01", rogue_key, None, rogue_key), rogue_key),
    }
    for path in tmp_path.iterdir():
        path.chmod(0o644)  # mosquitto may drop to its own user
    return files


@pytest.fixture
def mtls_broker(pki: dict[str, Path]) -> Iterator[Mosquitto]:
    broker = Mosquitto(
        extra_conf=(
            f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server'].with_suffix('.key')}\n"
            "require_certificate true\nuse_identity_as_username true\n"
        )
    ).start()
    yield broker
    broker.close()


def _tls_broker(broker: Mosquitto, pki: dict[str, Path], client: str) -> BrokerConfig:
    return BrokerConfig(
        host=broker.host,
        port=broker.port,
        tls=TlsConfig(ca_file=pki["ca"], cert_file=pki[client], key_file=pki[client].with_suffix(".key")),
    )


async def test_mutual_tls_carries_messages(mtls_broker: Mosquitto, pki: dict[str, Path]) -> None:
    got: list[bytes] = []
    sub = MqttClient(_tls_broker(mtls_broker, pki, "client"), "hq-sub", clean_start=True)
    sub.on_message = lambda m: got.append(bytes(m.payload))
    await sub.connect()
    await sub.subscribe([("retail/#", 1)])
    pub = MqttClient(_tls_broker(mtls_broker, pki, "client"), "gw-uplink", clean_start=True)
    await pub.connect()
    await asyncio.gather(*(pub.publish("retail/s/g/events", b"batch-%d" % i) for i in range(20)))
    for _ in range(250):
        if len(got) == 20:
            break
        await asyncio.sleep(0.02)
    assert sorted(got) == sorted(b"batch-%d" % i for i in range(20))
    await pub.disconnect()
    await sub.disconnect()


async def test_a_client_certificate_from_another_ca_is_refused(
    mtls_broker: Mosquitto, pki: dict[str, Path]
) -> None:
    rogue = MqttClient(_tls_broker(mtls_broker, pki, "rogue"), "rogue", clean_start=True)
    with pytest.raises(MqttError):
        await rogue.connect(within_s=5)


async def test_a_broker_we_cannot_verify_is_refused(
    mtls_broker: Mosquitto, pki: dict[str, Path], tmp_path: Path
) -> None:
    other_key = _key()
    other_ca = _write(tmp_path / "other-ca.pem", _cert("other CA", other_key, None, other_key, ca=True))
    config = _tls_broker(mtls_broker, pki, "client").model_copy(
        update={
            "tls": TlsConfig(
                ca_file=other_ca, cert_file=pki["client"], key_file=pki["client"].with_suffix(".key")
            )
        }
    )
    with pytest.raises(MqttError):
        await MqttClient(config, "gw-wrong-ca", clean_start=True).connect(within_s=5)
