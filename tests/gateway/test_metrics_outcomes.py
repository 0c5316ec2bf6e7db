"""The metrics counted from committed envelopes: alerts by rule id, notification outcomes by channel; a body that
is not an alert or a notification (or not JSON) is left alone; the rule-id labels are bounded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.kernel import metrics as metrics_module
from gateway.kernel.metrics import Metrics


def body(kind: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"kind": kind, "data": data})


def value(m: Metrics, name: str, labels: dict[str, str]) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_alerts_and_notifications_are_counted_by_rule_and_channel() -> None:
    m = Metrics()
    m.count_outcomes(
        [
            body("alert.raised", {"rule": "temperature", "details": {"alert_id": "dairy-warm/fridge-1/1"}}),
            body("alert.cleared", {"rule": "temperature", "alert_id": "dairy-warm/fridge-1/1"}),
            body("alert.acknowledged", {"alert_id": "dairy-warm/fridge-1/1", "note": "moved"}),
            body("alert.raised", {"rule": "gateway.processor_failed", "details": {}}),
            body("notification.sent", {"alert_id": "dairy-warm/fridge-1/1", "channel": "manager"}),
            body("notification.failed", {"alert_id": "dairy-warm/fridge-1/1", "channel": "manager"}),
            body("pos.sale", {"receipt_no": "R-1"}),
            b"not json",
            body("notification.sent", {"alert_id": "x/y/1"}),  # no channel: not counted, nothing raised
        ]
    )
    assert value(m, "storegw_alerts_total", {"rule_id": "dairy-warm", "event": "raised"}) == 1
    assert value(m, "storegw_alerts_total", {"rule_id": "dairy-warm", "event": "cleared"}) == 1
    assert value(m, "storegw_alerts_total", {"rule_id": "dairy-warm", "event": "acknowledged"}) == 1
    assert value(m, "storegw_alerts_total", {"rule_id": "gateway.processor_failed", "event": "raised"}) == 1
    assert value(m, "storegw_notifications_total", {"channel": "manager", "outcome": "sent"}) == 1
    assert value(m, "storegw_notifications_total", {"channel": "manager", "outcome": "failed"}) == 1


def test_rule_id_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_RULE_LABELS", 2)
    m = Metrics()
    m.count_outcomes([body("alert.acknowledged", {"alert_id": f"rule-{n}/s/1"}) for n in range(5)])
    assert value(m, "storegw_alerts_total", {"rule_id": "other", "event": "acknowledged"}) == 3
