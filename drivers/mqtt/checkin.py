"""Pure decoding of a check-in kiosk's message into ``staff.checkin``, refusing anything biometric.

The kiosk matches the face itself and sends only the score. A message that carries an image, a photo, a
face template, an embedding, or any base64-looking blob (or a long list of numbers: a feature vector) is
refused with reason ``biometric_refused``, before any other check (the policy is :mod:`gateway.kernel.biometrics`,
shared with the staff roster). A message larger than :data:`MAX_CHECKIN_BYTES` is refused the same way: a
check-in is a couple of hundred bytes, and a large one most likely carries an image.

The kiosk route is redacted: its messages are quarantined without their payload. So no detail this decoder
gives quotes the message either: no key names (a base64 image can be a key), no values, only this module's
own words, counts and the names of the check-in's own fields.

Message (JSON object)::

    {"employee_id": "E1001", "direction": "in", "latitude": 22.2819, "longitude": 114.1585,
     "accuracy_m": 12.0, "face_match_score": 0.93, "kiosk_time": "2024-05-01T08:58:03.120+08:00"}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson
from pydantic import ValidationError

from drivers.errors import DecodeError
from drivers.mqtt.mapping import device_time
from gateway.kernel.biometrics import MAX_BLOB_CHARS, first_biometric, looks_like_image
from gateway.kernel.events import StaffCheckin
from gateway.kernel.strict_json import has_duplicate_keys

MAX_CHECKIN_BYTES: Final = 2048
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
        if looks_like_image(payload) or len(payload) > MAX_BLOB_CHARS:
            raise DecodeError(
                "biometric_refused", "not JSON, and an image or large enough to be one"
            ) from None
        raise DecodeError("not_json", "a check-in is a JSON object") from None
    found = first_biometric(doc)
    if found is not None:
        raise DecodeError("biometric_refused", f"refused: {found.what}; biometrics never leave the kiosk")
    if not isinstance(doc, dict):
        raise DecodeError("invalid", "a check-in is a JSON object")
    if has_duplicate_keys(payload, doc):
        raise DecodeError("duplicate_key", "a key appears twice in one object (names not kept)")
    unknown = len(set(doc) - _FIELDS)
    if unknown:
        raise DecodeError("invalid", f"{unknown} unknown field(s) (names not kept: the route is redacted)")
    stamp = doc.pop("kiosk_time", None)
    try:
        occurred = device_time(stamp) if stamp is not None else None
    except DecodeError as err:
        raise DecodeError(err.reason, "kiosk_time: not an ISO 8601 time with a UTC offset") from None
    try:
        data = StaffCheckin.model_validate(doc, strict=False)
    except ValidationError as err:
        # Only the check-in's own field names (unknown keys were refused above) and pydantic's messages, which
        # never quote the input with include_input=False.
        first = err.errors(include_url=False, include_input=False)[:3]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in first)
        raise DecodeError("invalid", detail[:300]) from None
    return Checkin(data, occurred)
