"""Whether the TLS files a config names can be used: each problem names the file, the reason and what to do.

One function for ``check-config``, ``run`` (before anything starts) and the MQTT client (on a failure)."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Final, Literal


@dataclasses.dataclass(frozen=True, slots=True)
class FileProblem:
    """Why a file the config names cannot be used; ``message`` names the file, ``hint`` says what to do."""

    key: str
    """The config key naming the file: ca_file, cert_file, key_file or initial_csv."""
    path: Path
    kind: Literal["missing", "unreadable", "not a file", "not PEM", "encrypted", "key mismatch", "invalid"]
    message: str
    hint: str | None

    @property
    def absent(self) -> bool:
        """The file is not there for this user (as opposed to there but wrong)."""
        return self.kind in ("missing", "unreadable")

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")


def tls_file_problems(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, folder: Path | None = None
) -> list[FileProblem]:
    """Why the TLS files cannot be used, or [] if they can: each must exist, be readable and be PEM (a CA
    certificate, a certificate, an unencrypted private key), the key must match the certificate, and OpenSSL
    must load them the way ``gateway.kernel.mqtt_client.tls_context`` does. ``folder``: the config file's, for the hint.

    One function for ``check-config``, ``run`` (before anything starts) and ``tls_context`` (on a failure)."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    problems: list[FileProblem] = []
    ca_data = read_named_file("ca_file", ca_file, folder, problems)
    cert_data = read_named_file("cert_file", cert_file, folder, problems)
    key_data = read_named_file("key_file", key_file, folder, problems)
    if ca_file is not None and ca_data is not None:
        try:
            ssl.create_default_context(ssl.Purpose.SERVER_AUTH).load_verify_locations(cafile=str(ca_file))
        except ssl.SSLError:
            problems.append(_not_pem("ca_file", ca_file, ca_data, "no CA certificate in it"))
    cert: x509.Certificate | None = None
    if cert_file is not None and cert_data is not None:
        try:
            cert = x509.load_pem_x509_certificates(cert_data)[0]
        except ValueError:
            problems.append(_not_pem("cert_file", cert_file, cert_data, "no certificate in it"))
    key_public: bytes | None = None
    if key_file is not None and key_data is not None:
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
            key_public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except TypeError:  # "Password was not given but private key is encrypted"
            problems.append(
                FileProblem(
                    "key_file",
                    key_file,
                    "encrypted",
                    f"{key_file}: encrypted with a passphrase, which the gateway cannot give",
                    f"write it decrypted, readable only by the gateway's user: openssl pkey -in {key_file} -out "
                    f"{key_file.with_suffix('.plain.key')}",
                )
            )
        except ValueError:
            problems.append(_not_pem("key_file", key_file, key_data, "no private key in it"))
        except Exception as exc:  # cryptography's UnsupportedAlgorithm and the like
            problems.append(
                FileProblem(
                    "key_file", key_file, "invalid", f"{key_file}: not a usable private key: {exc}", None
                )
            )
    if cert is not None and key_file is not None and key_public is not None:
        cert_public = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if cert_public != key_public:
            problems.append(
                FileProblem(
                    "key_file",
                    key_file,
                    "key mismatch",
                    f"{key_file}: the key does not match the certificate {cert_file}",
                    "cert_file and key_file must be a pair: the key the certificate was issued for",
                )
            )
    if not problems and (ca_file is not None or cert_file is not None):
        # OpenSSL has the last word: what it refuses here, the gateway's connection would refuse too.
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
            )
            if cert_file is not None and key_file is not None:
                ctx.load_cert_chain(str(cert_file), str(key_file), password=no_passphrase)
        except (OSError, ValueError) as exc:
            named, path = ("cert_file", cert_file) if cert_file is not None else ("ca_file", ca_file)
            assert path is not None
            problems.append(
                FileProblem(named, path, "invalid", f"{path}: OpenSSL cannot load it: {exc}", None)
            )
    return problems


def no_passphrase() -> str:
    """The ``password`` callback of ``load_cert_chain``: without one, OpenSSL would prompt on the terminal."""
    raise ValueError("the private key is encrypted with a passphrase, which the gateway cannot give")


def read_named_file(
    key: str, path: Path | None, folder: Path | None, problems: list[FileProblem]
) -> bytes | None:
    """The bytes of a file the config names, or None (and a problem appended) if it cannot be read."""
    if path is None:
        return None
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            problems.append(
                FileProblem(
                    key, path, "not a file", f"{path}: a folder, not a file", "give the path of a file"
                )
            )
            return None
        if not stat.S_ISREG(info.st_mode):
            problems.append(FileProblem(key, path, "not a file", f"{path}: not a regular file", None))
            return None
        with path.open("rb") as fh:
            return fh.read()
    except FileNotFoundError:
        where = f"; relative paths in the config are relative to its folder, {folder}" if folder else ""
        problems.append(FileProblem(key, path, "missing", f"{path}: missing", f"check the path{where}"))
    except OSError as exc:
        problems.append(
            FileProblem(
                key,
                path,
                "unreadable",
                f"{path}: unreadable ({exc.strerror or exc})",
                "the gateway's user must be able to read it (and to enter its folders)",
            )
        )
    return None


_WHAT: Final = {
    "ca_file": "the CA certificate(s) that signed the broker's certificate (-----BEGIN CERTIFICATE-----)",
    "cert_file": "this gateway's certificate (-----BEGIN CERTIFICATE-----)",
    "key_file": "this gateway's private key (-----BEGIN PRIVATE KEY-----)",
}


def _not_pem(key: str, path: Path, data: bytes, nothing: str) -> FileProblem:
    """A TLS file that is not the PEM it should be, and what it seems to be instead."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    has_cert = b"-----BEGIN CERTIFICATE-----" in data
    has_key = b"PRIVATE KEY-----" in data
    swapped = "cert_file and key_file swapped? " if key != "ca_file" else ""
    if key == "key_file" and has_cert and not has_key:
        return FileProblem(
            key, path, "not PEM", f"{path}: not PEM: a certificate, no private key", f"{swapped}{_WHAT[key]}"
        )
    if key != "key_file" and has_key and not has_cert:
        return FileProblem(
            key, path, "not PEM", f"{path}: not PEM: a private key, no certificate", f"{swapped}{_WHAT[key]}"
        )
    try:
        if key == "key_file":
            serialization.load_der_private_key(data, password=None)
        else:
            x509.load_der_x509_certificate(data)
    except Exception:  # not DER either (cryptography raises ValueError, TypeError or UnsupportedAlgorithm)
        return FileProblem(key, path, "not PEM", f"{path}: not PEM: {nothing}", f"{key} is {_WHAT[key]}")
    tool = "pkey" if key == "key_file" else "x509"
    out = path.with_suffix(".pem") if path.suffix != ".pem" else path.with_name(f"{path.stem}-converted.pem")
    return FileProblem(
        key,
        path,
        "not PEM",
        f"{path}: not PEM: binary DER",
        f"convert it: openssl {tool} -inform DER -in {path} -out {out}",
    )
