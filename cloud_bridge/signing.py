"""Ed25519 signatures on HQ commands (docs/OUTBOX.md, "Signed commands").

HQ signs each command over a canonical form of what it asks (topic, key id, request id, validity, command,
args); the gateway checks it with HQ's public keys pinned in its config (``hq.command_keys``). The canonical
form is RFC 8785 (JSON Canonicalization Scheme) of one JSON array, so HQ systems in any language can produce it
with a JCS library; :func:`canonical_json` is this project's implementation of it.

Pure code: no I/O beyond reading a key file in :func:`load_private_key`.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.kernel.errors import StoreGatewayError

SIGNING_CONTEXT: Final = "store-gateway.command.v1"
"""The first element of every signed array: a signature made for anything else never verifies here."""
MAX_VALIDITY_S: Final = 24 * 3600
"""``not_after - issued_at`` at most: a captured command is worth something for one day at most."""
CLOCK_SKEW_S: Final = 60
"""Allowed difference between HQ's clock and the gateway's synchronised clock, either way."""
DEFAULT_VALIDITY_S: Final = 300
MAX_SAFE_INTEGER: Final = 2**53 - 1
"""RFC 7493 (I-JSON): integers beyond this have no exact canonical form (JCS numbers are IEEE doubles)."""
MAX_DEPTH: Final = 64
SIGNATURE_FIELDS: Final = ("key_id", "issued_at", "not_after", "signature")


class CanonicalError(StoreGatewayError, ValueError):
    """A value with no canonical form: a big integer, NaN, a non-JSON type, or nested too deeply."""


class SigningKeyError(StoreGatewayError, ValueError):
    """A key that cannot be used; the message says why, without the key material."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS): object keys sorted by UTF-16 code units, no whitespace, strings escaped as ECMAScript's
    JSON.stringify does, numbers as ECMAScript's Number.prototype.toString (shortest round-trip)."""
    out: list[str] = []
    _emit(value, out, 0)
    return "".join(out).encode("utf-8")


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string(text: str) -> str:
    parts = ['"']
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            parts.append(escaped)
        elif ch < " ":
            parts.append(f"\\u{ord(ch):04x}")
        else:
            parts.append(ch)
    parts.append('"')
    return "".join(parts)


def _number(value: float) -> str:
    """ECMAScript Number::toString for a finite double (RFC 8785 section 3.2.2.3)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise CanonicalError("NaN and infinities have no JSON form")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    parsed = Decimal(repr(abs(value))).as_tuple()  # repr: the shortest string that round-trips
    digits = "".join(map(str, parsed.digits))
    exponent = int(parsed.exponent)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    k = len(digits)
    n = exponent + k  # value = 0.digits x 10^n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text


def _emit(value: Any, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nested more than {MAX_DEPTH} levels deep")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalError("an integer beyond 2^53-1 has no canonical form (RFC 7493)")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out, depth + 1)
        out.append("]")
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: str(k).encode("utf-16-be"))):
            if not isinstance(key, str):
                raise CanonicalError("object keys are strings")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _emit(value[key], out, depth + 1)
        out.append("}")
    else:
        raise CanonicalError(f"{type(value).__name__} is not a JSON value")


def signed_message(
    topic: str, key_id: str, request_id: str, issued_at: int, not_after: int, command: str, args: Any
) -> bytes:
    """The bytes HQ signs: JCS of ``["store-gateway.command.v1", topic, key_id, request_id, issued_at,
    not_after, command, args]`` (``args`` is ``{}`` when the command has none)."""
    return canonical_json(
        [
            SIGNING_CONTEXT,
            topic,
            key_id,
            request_id,
            issued_at,
            not_after,
            command,
            {} if args is None else args,
        ]
    )


# --- keys ----------------------------------------------------------------------------------------------------


def load_public_key(text: str) -> Ed25519PublicKey:
    """A pinned public key: PEM (``openssl pkey -pubout``), or base64 of the raw 32 bytes or of the DER
    SubjectPublicKeyInfo. Raises :class:`SigningKeyError`."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key: Any = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            raw = base64.b64decode(text, validate=True)
            if len(raw) == 32:
                return Ed25519PublicKey.from_public_bytes(raw)
            key = serialization.load_der_public_key(raw)
    except (ValueError, binascii.Error, UnicodeEncodeError) as err:
        raise SigningKeyError(
            "not an Ed25519 public key: give the PEM of 'openssl pkey -in KEY -pubout', or base64 of its 32"
            " raw bytes"
        ) from err
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"a {type(key).__name__.removeprefix('_')}, not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """HQ's signing key: a PEM file from ``openssl genpkey -algorithm ed25519`` (unencrypted)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningKeyError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise SigningKeyError(f"{path} is encrypted: write it decrypted, readable only by its user") from err
    except ValueError as err:
        raise SigningKeyError(
            f"{path}: not a PEM private key (make one: openssl genpkey -algorithm ed25519)"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key (make one: openssl genpkey -algorithm ed25519)")
    return key


def public_key_text(key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32 bytes: what ``hq.command_keys[].public_key`` takes on one line."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


# --- signing and checking --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandSigner:
    """HQ's side: turns a command into a signed envelope for one gateway's topic."""

    key_id: str
    key: Ed25519PrivateKey

    def envelope(
        self,
        topic: str,
        request_id: str,
        command: str,
        args: Any = None,
        *,
        valid_for_s: int = DEFAULT_VALIDITY_S,
        issued_at: int | None = None,
    ) -> dict[str, Any]:
        """The command as a JSON object, signed; valid from ``issued_at`` (now) for ``valid_for_s``."""
        issued = int(time.time()) if issued_at is None else issued_at
        not_after = issued + valid_for_s
        message = signed_message(topic, self.key_id, request_id, issued, not_after, command, args)
        body: dict[str, Any] = {"request_id": request_id, "command": command}
        if args is not None:
            body["args"] = args
        body |= {
            "key_id": self.key_id,
            "issued_at": issued,
            "not_after": not_after,
            "signature": base64.b64encode(self.key.sign(message)).decode("ascii"),
        }
        return body

    def sign(self, topic: str, request_id: str, command: str, args: Any = None, **kw: Any) -> bytes:
        """:meth:`envelope` as the bytes to publish."""
        return orjson.dumps(self.envelope(topic, request_id, command, args, **kw))


def decode_signature(text: str) -> bytes | None:
    """64 bytes from standard base64 (with padding), or None."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def signature_valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
