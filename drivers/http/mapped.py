"""What a webhook mapper returns, and the helpers the three mappers share (pure: no I/O).

A mapper turns a raw webhook body into :class:`Mapped` events (usually one; an exchange is a sale and a
return), or :class:`Ignored` when the body is genuine but not a completed sale (a parked sale, a product
update, a notification without line items), or raises :class:`drivers.base.DecodeError`. Nothing else
escapes a mapper: the hypothesis tests in tests/drivers/test_http_webhooks.py feed them random bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from drivers.errors import DecodeError
from drivers.mqtt.decode import dedup_key
from gateway.kernel.events import PosSale
from gateway.kernel.strict_json import duplicate_key

Kind = Literal["pos.sale", "pos.return"]

_FRACTION: Final = re.compile(r"(\.\d{6})\d+")
"""Square writes nanoseconds; datetime takes microseconds."""

M = TypeVar("M", bound=BaseModel)
L = TypeVar("L")


@dataclass(frozen=True, slots=True)
class Mapped:
    """One event a webhook carries."""

    kind: Kind
    data: PosSale
    """A :class:`PosSale`, or a :class:`gateway.kernel.events.PosReturn` for ``pos.return``."""
    identity: str
    """The sale's identity at its source (Lightspeed sale id, Square order id, generic receipt number)."""
    occurred_at: str | None = None

    def dedup_key(self, source_id: str) -> str:
        """The journal's dedup key: a replayed webhook has the same one (format of drivers/mqtt/decode.py)."""
        return dedup_key(source_id, self.kind, self.data.register_id, self.identity)


@dataclass(frozen=True, slots=True)
class Ignored:
    """A genuine webhook that is not a completed sale or return: acknowledged (200) and counted."""

    reason: str


Outcome = list[Mapped] | Ignored
Mapper = Callable[[bytes], Outcome]


def sale_and_return(
    sold: list[L], returned: list[L], event: Callable[[Kind, list[L], bool], Mapped], where: str
) -> list[Mapped]:
    """The ``pos.sale`` of the lines sold and the ``pos.return`` of the lines returned, each if any.

    An exchange (both in one document) becomes both events, and each one's totals are then its own lines' (the
    third argument of ``event``, ``exact_totals``, is False): the document's totals cover the two together."""
    exact_totals = not (sold and returned)
    out: list[Mapped] = []
    halves: tuple[tuple[Kind, list[L]], ...] = (("pos.sale", sold), ("pos.return", returned))
    for kind, lines in halves:
        if lines:
            try:
                out.append(event(kind, lines, exact_totals))
            except ArithmeticError as err:  # the models' number bounds should leave none: still a DecodeError
                raise DecodeError("invalid", f"{where}: arithmetic: {err!r}") from err
    return out


def load_json(raw: bytes | str) -> Any:
    """Parsed JSON; :class:`DecodeError` ``not_json``, or ``duplicate_key`` (see :func:`reject_duplicate_keys`)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise DecodeError("not_json", f"not JSON: {printable(str(err), 200)}") from err
    reject_duplicate_keys(raw)
    return doc


def reject_duplicate_keys(raw: bytes | str) -> None:
    """:class:`DecodeError` ``duplicate_key`` when an object of the JSON document has a key twice.

    JSON parsers keep the last value (orjson and pydantic do), so ``{"kind": "pos.sale", ..., "kind":
    "pos.return"}`` would be read as a return; a signed body means what its sender meant, which is unknowable.
    Keys are compared as decoded (``"\\u006bind"`` is ``"kind"``). A document that is not JSON passes: the
    parser that reads it next says why.
    """
    try:
        key = duplicate_key(raw)
    except RecursionError as err:
        raise DecodeError("invalid", "JSON nested too deeply") from err
    if key is not None:
        raise DecodeError("duplicate_key", f"key {printable(key, 60)!r} appears twice in one object")


def validate(model: type[M], data: Any, where: str) -> M:
    """``model`` from parsed JSON; a :class:`DecodeError` naming the bad fields otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise DecodeError("invalid", f"{where}: {summarise(err)}") from err
    except (ValueError, TypeError, ArithmeticError) as err:  # pydantic can leak these for odd inputs
        raise DecodeError("invalid", f"{where}: {printable(str(err))}") from err


def parse_time(value: str | None) -> str | None:
    """ISO 8601 / RFC 3339 (or X-Series' ``YYYY-MM-DD HH:MM:SS``, UTC) as the journal's occurred_at."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError as err:
        raise DecodeError("invalid", f"not a time: {printable(value, 60)!r}") from err
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat(timespec="milliseconds")


def summarise(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) if isinstance(p, int) else printable(p, 40) for p in e["loc"]) or "(body)"
        parts.append(f"{loc}: {printable(e['msg'], 200)}")
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def printable(text: str, limit: int = 300) -> str:
    """Text safe for a log line and the quarantine: control characters escaped, length bounded."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
