"""Downlink command parsing, validation and responses (cloud_bridge/commands.py): pure, no I/O.

The command and response shapes are those of docs/OUTBOX.md, "Downlink commands".
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_bridge.commands import (
    COMMANDS,
    MAX_COMMAND_BYTES,
    MAX_RESEND_SEQS,
    NoArgs,
    Refusal,
    Request,
    Resend,
    StockAdjust,
    Trust,
    authorised,
    build_response,
    metric_command,
    parse_command,
    refusal_response,
)
from cloud_bridge.documents import Planogram, Roster, RuleSet, biometric_keys
from cloud_bridge.topics import commands_topic
from tests.harness.e2e_helpers import HQ_KEY, HQ_KEY_ID, sign_command

PREFIX, STORE, GW = "retail", "hk-001", "gw-1"
OWN = commands_topic(PREFIX, STORE, GW)


TRUST = Trust({HQ_KEY_ID: HQ_KEY.public_key()}, None, False)
"""HQ's test key; no clock (validity is tested in tests/security/test_signed_commands.py)."""


def parse(body: Any, topic: str = OWN) -> Request | Refusal:
    """Parse a command, signed for ``topic`` with HQ's test key when it can be (malformed ones as they are)."""
    payload = body if isinstance(body, bytes) else orjson.dumps(sign_command(topic, body))
    return parse_command(
        payload, topic, PREFIX, STORE, GW, dataclasses.replace(TRUST, now=time.time(), synced=True)
    )


def command(name: str, args: Any = None, request_id: str = "r-1") -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": request_id, "command": name}
    if args is not None:
        body["args"] = args
    return body


def refused(body: Any, code: str, topic: str = OWN) -> Refusal:
    result = parse(body, topic)
    assert isinstance(result, Refusal), result
    assert result.code == code, result
    return result


def accepted(body: Any) -> Request:
    result = parse(body)
    assert isinstance(result, Request), result
    return result


STAFF = {
    "staff_id": "S-7",
    "name": "Chan Tai Man",
    "role": "cashier",
    "shifts": [{"start": "2026-11-23T09:00:00+08:00", "end": "2026-11-23T17:00:00+08:00"}],
}

# --- the example of docs/OUTBOX.md and every command ----------------------------------------------------


def test_the_contract_example_parses() -> None:
    req = accepted(
        command("stock.adjust", {"sku": "SKU-1", "delta": 24, "reason": "receiving"}, request_id="r-123")
    )
    assert (req.request_id, req.command) == ("r-123", "stock.adjust")
    assert req.args == StockAdjust(sku="SKU-1", delta=Decimal(24), reason="receiving")


@pytest.mark.parametrize("name", ["ping", "config.get"])
def test_commands_without_args_take_none_null_or_empty(name: str) -> None:
    for args in (None, {}):
        assert accepted(command(name, args)).args == NoArgs()
    assert accepted({"request_id": "r-1", "command": name, "args": None}).args == NoArgs()
    refused(command(name, {"verbose": True}), "invalid_args")


def test_every_command_has_a_valid_example() -> None:
    examples = {
        "ping": None,
        "config.get": None,
        "stock.adjust": {"sku": "TEA", "set": "12.5", "reason": "stocktake", "note": "aisle 3"},
        "roster.set": {"staff": [STAFF]},
        "planogram.set": {"shelves": [{"shelf_id": "A1", "sku": "TEA", "facings": 3, "min_on_shelf": 4}]},
        "rules.set": {
            "rules": [
                {"id": "low-default", "type": "stock.low", "sku": None, "threshold": 5},
                {"id": "low-tea", "type": "stock.low", "sku": "TEA", "threshold": 2.5},
            ]
        },
        "resend": {"from_seq": 10, "to_seq": 20},
        "device.write": {"device_id": "fridge-1", "point": "setpoint", "value": -2.5},
        "alert.ack": {
            "alert_id": "dairy-warm/fridge-1/3",
            "note": "milk moved to the walk-in",
            "role": "manager",
        },
    }
    assert set(examples) == set(COMMANDS)
    for name, args in examples.items():
        assert accepted(command(name, args)).command == name
    rules = accepted(command("rules.set", examples["rules.set"])).args
    assert isinstance(rules, RuleSet)
    assert (rules.default_threshold, rules.sku_thresholds) == (5, {"TEA": 2.5})


@pytest.mark.parametrize(
    "args",
    [
        {"device_id": "fridge-1", "point": "setpoint"},
        {"device_id": "fridge/1", "point": "setpoint", "value": 1},
        {"device_id": "fridge-1", "point": "Setpoint", "value": 1},
        {"device_id": "fridge-1", "point": "setpoint", "value": "cold"},
        {"device_id": "fridge-1", "point": "setpoint", "value": "5"},
        {"device_id": "fridge-1", "point": "setpoint", "value": None},
        {"device_id": "fridge-1", "point": "setpoint", "value": [5]},
        {"device_id": "fridge-1", "point": "setpoint", "value": 1, "unit": "C"},
    ],
)
def test_bad_device_write_args(args: dict[str, Any]) -> None:
    refused(command("device.write", args), "invalid_args")


# --- envelope errors ------------------------------------------------------------------------------------


def test_malformed_json_is_bad_json_with_a_null_request_id() -> None:
    r = refused(b'{"request_id": "r-1", "command": "ping"', "bad_json")
    assert (r.request_id, r.command) == (None, None)
    refused(b"\xff\xfe not utf-8", "bad_json")
    refused(b"", "bad_json")


@pytest.mark.parametrize("body", [[1, 2], "ping", 3, None])
def test_a_command_is_a_json_object(body: Any) -> None:
    assert refused(body, "bad_request").request_id is None


@pytest.mark.parametrize("request_id", [None, 7, "", "x" * 65, "tab\there", ["r-1"]])
def test_an_unreadable_request_id_is_answered_with_null(request_id: Any) -> None:
    body: dict[str, Any] = {"command": "ping"}
    if request_id is not None:
        body["request_id"] = request_id
    r = refused(body, "bad_request")
    assert (r.request_id, r.command) == (None, "ping")


def test_missing_or_unknown_commands() -> None:
    assert refused({"request_id": "r-1"}, "bad_request").request_id == "r-1"
    r = refused(command("reboot"), "unknown_command")
    assert (r.request_id, r.command) == ("r-1", "reboot")
    assert "ping" in r.message
    # A name that is not a plain identifier is not echoed back.
    assert refused(command("rm -rf /\x00"), "unknown_command").command is None


def test_unknown_envelope_fields_are_refused() -> None:
    r = refused({**command("ping"), "arg": {}}, "bad_request")
    assert "arg" in r.message


def test_args_must_be_an_object() -> None:
    refused(command("stock.adjust", [1, 2]), "invalid_args")


def test_size_limit() -> None:
    base = orjson.dumps(sign_command(OWN, command("ping")))
    assert isinstance(parse(base + b" " * (MAX_COMMAND_BYTES - len(base))), Request)
    r = refused(base + b" " * (MAX_COMMAND_BYTES - len(base) + 1), "bad_request")
    assert r.request_id is None
    assert str(MAX_COMMAND_BYTES) in r.message


# --- authorisation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "retail/hk-002/gw-1/commands",
        "retail/hk-001/gw-2/commands",
        "retail/hk-001/gw-1/commands/",
        "retail/hk-001/gw-1/responses",
        "retail/+/gw-1/commands",
        "retail/hk-001/#",
        "other/hk-001/gw-1/commands",
        "/retail/hk-001/gw-1/commands",
        "retail/hk-001/gw-1/commands/extra",
        "RETAIL/hk-001/gw-1/commands",
        "",
    ],
)
def test_only_the_own_command_topic_is_obeyed(topic: str) -> None:
    assert not authorised(topic, PREFIX, STORE, GW)
    r = refused(
        command("stock.adjust", {"sku": "TEA", "delta": 1, "reason": "receiving"}), "forbidden", topic
    )
    assert (r.request_id, r.command) == ("r-1", "stock.adjust")  # readable: HQ can tell which one


def test_forbidden_wins_over_every_other_error() -> None:
    other = "retail/hk-002/gw-1/commands"
    for body in (b"{not json", b"[]", b" " * (MAX_COMMAND_BYTES + 1), orjson.dumps(command("reboot"))):
        refused(body, "forbidden", other)


@settings(deadline=None)
@given(st.text(max_size=80))
def test_any_other_topic_is_forbidden(topic: str) -> None:
    assert authorised(topic, PREFIX, STORE, GW) == (topic == OWN)


# --- args ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        {"sku": "TEA", "reason": "receiving"},
        {"sku": "TEA", "delta": 1, "set": 5, "reason": "receiving"},
        {"sku": "TEA", "delta": "0.0001", "reason": "receiving"},
        {"sku": "TEA", "delta": 10**7, "reason": "receiving"},
        {"sku": "TEA", "delta": "NaN", "reason": "receiving"},
        {"sku": "TEA", "delta": 1, "reason": "theft"},
        {"sku": "", "delta": 1, "reason": "receiving"},
        {"sku": "T E A", "delta": 1, "reason": "receiving"},
        {"sku": "TEA", "delta": 1, "reason": "receiving", "note": "x" * 501},
        {"sku": "TEA", "delta": 1, "reason": "receiving", "request_id": "r-9"},
    ],
)
def test_bad_stock_adjust_args(args: dict[str, Any]) -> None:
    refused(command("stock.adjust", args), "invalid_args")


def test_stock_adjust_decimals() -> None:
    args = accepted(command("stock.adjust", {"sku": "RICE", "delta": "-0.250", "reason": "correction"})).args
    assert isinstance(args, StockAdjust)
    assert args.delta == Decimal("-0.25")
    assert args.set is None


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        ({"from_seq": 1, "to_seq": 1}, True),
        ({"from_seq": 5, "to_seq": 5 + MAX_RESEND_SEQS - 1}, True),
        ({"from_seq": 5, "to_seq": 5 + MAX_RESEND_SEQS}, False),
        ({"from_seq": 9, "to_seq": 8}, False),
        ({"from_seq": 0, "to_seq": 8}, False),
        ({"from_seq": 1}, False),
        ({"from_seq": "1", "to_seq": True, "x": 1}, False),
    ],
)
def test_resend_bounds(args: dict[str, Any], ok: bool) -> None:
    result = parse(command("resend", args))
    if ok:
        assert isinstance(result, Request)
        assert isinstance(result.args, Resend)
    else:
        assert isinstance(result, Refusal)
        assert result.code == "invalid_args"


@given(st.integers(min_value=-5, max_value=2 * MAX_RESEND_SEQS), st.integers(min_value=-5, max_value=10**6))
@settings(max_examples=200, deadline=None)
def test_resend_accepts_exactly_the_bounded_ranges(start: int, span: int) -> None:
    args = {"from_seq": start, "to_seq": start + span}
    ok = start >= 1 and 0 <= span < MAX_RESEND_SEQS
    assert isinstance(parse(command("resend", args)), Request) == ok


@pytest.mark.parametrize(
    "field",
    ["face_template", "face", "embedding", "photo", "fingerprint", "FaceID", "photo_url", "biometricHash"],
)
def test_a_roster_with_biometric_data_is_refused_whole(field: str) -> None:
    staff = [STAFF, {**STAFF, "staff_id": "S-8", field: "AAECAwQFBgc="}]
    r = refused(command("roster.set", {"staff": staff}), "invalid_args")
    assert "biometric data is never stored" in r.message
    assert f"staff[1].{field}" in r.message
    assert "AAECAwQFBgc" not in r.message


def test_biometric_keys_are_found_at_any_depth() -> None:
    data = {"staff": [{"shifts": [{"start": "x", "face_embedding": [1, 2]}]}], "Photos": []}
    assert biometric_keys(data) == ["staff[0].shifts[0].face_embedding", "Photos"]
    assert biometric_keys({"staff": [STAFF]}) == []


def test_roster_validation_names_the_field_but_never_echoes_values() -> None:
    staff = [{**STAFF, "name": "Secret Name\x01"}, STAFF]
    r = refused(command("roster.set", {"staff": staff}), "invalid_args")
    assert "staff.0.name" in r.message
    assert "Secret" not in r.message
    assert (
        "duplicate staff_id"
        in refused(command("roster.set", {"staff": [STAFF, STAFF]}), "invalid_args").message
    )


@pytest.mark.parametrize(
    "shift",
    [
        {"start": "2026-11-23T09:00:00", "end": "2026-11-23T17:00:00"},  # no UTC offset: ambiguous
        {"start": "2026-11-23T17:00:00Z", "end": "2026-11-23T09:00:00Z"},
        {"start": "2026-11-23T09:00:00Z", "end": "2026-11-24T09:00:01Z"},
    ],
)
def test_bad_shifts(shift: dict[str, str]) -> None:
    refused(command("roster.set", {"staff": [{**STAFF, "shifts": [shift]}]}), "invalid_args")


def test_planogram_validation() -> None:
    shelf = {"shelf_id": "A1", "sku": "TEA", "facings": 3, "min_on_shelf": 4}
    assert isinstance(accepted(command("planogram.set", {"shelves": [shelf]})).args, Planogram)
    refused(command("planogram.set", {"shelves": [shelf, shelf]}), "invalid_args")
    refused(command("planogram.set", {"shelves": [{**shelf, "facings": 0}]}), "invalid_args")
    refused(command("planogram.set", {"shelves": [{**shelf, "colour": "red"}]}), "invalid_args")


@pytest.mark.parametrize(
    "rules",
    [
        [{"id": "a", "type": "stock.high", "sku": "TEA", "threshold": 1}],
        [{"id": "a", "type": "stock.low", "sku": "TEA", "threshold": -1}],
        [{"id": "a", "type": "stock.low", "sku": "TEA", "threshold": "lots"}],
        [{"id": "a", "type": "stock.low", "sku": "TEA"}],
        [{"id": "a", "type": "stock.low", "threshold": 1}, {"id": "b", "type": "stock.low", "threshold": 2}],
        [
            {"id": "a", "type": "stock.low", "sku": "T", "threshold": 1},
            {"id": "a", "type": "stock.low", "threshold": 2},
        ],
        [
            {"id": "a", "type": "stock.low", "sku": "T", "threshold": 1},
            {"id": "b", "type": "stock.low", "sku": "T", "threshold": 2},
        ],
        [{"id": "a", "type": "stock.low", "threshold": 1, "severity": "high"}],
    ],
)
def test_bad_rules_are_refused(rules: list[dict[str, Any]]) -> None:
    refused(command("rules.set", {"rules": rules}), "invalid_args")


def test_an_empty_rule_set_is_valid() -> None:
    args = accepted(command("rules.set", {"rules": []})).args
    assert isinstance(args, RuleSet)
    assert (args.default_threshold, args.sku_thresholds, args.count) == (None, {}, 0)


def test_roster_count() -> None:
    args = accepted(command("roster.set", {"staff": [STAFF]})).args
    assert isinstance(args, Roster)
    assert args.count == 1


# --- responses ------------------------------------------------------------------------------------------


def test_response_shape() -> None:
    at = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    raw = build_response(
        request_id="r-123",
        command="stock.adjust",
        status="ok",
        store_id=STORE,
        gateway_id=GW,
        result={"seq": 41, "on_hand": "36"},
        at=at,
    )
    assert orjson.loads(raw) == {
        "request_id": "r-123",
        "command": "stock.adjust",
        "status": "ok",
        "error": None,
        "result": {"seq": 41, "on_hand": "36"},
        "store_id": STORE,
        "gateway_id": GW,
        "at": "2026-11-22T10:00:00.000Z",
    }
    error = orjson.loads(refusal_response(Refusal(None, None, "bad_json", "not JSON"), STORE, GW))
    assert (error["status"], error["error"], error["request_id"], error["result"]) == (
        "error",
        {"code": "bad_json", "message": "not JSON"},
        None,
        None,
    )
    assert error["at"].endswith("Z")


def test_metric_labels_stay_bounded() -> None:
    assert metric_command("ping") == "ping"
    assert metric_command("reboot") == "other"
    assert metric_command(None) == "other"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
ENVELOPES = st.fixed_dictionaries(
    {"request_id": st.text(max_size=70) | JSON, "command": st.sampled_from(COMMANDS) | st.text(max_size=20)},
    optional={
        "args": JSON | st.dictionaries(st.sampled_from(["sku", "delta", "set", "staff", "rules"]), JSON)
    },
)


def _signed(body: dict[str, Any]) -> bytes:
    """Half the envelopes signed (so args reach the validators), the other half as they are."""
    try:
        return orjson.dumps(sign_command(OWN, body) if len(str(body)) % 2 else body)
    except ValueError:  # args with no canonical form (an integer beyond 2^53)
        return orjson.dumps(body)


@given(st.binary(max_size=300) | ENVELOPES.map(_signed), st.sampled_from([OWN, "retail/x/gw-1/commands"]))
@settings(max_examples=200, deadline=None)
def test_any_input_gets_a_well_formed_answer(payload: bytes, topic: str) -> None:
    result = parse_command(payload, topic, PREFIX, STORE, GW, TRUST)
    if isinstance(result, Request):
        assert topic == OWN
        return
    response = orjson.loads(refusal_response(result, STORE, GW))
    assert response["status"] == "error"
    assert response["error"]["code"] in (
        "bad_json",
        "bad_request",
        "unknown_command",
        "invalid_args",
        "forbidden",
        "unsigned",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
    )
    assert response["request_id"] is None or isinstance(response["request_id"], str)
    if topic != OWN:
        assert response["error"]["code"] == "forbidden"


@pytest.mark.parametrize("depth", [100, 900])
def test_deeply_nested_args_are_refused_not_raised(depth: int) -> None:
    inner = '{"face":' * depth + "null" + "}" * depth
    payload = (
        '{"request_id":"r1","command":"roster.set","args":{"staff":[{"staff_id":"a","name":"b","role":"c",'
        f'"x":{inner}}}]}}}}'
    ).encode()
    refusal = parse_command(payload, "retail/hk-001/gw-1/commands", "retail", "hk-001", "gw-1", TRUST)
    assert isinstance(refusal, Refusal)
    # Unsigned, so the args never reach a validator; at 900 levels the duplicate-key check gives up first.
    assert refusal.code in ("unsigned", "bad_json")
