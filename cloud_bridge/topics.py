"""The HQ topic layout (documented in README, "Topics at HQ").

<prefix>/<store_id>/<gateway_id>/events   batches of events, QoS 1, not retained
<prefix>/<store_id>/<gateway_id>/status   retained gateway status: online/offline (birth and last will)
<prefix>/<store_id>/<gateway_id>/commands HQ -> gateway commands, QoS 1 (docs/OUTBOX.md)
<prefix>/<store_id>/<gateway_id>/responses gateway -> HQ command responses, QoS 1
"""

from __future__ import annotations

from collections.abc import Sequence


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


def events_subscriptions(
    prefix: str, share_group: str | None = None, stores: Sequence[str] | None = None
) -> list[str]:
    """What an HQ receiver subscribes to: every store's batches, or with ``stores`` only those stores'
    (``<prefix>/<store>/+/events`` each), so receivers with plain subscriptions split the stores between
    them; with ``share_group``, each as a shared subscription."""
    if not stores:
        return [events_subscription(prefix, share_group)]
    topics = [f"{prefix}/{store}/+/events" for store in dict.fromkeys(stores)]
    return topics if share_group is None else [f"$share/{share_group}/{t}" for t in topics]


def parse_events_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(store_id, gateway_id) from an events topic, or None if the topic is not one."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 3 or parts[2] != "events" or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]
