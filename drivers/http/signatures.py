"""Webhook signatures, one scheme per cloud POS format: pure functions, constant-time comparison.

- ``generic``: ``X-Signature-256: sha256=<hex HMAC-SHA256(secret, <timestamp>.<raw body>)>`` with the
  sending time in ``X-Webhook-Timestamp: <Unix seconds>`` (Stripe's and Slack's way of signing the time, so a
  captured request cannot be replayed after the freshness window: drivers/http/freshness.py). A source with
  ``signed_timestamp: false`` signs the raw body alone, GitHub's scheme (docs.github.com, "Validating webhook
  deliveries").
- ``lightspeed`` (Retail X-Series, formerly Vend): ``X-Signature: signature=<hex>, algorithm=HMAC-SHA256``,
  the HMAC-SHA256 of the raw form-encoded body keyed with the app's client secret. The X-Series webhook page
  (x-series-api.lightspeedhq.com/docs/webhooks) documents the form body; the signature format follows
  integrations that verify it (third-party: verify against a real delivery).
- ``square``: ``x-square-hmacsha256-signature: base64(HMAC-SHA256(signature key, notification URL + raw body))``
  (developer.squareup.com/docs/webhooks/step3validate; square-python-sdk ``webhooks_helper``). Square's
  older ``x-square-signature`` (HMAC-SHA1) is not accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final

from drivers.errors import DecodeError
from drivers.http.config import Format

_MAX_HEADER = 1024
"""A longer signature header is refused unread."""
TIMESTAMP_HEADER: Final = "X-Webhook-Timestamp"
"""generic: when the request was signed, in Unix seconds; covered by the signature."""
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")


def sign(
    fmt: Format, secret: str, body: bytes, notification_url: str | None = None, timestamp: str | None = None
) -> str:
    """The signature header value a sender of ``fmt`` puts on ``body`` (for the simulator and tests);
    ``timestamp`` (generic only) is the value of :data:`TIMESTAMP_HEADER`, signed with the body."""
    if timestamp is not None:
        if fmt != "generic":
            raise ValueError(f"{fmt} signs no timestamp header")
        body = timestamp.encode("ascii") + b"." + body
    if fmt == "square":
        if not notification_url:
            raise ValueError("square signs the notification URL with the body: give notification_url")
        digest = hmac.new(secret.encode(), notification_url.encode() + body, hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")
    hexdigest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if fmt == "lightspeed":
        return f"signature={hexdigest}, algorithm=HMAC-SHA256"
    return f"sha256={hexdigest}"


def verify(
    fmt: Format,
    secret: str,
    header: str | None,
    body: bytes,
    notification_url: str | None = None,
    timestamp: str | None = None,
) -> None:
    """Returns when ``header`` is the right signature of ``body`` (generic: of ``timestamp.body`` when
    ``timestamp`` is given, see :func:`signed_timestamp`); otherwise :class:`DecodeError` with reason
    ``no_signature`` (missing or unreadable header) or ``bad_signature`` (a signature that does not match)."""
    if timestamp is not None:
        if fmt != "generic":
            raise ValueError(f"{fmt} signs no timestamp header")
        body = timestamp.encode("ascii") + b"." + body
    if header is None or not header.strip():
        raise DecodeError("no_signature", "the signature header is missing")
    if len(header) > _MAX_HEADER or not header.isascii():
        raise DecodeError("no_signature", "the signature header is not a signature")
    given = header.strip()
    if fmt == "square":
        expected = sign("square", secret, body, notification_url)
    elif fmt == "lightspeed":
        given = _lightspeed_signature(given)
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    else:
        scheme, _, given = given.partition("=")
        if scheme.strip().lower() != "sha256":
            raise DecodeError("no_signature", "the signature header is not 'sha256=<hex>'")
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if fmt != "square":
        given = given.strip().lower()  # hex is case-insensitive; base64 is not
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("ascii")):
        raise DecodeError("bad_signature", "the signature does not match the body")


def signed_timestamp(header: str | None) -> str:
    """The value of a generic request's :data:`TIMESTAMP_HEADER` (Unix seconds), or :class:`DecodeError`
    ``no_timestamp`` when it is missing or not a number."""
    if header is None or not header.strip():
        raise DecodeError("no_timestamp", f"the {TIMESTAMP_HEADER} header is missing")
    value = header.strip()
    if not _TIMESTAMP.fullmatch(value):
        raise DecodeError("no_timestamp", f"the {TIMESTAMP_HEADER} header is not Unix seconds")
    return value


def _lightspeed_signature(header: str) -> str:
    """The hex of ``signature=<hex>, algorithm=HMAC-SHA256`` (parameters in any order)."""
    params: dict[str, str] = {}
    for part in header.split(","):
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip()
    algorithm = params.get("algorithm", "HMAC-SHA256")
    if algorithm.upper() != "HMAC-SHA256":
        raise DecodeError("no_signature", f"signature algorithm {algorithm[:40]!r} is not HMAC-SHA256")
    signature = params.get("signature")
    if not signature:
        raise DecodeError("no_signature", "the header has no 'signature=<hex>'")
    return signature
