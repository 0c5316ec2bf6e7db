"""Prometheus metrics of one gateway process (served at /metrics by the local API).

Every drop, rejection and eviction has a counter here: nothing is lost silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LOGGER = logging.getLogger(__name__)

MAX_RULE_LABELS: Final = 1000
"""Distinct rule ids ``storegw_alerts`` labels (more are counted as ``other``)."""


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter(
            "storegw_messages_received", "Device messages received, by driver.", ["driver"], registry=r
        )
        self.committed = Counter(
            "storegw_events_committed", "Events committed to the journal, by kind.", ["kind"], registry=r
        )
        self.duplicates = Counter(
            "storegw_messages_duplicate",
            "Device messages already committed (redelivery), acked and skipped.",
            ["driver"],
            registry=r,
        )
        self.quarantined = Counter(
            "storegw_messages_quarantined",
            "Messages rejected and quarantined, by reason code.",
            ["driver", "reason"],
            registry=r,
        )
        self.processor_errors = Counter(
            "storegw_processor_errors",
            "Failures of a pipeline processor (the stock ledger, the rule engine); the events still committed.",
            ["processor"],
            registry=r,
        )
        self.dropped = Counter(
            "storegw_messages_dropped",
            "Messages dropped without being stored, by reason.",
            ["driver", "reason"],
            registry=r,
        )
        self.commits = Histogram(
            "storegw_journal_commit_seconds",
            "Duration of one group commit.",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
        )
        self.device_events = Counter(
            "storegw_device_events",
            "Events committed, by device and kind (the config's devices: a bounded set).",
            ["device", "kind"],
            registry=r,
        )
        self.alerts = Counter(
            "storegw_alerts",
            "Alert events committed, by rule id and what happened (raised, cleared, escalated, acknowledged).",
            ["rule_id", "event"],
            registry=r,
        )
        self.notifications = Counter(
            "storegw_notifications",
            "Chat notifications whose outcome is committed, by channel and outcome (sent, failed).",
            ["channel", "outcome"],
            registry=r,
        )
        self.downlink_connected = Gauge(
            "storegw_downlink_connected", "1 while subscribed to HQ's commands.", registry=r
        )
        self._rule_ids: set[str] = set()
        self.last_seq = Gauge("storegw_journal_last_seq", "Highest committed seq.", registry=r)
        self.delivered_seq = Gauge(
            "storegw_uplink_delivered_seq", "Every seq up to this one is acked by HQ.", registry=r
        )
        self.uplink_batches = Counter("storegw_uplink_batches", "Batches acknowledged by HQ.", registry=r)
        self.uplink_events = Counter("storegw_uplink_events", "Events acknowledged by HQ.", registry=r)
        self.uplink_connected = Gauge(
            "storegw_uplink_connected", "1 while connected to the HQ broker.", registry=r
        )
        self.driver_connected = Gauge(
            "storegw_driver_connected", "1 while a driver is connected to its peer.", ["driver"], registry=r
        )
        self.stock_unknown_sku = Counter(
            "storegw_stock_unknown_sku",
            "Sale or return lines for SKUs the ledger had no level for.",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "storegw_outbox_pending", "Events waiting for HQ, by class.", ["class"], registry=r
        )
        self.outbox_bytes = Gauge(
            "storegw_outbox_bytes", "Event bytes on disk (delivered or not), by class.", ["class"], registry=r
        )
        self.outbox_evicted = Counter(
            "storegw_outbox_evicted",
            "Undelivered events evicted (disk budget, class budget, TTL) or refused (disk_low), reported to HQ.",
            ["class", "reason"],
            registry=r,
        )
        self.outbox_pruned = Counter(
            "storegw_outbox_pruned",
            "Delivered events removed to stay within budgets (no loss).",
            ["class"],
            registry=r,
        )
        self.outbox_refused = Counter(
            "storegw_outbox_refused", "Telemetry refused because the disk is low.", registry=r
        )
        self.disk_free = Gauge(
            "storegw_disk_free_bytes", "Free bytes on the journal's filesystem.", registry=r
        )
        self.uplink_bytes = Counter(
            "storegw_uplink_bytes", "Batch bytes sent to HQ (on the wire).", registry=r
        )
        self.commands = Counter(
            "storegw_commands",
            "HQ commands handled, by command and status.",
            ["command", "status"],
            registry=r,
        )

    def count_outcomes(self, bodies: Sequence[bytes]) -> None:
        """Count the committed alerts (by rule id) and notification outcomes (by channel) among these envelopes."""
        for body in bodies:
            try:
                envelope = orjson.loads(body)
                kind, data = envelope["kind"], envelope["data"]
                if kind.startswith("alert."):
                    alert_id = data.get("alert_id") or data.get("details", {}).get("alert_id")
                    rule = str(alert_id).partition("/")[0] if alert_id else str(data.get("rule", ""))
                    self.alerts.labels(self._rule_label(rule), kind.removeprefix("alert.")).inc()
                elif kind in ("notification.sent", "notification.failed"):
                    self.notifications.labels(data["channel"], kind.removeprefix("notification.")).inc()
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue  # not ours to judge: the event is committed; it is only not counted

    def _rule_label(self, rule_id: str) -> str:
        """Rule ids come from the config and HQ; an acknowledgement may name any: at most MAX_RULE_LABELS."""
        if rule_id in self._rule_ids:
            return rule_id
        if len(self._rule_ids) >= MAX_RULE_LABELS:
            return "other"
        self._rule_ids.add(rule_id)
        return rule_id


class Scraped(Collector):
    """Metrics worked out when Prometheus scrapes (a read of the journal, counters another part keeps)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:  # a scrape must not fail for one of these: the others are still served
            _LOGGER.exception("metrics: a scraped metric failed")
            return ()
