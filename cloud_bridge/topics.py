"""The HQ topic layout (documented in README, "Topics at HQ").

<prefix>/<store_id>/<gateway_id>/events   batches of events, QoS 1, not retained
<prefix>/<store_id>/<gateway_id>/status   retained gateway status: online/offline (birth and last will)
"""

from __future__ import annotations


def events_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/events"


def status_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/status"


def events_subscription(prefix: str) -> str:
    """What an HQ receiver subscribes to: every store's and gateway's batches."""
    return f"{prefix}/+/+/events"


def parse_events_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(store_id, gateway_id) from an events topic, or None if the topic is not one."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 3 or parts[2] != "events" or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]
