"""gateway/kernel/paho_compat.py overrides and calls private parts of paho-mqtt: these tests fail, saying what
to do, when the installed paho is not a version the overrides were tested with, or when something they rely on
is gone or has changed shape. (The MQTT adapter's tests, tests/gateway/test_mqtt_adapter.py, check that the
overrides work.)"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway.kernel.paho_compat import TESTED_PAHO, BufferedPaho

HOW_TO_MOVE = (
    "gateway/kernel/paho_compat.py overrides paho's private methods; check each override (its module docstring"
    " lists them) against this paho's source, then move TESTED_PAHO there and the pin in pyproject.toml"
)

OVERRIDDEN = {
    "_sock_recv": ["self", "bufsize"],
    "_packet_read": ["self"],
    "_handle_on_message": ["self", "message"],
    "_ssl_wrap_socket": ["self", "tcp_sock"],
}
"""paho's private methods BufferedPaho replaces, with the parameters paho calls them with."""
CALLED = {
    "_packet_queue": ["self", "command", "packet", "mid", "qos"],
    "_call_socket_register_write": ["self"],
}
"""paho's private methods BufferedPaho calls, with the leading parameters it passes."""
ATTRIBUTES = (
    "_sock",
    "_ssl_context",
    "_host",
    "_connect_timeout",
    "_in_packet",
    "_protocol",
    "_manual_ack",
    "_last_bytes_received",
)
"""paho's private attributes BufferedPaho reads (or, for ``_last_bytes_received``, writes)."""
CALLERS = {
    "_packet_read": "self._sock_recv(",
    "_handle_publish": "self._handle_on_message(",
    "_create_socket": "self._ssl_wrap_socket(",
    "_check_keepalive": "self._last_bytes_received",
}
"""Where paho must still use what is overridden, or the override silently stops applying."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def test_the_installed_paho_is_a_tested_version() -> None:
    installed = version("paho-mqtt")
    low, high = TESTED_PAHO
    tested = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    assert low <= _version_tuple(installed) < high, (
        f"paho-mqtt {installed} is installed, but the gateway's paho overrides were tested with {tested} only."
        f" {HOW_TO_MOVE}."
    )


def test_the_pin_in_pyproject_is_the_tested_range() -> None:
    low, high = TESTED_PAHO
    pin = f'"paho-mqtt>={".".join(map(str, low))},<{".".join(map(str, high))}"'
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert pin in pyproject, f"pyproject.toml must pin {pin}, the range paho_compat.py was tested with"


@pytest.mark.parametrize(("method", "expected"), sorted([*OVERRIDDEN.items(), *CALLED.items()]))
def test_the_private_methods_relied_on_keep_their_signature(method: str, expected: list[str]) -> None:
    original = getattr(paho.Client, method, None)
    assert callable(original), f"paho.Client.{method} is gone. {HOW_TO_MOVE}."
    params = list(inspect.signature(original).parameters)
    assert params[: len(expected)] == expected, (
        f"paho.Client.{method} now takes {params}, not {expected}. {HOW_TO_MOVE}."
    )
    if method in OVERRIDDEN:
        # Anything after the expected parameters must be optional, or paho's calls no longer match ours.
        rest = list(inspect.signature(original).parameters.values())[len(expected) :]
        assert all(p.default is not inspect.Parameter.empty for p in rest), (
            f"paho.Client.{method} now takes {params}. {HOW_TO_MOVE}."
        )
        ours = list(inspect.signature(getattr(BufferedPaho, method)).parameters)
        assert ours[: len(expected)] == expected


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_the_private_attributes_relied_on_exist(protocol: MQTTProtocolVersion) -> None:
    client = BufferedPaho(CallbackAPIVersion.VERSION2, client_id="compat", protocol=protocol, manual_ack=True)
    missing = [name for name in ATTRIBUTES if not hasattr(client, name)]
    assert not missing, f"paho.Client no longer sets {missing}. {HOW_TO_MOVE}."
    assert "command" in client._in_packet, f"paho's _in_packet has no 'command' any more. {HOW_TO_MOVE}."
    assert client._manual_ack is True
    assert client._protocol == protocol


@pytest.mark.parametrize(("caller", "call"), sorted(CALLERS.items()))
def test_paho_still_goes_through_what_is_overridden(caller: str, call: str) -> None:
    source = inspect.getsource(getattr(paho.Client, caller))
    assert call in source, (
        f"paho.Client.{caller} no longer uses {call.rstrip('(')}: the override would silently stop applying."
        f" {HOW_TO_MOVE}."
    )
