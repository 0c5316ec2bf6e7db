"""Pure decoding of a check-in kiosk's message into ``staff.checkin``, refusing anything biometric.

The kiosk matches the face itself and sends only the score. A message that carries an image, a photo, a
face template, an embedding, or any base64-looking blob (or a long list of numbers: a feature vector) is
refused with reason ``biometric_refused``, before any other check, so the driver can quarantine it without
its payload (``redact=True``). A message larger than :data:`MAX_CHECKIN_BYTES` is refused the same way: a
check-in is a couple of hundred bytes, and a large one most likely carries an image.

Message (JSON object)::

    {"employee_id": "E1001", "direction": "in", "latitude": 22.2819, "longitude": 114.1585,
     "accuracy_m": 12.0, "face_match_score": 0.93, "kiosk_time": "2024-05-01T08:58:03.120+08:00"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import ValidationError

from drivers.base import DecodeError
from drivers.mqtt.mapping import device_time
from gateway.events import StaffCheckin

MAX_CHECKIN_BYTES: Final = 2048
MAX_BLOB_CHARS: Final = 128
"""A string this long made only of base64 characters is taken for an encoded image or template."""
MAX_NUMBER_LIST: Final = 16
"""A list of more numbers than this is taken for a face embedding."""
MAX_DEPTH: Final = 8

BIOMETRIC_KEY: Final = re.compile(
    r"image|img|photo|picture|pic|jpe?g|png|webp|bitmap|bmp|selfie|snapshot|portrait|thumbnail|"
    r"face(?!_match_score$)|template|embedding|vector|feature|biometric|fingerprint|iris|landmark|base64|b64",
    re.IGNORECASE,
)
_BLOB: Final = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_IMAGE_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM")
"""JPEG, PNG, GIF, WebP, BMP file signatures."""
_DATA_URI: Final = re.compile(r"^\s*data:", re.IGNORECASE)
_FIELDS: Final = frozenset(
    {"employee_id", "direction", "latitude", "longitude", "accuracy_m", "face_match_score", "kiosk_time"}
)


@dataclass(frozen=True, slots=True)
class Checkin:
    data: StaffCheckin
    occurred_at: str | None
    """The kiosk's time (ISO 8601 with offset, milliseconds), if it sent one."""


def decode_checkin(payload: bytes) -> Checkin:
    """One kiosk message -> a check-in; :class:`DecodeError` (``biometric_refused`` first) otherwise."""
    if len(payload) > MAX_CHECKIN_BYTES:
        raise DecodeError(
            "biometric_refused",
            f"{len(payload)} bytes > {MAX_CHECKIN_BYTES}: a check-in never carries an image",
        )
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        if payload.startswith(_IMAGE_MAGIC) or len(payload) > MAX_BLOB_CHARS:
            raise DecodeError(
                "biometric_refused", "not JSON, and an image or large enough to be one"
            ) from None
        raise DecodeError("not_json", "a check-in is a JSON object") from None
    found = biometric_field(doc)
    if found is not None:
        raise DecodeError("biometric_refused", f"refused: {found}; biometrics never leave the kiosk")
    if not isinstance(doc, dict):
        raise DecodeError("invalid", "a check-in is a JSON object")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise DecodeError("invalid", f"unknown field(s): {', '.join(_short(k) for k in unknown[:5])}")
    stamp = doc.pop("kiosk_time", None)
    occurred = device_time(stamp) if stamp is not None else None
    try:
        data = StaffCheckin.model_validate(doc, strict=False)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[:3]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in first)
        raise DecodeError("invalid", detail) from None
    return Checkin(data, occurred)


def biometric_field(doc: Any, where: str = "", depth: int = 0) -> str | None:
    """Where the message carries something biometric-looking (a key, a blob, a vector), or None."""
    if depth > MAX_DEPTH:
        return f"{where or '(message)'}: nested deeper than {MAX_DEPTH}"
    if isinstance(doc, dict):
        for key, value in doc.items():
            path = f"{where}.{_short(key)}" if where else _short(key)
            if BIOMETRIC_KEY.search(key):
                return f"field {path!r}"
            found = biometric_field(value, path, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(doc, list):
        if sum(1 for v in doc if isinstance(v, int | float) and not isinstance(v, bool)) > MAX_NUMBER_LIST:
            return f"{where or '(message)'}: a list of {len(doc)} numbers (an embedding?)"
        for i, value in enumerate(doc):
            found = biometric_field(value, f"{where}[{i}]", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(doc, str):
        if _DATA_URI.match(doc):
            return f"{where or '(message)'}: a data: URI"
        if len(doc) > MAX_BLOB_CHARS and _BLOB.fullmatch(doc):
            return f"{where or '(message)'}: a {len(doc)}-character base64-like string"
    return None


def _short(text: str) -> str:
    text = text[:40]
    return text if text.isprintable() else repr(text)[1:-1]
