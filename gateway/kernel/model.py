"""The one base model and the one id type: every config section, event payload and HQ document uses them."""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Store, gateway and device ids end up in MQTT topics: no '+', '#', '/', spaces or control characters."""

Identifier = Annotated[
    str, Field(pattern=ID_PATTERN, description="Letters, digits, '.', '_' or '-'; max 64.")
]
"""A store, gateway, device, driver or point id (:data:`ID_PATTERN`)."""


class StrictModel(BaseModel):
    """Unknown keys are errors, values are frozen, and NaN or infinity is never a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
