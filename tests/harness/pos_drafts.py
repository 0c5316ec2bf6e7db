"""Journal drafts built the way the MQTT driver builds them: real POS JSON through the real decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson

from drivers.mqtt.config import MqttDriverConfig, TopicRoute
from drivers.mqtt.decode import Decoded, TopicRouter, decode_message
from gateway.kernel.journal import Draft

DRIVER = "store-mqtt"
ROUTER = TopicRouter(
    MqttDriverConfig(
        routes=[
            TopicRoute(pattern="store/pos/{device_id}/sale", kind="pos.sale"),
            TopicRoute(pattern="store/pos/{device_id}/return", kind="pos.return"),
        ],
        unknown_devices="accept",
    ),
    frozenset(),
)


def pos_draft(
    receipt: str,
    lines: Sequence[tuple[str, str]],
    *,
    kind: str = "sale",
    device: str = "pos1",
    occurred_at: str | None = None,
    ack: Callable[[], None] | None = None,
) -> Draft:
    """A sale (or return) of ``(sku, quantity)`` lines from register REG1 of ``device``."""
    body = {
        "receipt_no": receipt,
        "register_id": "REG1",
        "currency": "HKD",
        "lines": [{"sku": sku, "quantity": qty, "unit_price": "10"} for sku, qty in lines],
        "totals": {"subtotal": "10", "total": "10"},
        "occurred_at": occurred_at,
    }
    decoded = decode_message(ROUTER, f"store/pos/{device}/{kind}", orjson.dumps(body))
    assert isinstance(decoded, Decoded), decoded
    return decoded.to_draft(ack, DRIVER)
