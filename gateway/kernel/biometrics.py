"""The one biometric policy: what counts as biometric data in a message or a document, decided without echoing it.

The check-in kiosk decoder (drivers/mqtt/checkin.py) and the staff roster (gateway/ledger/documents.py) both
ask here, so
they refuse the same things:

- a key that names biometric data (``face_template``, ``Photos``, ``selfie_jpeg``): case and separators are
  ignored, and :data:`ALLOWED_KEYS` (the kiosk's ``face_match_score``) are the only exceptions;
- a key or a string that looks like an encoded image or template (over :data:`MAX_BLOB_CHARS` base64-like
  characters), or a ``data:`` URI;
- a list of more than :data:`MAX_NUMBER_LIST` numbers (a face embedding);
- nesting deeper than :data:`MAX_DEPTH`.

A :class:`Finding` says where and what without quoting the input: ``what`` is built only from this module's own
words and counts, and ``path`` shows a key only when it is short and plain (:func:`shown_key`). Callers on a
redacted route (the kiosk) report ``what`` alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

MARKERS: Final = (
    "biometric",
    "face",
    "embedding",
    "template",
    "vector",
    "feature",
    "landmark",
    "photo",
    "picture",
    "pic",
    "image",
    "img",
    "jpeg",
    "jpg",
    "png",
    "webp",
    "bitmap",
    "bmp",
    "selfie",
    "snapshot",
    "portrait",
    "thumbnail",
    "fingerprint",
    "palmprint",
    "voiceprint",
    "iris",
    "retina",
    "base64",
    "b64",
)
"""A key containing one of these, once lower-cased with everything but letters and digits removed, is refused."""
ALLOWED_KEYS: Final = frozenset({"facematchscore"})
"""Folded keys that contain a marker but are not biometric: the kiosk's own match score (a number in 0..1)."""
MAX_BLOB_CHARS: Final = 128
"""A key or string this long made of base64 characters is taken for an encoded image or template."""
MAX_NUMBER_LIST: Final = 16
"""A list of more numbers than this is taken for a face embedding."""
MAX_DEPTH: Final = 8
IMAGE_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM")
"""JPEG, PNG, GIF, WebP, BMP file signatures."""

_FOLD: Final = re.compile(r"[^a-z0-9]")
_BLOB: Final = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_DATA_URI: Final = re.compile(r"^\s*data:", re.IGNORECASE)
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")
MAX_BLOB_SPACE_SHARE: Final = 0.05
"""Base64 wraps at 76 characters at most (1-2 % whitespace); a long human name has a space every few letters."""


@dataclass(frozen=True, slots=True)
class Finding:
    """Something biometric-looking: ``path`` (keys shown only when plain, see :func:`shown_key`) and ``what``
    (never quotes the input)."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}" if self.path else self.what


def biometric_marker(key: str) -> str | None:
    """The marker a key contains (``'face'`` for ``FaceID``), or None for a key that names nothing biometric."""
    folded = _FOLD.sub("", key.lower())
    if folded in ALLOWED_KEYS:
        return None
    return next((m for m in MARKERS if m in folded), None)


def looks_like_blob(text: str) -> bool:
    """A long run of base64 characters with almost no whitespace: an encoded image or template."""
    if len(text) <= MAX_BLOB_CHARS or not _BLOB.fullmatch(text):
        return False
    spaces = sum(1 for c in text if c.isspace())
    return spaces <= len(text) * MAX_BLOB_SPACE_SHARE


def looks_like_image(payload: bytes) -> bool:
    """The bytes start with an image file's signature."""
    return payload.startswith(IMAGE_MAGIC)


def shown_key(key: str) -> str:
    """A key as an error message may show it: itself when short and plain, else only its length."""
    return key if _PLAIN_KEY.fullmatch(key) else f"<a key of {len(key)} characters>"


def find_biometrics(doc: object, limit: int = 1) -> list[Finding]:
    """Up to ``limit`` biometric-looking things in a parsed JSON document, in document order."""
    found: list[Finding] = []
    _walk(doc, "", 0, found, limit)
    return found


def first_biometric(doc: object) -> Finding | None:
    found = find_biometrics(doc, 1)
    return found[0] if found else None


def _walk(doc: object, where: str, depth: int, found: list[Finding], limit: int) -> None:
    if len(found) >= limit:
        return
    if depth > MAX_DEPTH:
        found.append(Finding(where, f"nested deeper than {MAX_DEPTH}"))
        return
    if isinstance(doc, dict):
        for key, value in doc.items():
            text = str(key)
            path = f"{where}.{shown_key(text)}" if where else shown_key(text)
            marker = biometric_marker(text)
            if marker is not None:
                found.append(Finding(path, f"a field named like {marker!r}"))
            elif looks_like_blob(text):
                found.append(Finding(where, f"a {len(text)}-character base64-like key"))
            elif _DATA_URI.match(text):
                found.append(Finding(where, "a data: URI as a key"))
            if len(found) >= limit:
                return
            _walk(value, path, depth + 1, found, limit)
            if len(found) >= limit:
                return
    elif isinstance(doc, list):
        numbers = sum(1 for v in doc if isinstance(v, int | float) and not isinstance(v, bool))
        if numbers > MAX_NUMBER_LIST:
            found.append(Finding(where, f"a list of {numbers} numbers (an embedding?)"))
            return
        for i, value in enumerate(doc):
            _walk(value, f"{where}[{i}]", depth + 1, found, limit)
            if len(found) >= limit:
                return
    elif isinstance(doc, str):
        if _DATA_URI.match(doc):
            found.append(Finding(where, "a data: URI"))
        elif looks_like_blob(doc):
            found.append(Finding(where, f"a {len(doc)}-character base64-like string"))
