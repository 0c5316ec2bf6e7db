"""A small PKI for tests: a CA, a gateway certificate and keys (PEM), valid 2000-2100 so nothing depends on
today's date; plus the spare files the bad-file tests need (another key, DER, an encrypted key)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOT_BEFORE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def write_pki(folder: Path) -> dict[str, Path]:
    """A CA, this gateway's certificate and its key (PEM) in ``folder``, plus spare files for the bad cases:
    another key, the certificate in DER, the key encrypted with a passphrase."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    cert = _certificate("gw-01", key, "test CA", ca_key, ca=False)
    files = {
        "ca": (folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "cert": (folder / "gateway.crt", cert.public_bytes(serialization.Encoding.PEM)),
        "key": (folder / "gateway.key", _pem_key(key)),
        "other_key": (folder / "other.key", _pem_key(other_key)),
        "cert_der": (folder / "gateway.der", cert.public_bytes(serialization.Encoding.DER)),
        "encrypted_key": (folder / "encrypted.key", _pem_key(key, b"passphrase")),
    }
    for path, data in files.values():
        path.write_bytes(data)
        path.chmod(0o644)
    return {name: path for name, (path, _) in files.items()}
