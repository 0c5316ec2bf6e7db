"""The HQ topic layout (documented in README, "Topics at HQ").

<prefix>/<store_id>/<gateway_id>/events   batches of events, QoS 1, not retained
<prefix>/<store_id>/<gateway_id>/status   retained gateway status: online/offline (birth and last will)
<prefix>/<store_id>/<gateway_id>/commands HQ -> gateway commands, QoS 1 (docs/OUTBOX.md)
<prefix>/<store_id>/<gateway_id>/responses gateway -> HQ command responses, QoS 1
"""

from __future__ import annotations


def events_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/events"


def status_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/status"


def commands_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/commands"


def responses_topic(prefix: str, store_id: str, gateway_id: str) -> str:
    return f"{prefix}/{store_id}/{gateway_id}/responses"


def events_subscription(prefix: str, share_group: str | None = None) -> str:
    """What an HQ receiver subscribes to: every store's and gateway's batches; with ``share_group``, an MQTT
    shared subscription, so the receivers of one group split the messages between them."""
    topic = f"{prefix}/+/+/events"
    return topic if share_group is None else f"$share/{share_group}/{topic}"


def parse_events_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(store_id, gateway_id) from an events topic, or None if the topic is not one."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 3 or parts[2] != "events" or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]
