"""The generic webhook: the gateway's own ``pos.sale`` / ``pos.return`` JSON, for any cloud POS or relay.

The body is one JSON object: ``kind`` (``"pos.sale"`` or ``"pos.return"``), every field of
:class:`~gateway.kernel.events.PosSale` (returns: :class:`~gateway.kernel.events.PosReturn`),
and optionally ``occurred_at``
(ISO 8601 with offset). It is the MQTT till contract (firmware_configs/profiles/pos-terminal.yaml) plus
``kind``; the identity of a sale is its register and receipt number, as on MQTT.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, TypeAdapter, ValidationError

from drivers.errors import DecodeError
from drivers.http.mapped import Mapped, Outcome, printable, reject_duplicate_keys, summarise
from drivers.mqtt.decode import PosReturnMessage, PosSaleMessage
from gateway.kernel.events import PosReturn, PosSale


class GenericSale(PosSaleMessage):
    kind: Literal["pos.sale"] = Field(description="What the body is.")


class GenericReturn(PosReturnMessage):
    kind: Literal["pos.return"] = Field(description="What the body is.")


_ADAPTER: Final[TypeAdapter[GenericSale | GenericReturn]] = TypeAdapter(
    Annotated[GenericSale | GenericReturn, Field(discriminator="kind")]
)


def map_generic(raw: bytes) -> Outcome:
    """One generic webhook body -> one event."""
    reject_duplicate_keys(raw)
    try:
        message = _ADAPTER.validate_json(raw)  # JSON mode: the strict occurred_at takes an ISO 8601 string
    except ValidationError as err:
        first = err.errors(include_url=False)[0]["type"]
        raise DecodeError("not_json" if first == "json_invalid" else "invalid", summarise(err)) from err
    except (ValueError, TypeError, ArithmeticError) as err:  # pydantic can leak these for odd inputs
        raise DecodeError("invalid", printable(str(err))) from err
    payload_model = PosSale if isinstance(message, GenericSale) else PosReturn
    payload = payload_model.model_validate(message.model_dump(exclude={"kind", "occurred_at"}))
    occurred = message.occurred_at
    return [
        Mapped(
            kind=message.kind,
            data=payload,
            identity=message.receipt_no,
            occurred_at=None if occurred is None else occurred.isoformat(timespec="milliseconds"),
        )
    ]
