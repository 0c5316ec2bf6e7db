"""Threat: biometric data reaching the journal through the kiosk route, whatever the rejection path.

Seen live: a JPEG published to ``store/kiosk/<unknown id>/checkin``, ``store/kiosk/pos-01/checkin`` or
``store/kiosk/bad id!/checkin`` was quarantined byte for byte (unknown_device, wrong_profile, bad_device_id);
the internal_error path never redacted; unknown JSON keys were echoed into the quarantine detail, so a base64
image used as a key name was stored too. Redaction now follows the route before any device lookup, rejection
details on a redacted route quote nothing from the message, and one policy (gateway/kernel/biometrics.py) serves the
kiosk decoder and the roster.
"""

from __future__ import annotations

import base64
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from bench.mqtt_load import publish_all
from cloud_bridge.documents import Roster
from drivers.base import DecodeError
from drivers.mqtt.checkin import decode_checkin
from drivers.mqtt.config import MqttDriverConfig
from drivers.mqtt.decode import Rejection, RouteSpec, TopicRouter, decode_routed
from drivers.sink import QUOTA_ROWS
from gateway.config import GatewayConfig
from gateway.kernel import biometrics
from simulators.kiosk import Kiosk
from tests.harness.brokers import Mosquitto, free_port
from tests.harness.e2e_helpers import (
    journal_db,
    journal_kinds,
    metric_sum,
    own_metrics,
    poll_until,
    read_quarantine,
    running_gateway,
)

KIOSK = "store/kiosk/{device_id}/checkin"
TILL = "store/pos/{device_id}/sale"
IMAGE = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + random.Random(20240501).randbytes(600)
"""A JPEG-like blob: small enough (with its base64) to reach the kiosk decoder under the 2 KiB limit."""
B64 = base64.b64encode(IMAGE).decode()
STAFF = {"staff_id": "S-7", "name": "Chan Tai Man", "role": "cashier"}


def checkin(**changes: Any) -> dict[str, Any]:
    return {**Kiosk("kiosk-1", seed=5).next_body(), **changes}


def needles() -> Iterator[bytes]:
    """Distinctive pieces of the image in every form a bug could store it: raw 16-byte windows, and windows of
    its base64, hex and Python repr."""
    forms = [IMAGE, B64.encode(), IMAGE.hex().encode(), repr(IMAGE).encode()]
    for form in forms:
        for start in range(16, len(form) - 16, 61):
            yield form[start : start + 16]


# --- one policy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "face_template",
        "Photos",
        "selfie_jpeg",
        "retina_scan",
        "voiceprint",
        "palmprint",
        "img",
        "thumbnail",
        "b64",
    ],
)
def test_the_kiosk_and_the_roster_refuse_the_same_keys(key: str) -> None:
    with pytest.raises(DecodeError) as refused:
        decode_checkin(orjson.dumps(checkin(**{key: "x"})))
    assert refused.value.reason == "biometric_refused"
    with pytest.raises(ValidationError, match="biometric data is never stored"):
        Roster.model_validate({"staff": [{**STAFF, key: "x"}]})
    assert biometrics.biometric_marker(key) is not None


@pytest.mark.parametrize("value", [B64, f"data:image/jpeg;base64,{B64[:40]}", list(range(64))])
def test_the_kiosk_and_the_roster_refuse_the_same_values(value: object) -> None:
    with pytest.raises(DecodeError) as refused:
        decode_checkin(orjson.dumps(checkin(note=value)))
    assert refused.value.reason == "biometric_refused"
    with pytest.raises(ValidationError, match="biometric data is never stored") as roster:
        Roster.model_validate({"staff": [{**STAFF, "notes": value}]})
    assert B64[:16] not in str(roster.value)


def test_the_match_score_and_long_names_are_not_biometric() -> None:
    assert decode_checkin(orjson.dumps(checkin())).data.face_match_score >= 0
    long_name = " ".join(["Chan Tai Man"] * 15)[:199]
    assert Roster.model_validate({"staff": [{**STAFF, "name": long_name}]}).count == 1


@pytest.mark.parametrize(
    "body",
    [
        {B64: 1},  # the image as a key name
        {**checkin(), B64[:100]: 1},  # a key too short to look like a blob: an unknown field
        checkin(kiosk_time=B64[:40]),  # a bad time
        {**checkin(), "employee_id": "E1", "employee_id ": B64[:60]},  # unknown key with a space
    ],
)
def test_kiosk_details_quote_nothing_from_the_message(body: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as refused:
        decode_checkin(orjson.dumps(body))
    for needle in (B64[:16], B64[16:32], B64[40:56]):
        assert needle not in refused.value.detail


def test_a_duplicate_key_is_refused_without_its_name() -> None:
    payload = orjson.dumps(checkin()).replace(
        b'"employee_id"', b'"employee_id":"%s","employee_id"' % B64[:40].encode()
    )
    with pytest.raises(DecodeError) as refused:
        decode_checkin(payload)
    assert refused.value.reason == "duplicate_key"
    assert B64[:16] not in refused.value.detail


def _router() -> TopicRouter:
    config = MqttDriverConfig.model_validate(
        {"routes": [{"pattern": KIOSK, "profile": "checkin-kiosk"}, {"pattern": TILL, "kind": "pos.sale"}]}
    )
    return TopicRouter(config, {"kiosk-1": "checkin-kiosk", "pos-01": "pos-terminal"})


@pytest.mark.parametrize(
    ("topic", "reason", "redact"),
    [
        ("store/kiosk/kiosk-9/checkin", "unknown_device", True),
        ("store/kiosk/pos-01/checkin", "wrong_profile", True),
        ("store/kiosk/bad id!/checkin", "bad_device_id", True),
        ("store/kiosk//checkin", "unknown_topic", True),
        ("store/pos/kiosk-1/sale", "wrong_profile", True),  # a kiosk's device on a till route
        ("store/pos/pos-9/sale", "unknown_device", False),
        ("store/pos/bad id!/sale", "bad_device_id", False),
        ("store/pos//sale", "unknown_topic", False),
    ],
)
def test_redaction_is_decided_by_the_route_before_the_device(topic: str, reason: str, redact: bool) -> None:
    routed = _router().match(topic)
    assert isinstance(routed, Rejection)
    assert (routed.reason, routed.redact) == (reason, redact)
    if redact:
        assert "bad id" not in routed.detail


# --- end to end: every route shape, then grep every file --------------------------------------------------------


def config(tmp_path: Path, broker: Mosquitto) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway_id": "gw-bio",
            "store": {"id": "bio-store", "name": "Biometrics test store", "timezone": "Asia/Hong_Kong"},
            "data_dir": str(tmp_path / "data"),
            "store_broker": {"host": broker.host, "port": broker.port},
            "hq": {"host": "127.0.0.1", "port": free_port()},
            "drivers": [
                {
                    "type": "mqtt",
                    "name": "devices",
                    "routes": [
                        {"pattern": KIOSK, "profile": "checkin-kiosk"},
                        {"pattern": TILL, "kind": "pos.sale"},
                    ],
                }
            ],
            "devices": [
                {"id": "kiosk-1", "profile": "checkin-kiosk"},
                {"id": "kiosk-crash", "profile": "checkin-kiosk"},
                {"id": "pos-01", "profile": "pos_terminal"},
            ],
            "api": {"enabled": False},
            "log": {"level": "WARNING"},
        }
    )


def crashing_decoder(real: Any) -> Any:
    """The kiosk decoder with a bug for one device: it raises an exception that quotes the whole message (the
    worst an internal error can do), as a crash deep in a decoder or pydantic might."""

    def decode(spec: RouteSpec, device_id: str, payload: bytes) -> Any:
        if device_id == "kiosk-crash":
            raise ValueError(f"cannot decode {payload!r} ({base64.b64encode(payload).decode()})")
        return real(spec, device_id, payload)

    return decode


async def test_an_image_on_every_kiosk_route_shape_is_never_stored(
    store_broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("drivers.mqtt.driver.decode_routed", crashing_decoder(decode_routed))
    cfg = config(tmp_path, store_broker)
    kiosk = KIOSK.format
    as_value = orjson.dumps(checkin(note=B64))
    duplicate = orjson.dumps(checkin()).replace(
        b'"employee_id"', b'"employee_id":"%s","employee_id"' % B64[:40].encode()
    )
    shapes: list[tuple[str, bytes, str]] = [
        (kiosk(device_id="kiosk-1"), IMAGE, "biometric_refused"),
        (kiosk(device_id="kiosk-1"), as_value, "biometric_refused"),
        (kiosk(device_id="kiosk-1"), orjson.dumps({B64: 1}), "biometric_refused"),
        (kiosk(device_id="kiosk-1"), orjson.dumps({**checkin(), B64[:100]: 1}), "invalid"),
        (kiosk(device_id="kiosk-1"), orjson.dumps(checkin(kiosk_time=B64[:40])), "bad_time"),
        (kiosk(device_id="kiosk-1"), duplicate, "duplicate_key"),
        (kiosk(device_id="kiosk-1"), IMAGE * 4, "too_large"),
        (kiosk(device_id="kiosk-crash"), as_value, "internal_error"),
        (kiosk(device_id="kiosk-crash"), IMAGE, "internal_error"),
        (kiosk(device_id="kiosk-9"), IMAGE, "unknown_device"),
        (kiosk(device_id="kiosk-9"), as_value, "unknown_device"),
        (kiosk(device_id="pos-01"), IMAGE, "wrong_profile"),
        (kiosk(device_id="bad id!"), IMAGE, "bad_device_id"),
        (kiosk(device_id="x" * 70), IMAGE, "bad_device_id"),
        (kiosk(device_id=""), IMAGE, "unknown_topic"),
    ]
    # Over its route's quota: the summary row of unknown ids must be redacted too.
    spoofed = [(kiosk(device_id=f"kiosk-u{n}"), as_value, "unknown_device") for n in range(12)]
    good = (kiosk(device_id="kiosk-1"), orjson.dumps(checkin()))
    messages = [(t, p) for t, p, _ in shapes + spoofed] + [good]
    async with running_gateway(cfg) as gateway:
        _, _, acked = await publish_all(store_broker.host, store_broker.port, "bio", messages, window=20)
        assert acked == len(messages)
        await poll_until(
            lambda: metric_sum(own_metrics(gateway), "storegw_messages_received_total") >= len(messages),
            "every message at the gateway",
            within=30,
            state=gateway.health,
        )
        await gateway.journal.flush()
    assert journal_kinds(cfg.data_dir).get("staff.checkin") == 1  # good data still goes through

    rows = read_quarantine(cfg.data_dir)
    expected = Counter(r for _, _, r in shapes + spoofed)
    # Unknown and invalid ids share their route's quota: kiosk-9's two, the two bad ids and the twelve spoofed ones
    # are 16 messages, kept as QUOTA_ROWS rows and one summary row (the first six spoofed ones in the rows).
    shared = 2 + 2 + len(spoofed)
    expected["unknown_device"] -= shared - (QUOTA_ROWS + 1)
    assert Counter(r["reason"] for r in rows) == expected
    for row in rows:
        assert bytes(row["payload"]).startswith(b"<redacted"), row
        assert "bad id" not in (row["topic"] or ""), row
        assert "x" * 70 not in (row["topic"] or ""), row
    metrics = own_metrics(gateway)
    assert metric_sum(metrics, "storegw_messages_quarantined_total") == len(shapes) + len(spoofed)

    # Every file under the data directory, before and after a checkpoint folds the WAL into the database.
    assert _files_holding_the_image(cfg.data_dir) == []
    with sqlite3.connect(journal_db(cfg.data_dir)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert _files_holding_the_image(cfg.data_dir) == []


def _files_holding_the_image(data_dir: Path) -> list[tuple[str, bytes]]:
    found = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            content = path.read_bytes()
            found += [(path.name, n) for n in needles() if n in content]
    return found
