"""Downlink commands from HQ: parsing, validation and responses (docs/OUTBOX.md, "Downlink commands").

Pure code: bytes and a topic in, a typed :class:`Request` or a :class:`Refusal` out; and the response bytes.
The I/O (MQTT session, journal) is :mod:`cloud_bridge.downlink`. Nothing here raises on bad input: every
malformed command becomes a refusal with a code HQ can act on and a message that names the problem without
echoing the values (a roster carries staff names).

Every command must carry HQ's Ed25519 signature (:mod:`cloud_bridge.signing`) by one of the keys pinned in the
config, and be inside its validity (``issued_at`` .. ``not_after``); the topic alone is never trusted.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from cloud_bridge.documents import Planogram, Roster, RuleSet
from cloud_bridge.signing import (
    CLOCK_SKEW_S,
    MAX_VALIDITY_S,
    SIGNATURE_FIELDS,
    CanonicalError,
    decode_signature,
    signature_valid,
    signed_message,
)
from cloud_bridge.topics import commands_topic
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import Sku
from gateway.kernel.model import ID_PATTERN, StrictModel
from gateway.kernel.strict_json import duplicate_key

MAX_COMMAND_BYTES: Final = 256 * 1024
MAX_RESEND_SEQS: Final = 100_000
MAX_RESEND_RANGES: Final = 1000
"""Ranges in one ``resend`` command: a full disk's scattered holes fit a few commands, and one command still
costs the gateway a bounded number of journal reads."""
MAX_ERRORS_SHOWN: Final = 10

ErrorCode = Literal[
    "bad_json",
    "bad_request",
    "unknown_command",
    "invalid_args",
    "forbidden",
    "failed",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
]
Status = Literal["ok", "duplicate", "error"]

_REQUEST_ID: Final = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
_COMMAND_NAME: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""Only a name of this shape is echoed back in a response (an unknown one included)."""
_ENVELOPE_KEYS: Final = frozenset({"request_id", "command", "args", *SIGNATURE_FIELDS})
_TIME: Final = re.compile(r"^[0-9]{1,12}$")


class NoArgs(StrictModel):
    """``ping`` and ``config.get`` take no arguments."""


def _three_places(value: Decimal) -> Decimal:
    if value != value.quantize(Decimal("0.001")):
        raise ValueError("at most 3 decimal places (the stock ledger keeps 3)")
    return value


Adjustment = Annotated[
    Decimal, Field(ge=-(10**6), le=10**6, allow_inf_nan=False), AfterValidator(_three_places)
]


class StockAdjust(StrictModel):
    sku: Sku
    delta: Adjustment | None = Field(default=None, description="Units added (negative: removed).")
    set: Adjustment | None = Field(default=None, description="The counted on-hand (a stock-take).")
    reason: Literal["receiving", "transfer_in", "transfer_out", "stocktake", "correction"]
    note: Annotated[str, Field(max_length=500)] | None = None

    @model_validator(mode="after")
    def _delta_or_set(self) -> StockAdjust:
        if (self.delta is None) == (self.set is None):
            raise ValueError("give exactly one of delta and set")
        return self


SeqNumber = Annotated[int, Field(ge=1, le=2**63 - 1, strict=True)]
"""A seq in a command: a JSON integer (not true, "3" or 3.0)."""
SeqSpan = tuple[SeqNumber, SeqNumber]


class Resend(StrictModel):
    """Seqs HQ is missing: one range (``from_seq``/``to_seq``, the original form, which every gateway takes)
    or many (``ranges``: ``[[a, b], ...]``), so one command heals scattered holes (a full disk leaves
    hundreds) instead of one command per hole. Either way at most MAX_RESEND_RANGES ranges and
    MAX_RESEND_SEQS seqs in all: what one command can make the gateway read and send is bounded."""

    from_seq: SeqNumber | None = None
    to_seq: SeqNumber | None = None
    ranges: Annotated[list[SeqSpan], Field(min_length=1, max_length=MAX_RESEND_RANGES)] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Resend:
        single = self.from_seq is not None or self.to_seq is not None
        if single == (self.ranges is not None):
            raise ValueError("give either from_seq and to_seq, or ranges")
        if single and (self.from_seq is None or self.to_seq is None):
            raise ValueError("from_seq and to_seq go together")
        spans = self.spans
        if any(a > b for a, b in spans):
            raise ValueError("from_seq must not be above to_seq" if single else "each range is [first, last]")
        if sum(b - a + 1 for a, b in _merged(spans)) > MAX_RESEND_SEQS:
            raise ValueError(f"at most {MAX_RESEND_SEQS} seqs per resend")
        return self

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The ranges asked for, as given (one for the from_seq/to_seq form)."""
        if self.ranges is not None:
            return [(a, b) for a, b in self.ranges]
        if self.from_seq is None or self.to_seq is None:  # refused by _bounded
            return []
        return [(self.from_seq, self.to_seq)]

    @property
    def merged(self) -> list[tuple[int, int]]:
        """The ranges sorted, overlapping and adjacent ones joined: each seq is read and sent once."""
        return _merged(self.spans)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


class DeviceWrite(StrictModel):
    """Write one point of one device (a fridge setpoint, a defrost start); the device's profile says which
    points are writable and their range."""

    device_id: Annotated[str, Field(pattern=ID_PATTERN)]
    point: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
    value: StrictBool | StrictInt | StrictFloat = Field(
        allow_inf_nan=False,
        description="In the point's engineering units: a JSON number; true or false for a boolean point"
        ' (never "5"). The profile (and the device config) say which type and range a point takes.',
    )


class AlertAck(StrictModel):
    """Acknowledge an open alert of the store's rules (docs/RULES.md): the note is the corrective action."""

    alert_id: Annotated[str, Field(min_length=1, max_length=200)]
    note: Annotated[str, Field(max_length=1000)] = ""
    role: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")] = "hq"


Args = NoArgs | StockAdjust | Roster | Planogram | RuleSet | Resend | DeviceWrite | AlertAck

ARGS: Final[dict[str, type[Args]]] = {
    "ping": NoArgs,
    "config.get": NoArgs,
    "stock.adjust": StockAdjust,
    "roster.set": Roster,
    "planogram.set": Planogram,
    "rules.set": RuleSet,
    "resend": Resend,
    "device.write": DeviceWrite,
    "alert.ack": AlertAck,
}
COMMANDS: Final = tuple(ARGS)


class CommandError(StoreGatewayError):
    """A valid command that could not be carried out; answered with ``code`` and this message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def command_key(request_id: str) -> str:
    """The journal dedup key of the event a state-changing command commits: it applies once per request id."""
    return f"cmd:{request_id}"


Outcome = tuple[Status, Any]
"""A carried-out command's status and result (the response's ``result``)."""


@dataclass(frozen=True, slots=True)
class Handler:
    """What carries out one command on the gateway. The downlink dispatches to these; each domain registers
    its own (the stock ledger ``stock.adjust``, the documents ``*.set``, the devices ``device.write``)."""

    run: Callable[[Request], Awaitable[Outcome]]
    """Carry the command out; raise :class:`CommandError` for a refusal (``invalid_args``, ``failed``)."""
    record_first: bool = False
    """Put the request id on the command record before running: for a command that commits nothing to the
    journal (a device write), the record is the only thing that stops a replay."""


@dataclass(frozen=True, slots=True)
class Request:
    """A command that passed every check: from HQ's own topic, signed by a pinned key, within its validity,
    well formed, with valid args."""

    request_id: str
    command: str
    args: Args
    key_id: str = ""
    issued_at: int = 0
    not_after: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command that is answered with an error and changes nothing."""

    request_id: str | None
    command: str | None
    code: ErrorCode
    message: str


def authorised(topic: str, prefix: str, store_id: str, gateway_id: str) -> bool:
    """Only this gateway's own command topic: a command for another store or gateway is never obeyed, whatever
    route it took here (a stale persistent subscription, a broker ACL mistake)."""
    return topic == commands_topic(prefix, store_id, gateway_id)


@dataclass(frozen=True, slots=True)
class Trust:
    """What a command is checked against: HQ's pinned public keys (key id -> key) and the gateway's idea of
    the time. ``now`` is the synchronised wall clock, or when it is not synchronised the latest time the
    gateway can vouch for (None: none yet, so expiry cannot be judged); ``synced`` says which, since only a
    synchronised clock can call a command future-dated."""

    keys: Mapping[str, Ed25519PublicKey]
    now: float | None
    synced: bool
    scopes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Key id -> the commands it may sign; a key not listed may sign every command."""


def parse_command(
    payload: bytes, topic: str, prefix: str, store_id: str, gateway_id: str, trust: Trust
) -> Request | Refusal:
    """Check a command in the order that lets the most useful answer go back: size, JSON (no duplicate keys),
    envelope, topic, command name, signature, validity, args. The request id and command are read as early as
    possible, so a refusal carries them when they are readable (null otherwise). Args are validated only once
    the signature holds: nothing unauthenticated reaches the validators."""
    allowed = authorised(topic, prefix, store_id, gateway_id)
    if len(payload) > MAX_COMMAND_BYTES:
        code: ErrorCode = "bad_request" if allowed else "forbidden"
        return Refusal(None, None, code, f"command is {len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
    try:
        body = orjson.loads(payload)
        twice = duplicate_key(payload)
    except (orjson.JSONDecodeError, ValueError) as err:
        return Refusal(None, None, "bad_json" if allowed else "forbidden", f"not JSON: {str(err)[:200]}")
    except RecursionError:
        return Refusal(None, None, "bad_json" if allowed else "forbidden", "nested too deeply")
    if twice is not None:
        return Refusal(None, None, "bad_json" if allowed else "forbidden", f"duplicate key {twice!r}")
    if not isinstance(body, dict):
        return Refusal(None, None, "bad_request" if allowed else "forbidden", "a command is a JSON object")
    raw_id, raw_command = body.get("request_id"), body.get("command")
    request_id = raw_id if isinstance(raw_id, str) and _REQUEST_ID.fullmatch(raw_id) else None
    command = raw_command if isinstance(raw_command, str) and _COMMAND_NAME.fullmatch(raw_command) else None
    if not allowed:
        return Refusal(
            request_id, command, "forbidden", "commands are accepted only on this gateway's own topic"
        )
    if request_id is None:
        return Refusal(None, command, "bad_request", "request_id must be a string of 1-64 characters")
    if not isinstance(raw_command, str):
        return Refusal(request_id, None, "bad_request", "command must be a string")
    if command not in ARGS:
        return Refusal(request_id, command, "unknown_command", f"known commands: {', '.join(COMMANDS)}")
    extra = sorted(str(k)[:64] for k in body.keys() - _ENVELOPE_KEYS)
    if extra:
        return Refusal(request_id, command, "bad_request", f"unknown field(s): {', '.join(extra[:5])}")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return Refusal(request_id, command, "invalid_args", "args must be a JSON object")
    checked = check_signature(body, args, topic, request_id, command, trust)
    if isinstance(checked, Refusal):
        return checked
    key_id, issued_at, not_after = checked
    try:
        parsed = ARGS[command].model_validate(args)
    except ValidationError as err:
        return Refusal(request_id, command, "invalid_args", describe(err))
    except RecursionError:  # args nested deeper than any validator walks (orjson parses up to 1024 levels)
        return Refusal(request_id, command, "invalid_args", "args are nested too deeply")
    beyond = writes_beyond_scope(parsed, key_id, trust)
    if beyond:
        return Refusal(
            request_id,
            command,
            "forbidden",
            f"key {key_id!r} may not sign device.write (hq.command_keys[].commands), and these rules'"
            f" modbus_write actions write devices: {', '.join(beyond[:5])}",
        )
    return Request(request_id, command, parsed, key_id, issued_at, not_after)


def writes_beyond_scope(args: Args, key_id: str, trust: Trust) -> list[str]:
    """The ``rule/action`` ids of a ``rules.set``'s ``modbus_write`` actions when its key may not sign
    ``device.write``: a rule's write is a device write, so it needs the same grant (empty: nothing beyond)."""
    scope = trust.scopes.get(key_id)
    if scope is None or "device.write" in scope or not isinstance(args, RuleSet):
        return []
    return [
        f"{rule.id}/{action.id}"
        for rule in args.engine_rules
        for action in rule.actions
        if action.type == "modbus_write"
    ]


def _unix_seconds(value: Any) -> int | None:
    """A JSON integer of Unix seconds (not true, "5" or 5.0), or None."""
    if isinstance(value, int) and not isinstance(value, bool) and _TIME.fullmatch(str(value)):
        return value
    return None


def check_signature(
    body: Mapping[str, Any], args: Any, topic: str, request_id: str, command: str, trust: Trust
) -> tuple[str, int, int] | Refusal:
    """(key id, issued_at, not_after) of a command signed by a pinned key and valid now, or the refusal.

    The times are checked only once the signature holds: a forged command learns nothing about the clock."""

    def refuse(code: ErrorCode, message: str) -> Refusal:
        return Refusal(request_id, command, code, message)

    if not trust.keys:
        return refuse(
            "forbidden", "this gateway has no HQ command keys (hq.command_keys): it obeys no command"
        )
    if all(body.get(f) is None for f in SIGNATURE_FIELDS):
        return refuse("unsigned", "commands must be signed by HQ (key_id, issued_at, not_after, signature)")
    key_id, signature = body.get("key_id"), body.get("signature")
    issued_at, not_after = _unix_seconds(body.get("issued_at")), _unix_seconds(body.get("not_after"))
    if not isinstance(key_id, str) or not _COMMAND_NAME.fullmatch(key_id):
        return refuse("bad_request", "key_id must be a key id string")
    if issued_at is None or not_after is None:
        return refuse("bad_request", "issued_at and not_after must be whole numbers of Unix seconds")
    if not 0 <= not_after - issued_at <= MAX_VALIDITY_S:
        return refuse("bad_request", f"not_after must be 0 to {MAX_VALIDITY_S} s after issued_at")
    key = trust.keys.get(key_id)
    if key is None:
        return refuse("unknown_key", f"key {key_id!r} is not one of this gateway's HQ command keys")
    raw = decode_signature(signature) if isinstance(signature, str) else None
    if raw is None:
        return refuse("bad_signature", "signature must be the base64 of a 64-byte Ed25519 signature")
    try:
        message = signed_message(topic, key_id, request_id, issued_at, not_after, command, args)
    except CanonicalError as err:
        return refuse("bad_request", f"args cannot be signed: {err}")
    if not signature_valid(key, raw, message):
        return refuse("bad_signature", f"the signature does not match this command and key {key_id!r}")
    scope = trust.scopes.get(key_id)
    if scope is not None and command not in scope:
        return refuse("forbidden", f"key {key_id!r} may not sign {command} (hq.command_keys[].commands)")
    if trust.now is not None and trust.now > not_after + CLOCK_SKEW_S:
        return refuse("expired", f"the command expired {int(trust.now - not_after)} s ago (not_after)")
    if trust.synced and trust.now is not None and issued_at > trust.now + CLOCK_SKEW_S:
        return refuse(
            "not_yet_valid", f"issued_at is {int(issued_at - trust.now)} s ahead of the gateway's clock"
        )
    return key_id, issued_at, not_after


def describe(err: ValidationError) -> str:
    """The validation errors as ``path: message``, without the offending values."""
    parts = []
    for e in err.errors(include_url=False, include_input=False, include_context=False)[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
    more = err.error_count() - MAX_ERRORS_SHOWN
    return "; ".join(parts)[:1000] + (f" (+{more} more)" if more > 0 else "")


def metric_command(command: str | None) -> str:
    """The ``command`` label of the commands metric: a known name, or 'other' (labels stay bounded)."""
    return command if command in ARGS else "other"


def build_response(
    *,
    request_id: str | None,
    command: str | None,
    status: Status,
    store_id: str,
    gateway_id: str,
    result: Any = None,
    error: tuple[ErrorCode, str] | None = None,
    at: datetime | None = None,
) -> bytes:
    """The response JSON (docs/OUTBOX.md): ``error`` is null unless ``status`` is 'error'."""
    stamp = (
        (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return orjson.dumps(
        {
            "request_id": request_id,
            "command": command,
            "status": status,
            "error": None if error is None else {"code": error[0], "message": error[1]},
            "result": result,
            "store_id": store_id,
            "gateway_id": gateway_id,
            "at": stamp,
        }
    )


def refusal_response(refusal: Refusal, store_id: str, gateway_id: str) -> bytes:
    return build_response(
        request_id=refusal.request_id,
        command=refusal.command,
        status="error",
        store_id=store_id,
        gateway_id=gateway_id,
        error=(refusal.code, refusal.message),
    )
