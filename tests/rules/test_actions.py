"""Rule actions with real peers: a real SQLite journal with the rule engine, the Modbus driver writing to a real
pymodbus server (the fridge simulator, counting the write requests it receives), and a real mosquitto for the
MQTT messages. No timed asserts: each step waits for the record it expects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from drivers.base import DriverContext
from drivers.devices import DeviceRegistry
from drivers.modbus.config import ModbusDriverConfig
from drivers.modbus.driver import ModbusDriver
from gateway.kernel.config import BrokerConfig
from gateway.kernel.consumer import run_consumer
from gateway.kernel.journal import Draft, Journal
from gateway.kernel.metrics import Metrics
from gateway.kernel.mqtt_client import Message, MqttClient
from gateway.kernel.rule_actions import MqttPublishAction
from gateway.kernel.rule_config import RuleDefinition
from rules.actions import ActionConsumer, Alert, BrokerPublisher, render_payload, render_topic
from rules.clock import RuleClock
from rules.engine import RuleEngine
from simulators.fridge import FridgeModel
from tests.drivers.test_modbus_driver import gateway_config, server_port, tcp_config
from tests.gateway.test_journal import new_journal, query, until
from tests.gateway.test_journal import running as journal_running
from tests.harness.brokers import Mosquitto, free_port
from tests.security.test_device_write import SLOW, CountingFridgeServer

RULES = TypeAdapter(list[RuleDefinition])


def rules(*actions: dict[str, Any]) -> list[RuleDefinition]:
    return RULES.validate_python(
        [
            {
                "id": "dairy-warm",
                "type": "temperature",
                "max_c": 8,
                "for_s": 0,
                "clear_for_s": 0,
                "select": {"devices": ["fridge-1"]},
                "actions": list(actions),
            }
        ]
    )


DEFROST = {
    "id": "defrost",
    "type": "modbus_write",
    "point": "defrost_start",
    "value": True,
    "interlock": [{"metric": "door_open", "eq": 0}],
}


def sample(temperature: float, door_open: float = 0.0) -> Draft:
    """A reading of fridge-1 as a controller's sample (its own poll says nothing of 'temperature')."""
    body = orjson.dumps(
        {"values": {"temperature": temperature, "door_open": door_open}, "units": {}, "source": "dixell-xr"}
    )
    return Draft("sensor.sample", "fridge-1", body, driver="modbus")


def door(open_: float) -> Draft:
    """The walk-in's door contact, a device of its own (the temperature rule ignores readings while fridge-1's
    own door_open is 1, so the interlock's door is another device here)."""
    body = orjson.dumps({"values": {"door_open": open_}, "units": {}, "source": "bthome.v2"})
    return Draft("sensor.sample", "door-9", body, driver="ble")


def records(journal: Journal) -> list[dict[str, Any]]:
    rows = query(journal, "SELECT kind, dedup_key, body FROM events WHERE kind LIKE 'action.%' ORDER BY seq")
    return [{"kind": kind, "key": key, **orjson.loads(body)["data"]} for kind, key, body in rows]


async def recorded(journal: Journal, count: int) -> list[dict[str, Any]]:
    await until(lambda: len(records(journal)) >= count, f"{count} action record(s)")
    return records(journal)


@pytest.fixture
async def server() -> AsyncIterator[CountingFridgeServer]:
    server = CountingFridgeServer([1], speed=0.0, models={1: FridgeModel(setpoint=4.0)})
    await server.start_tcp("127.0.0.1", free_port())
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def writing(journal: Journal, server: CountingFridgeServer) -> AsyncIterator[DriverContext]:
    """The Modbus driver on the journal, connected to the server (one poll at start, then none)."""
    ctx = DriverContext(journal, Metrics(), DeviceRegistry(journal.submit), gateway_config())
    device = {"id": "fridge-1", "unit": 1, "profile": "dixell-xr", "poll_intervals": SLOW}
    driver = ModbusDriver(ModbusDriverConfig.model_validate(tcp_config(server_port(server), [device])), ctx)
    task = asyncio.create_task(driver.run(), name="modbus-under-test")
    try:
        await until(lambda: bool(ctx.states.get("fridges") and ctx.states["fridges"].connected), "connected")
        yield ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def consuming(consumer: ActionConsumer, journal: Journal) -> AsyncIterator[ActionConsumer]:
    task = asyncio.create_task(run_consumer(journal, consumer), name=consumer.name)
    try:
        async with asyncio.timeout(20):  # a consumer new to the journal starts at its last seq: let it start
            while await journal.cursor(consumer.name) is None:  # noqa: ASYNC110 - set on another task
                await asyncio.sleep(0.005)
        yield consumer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_interlock_holds_a_write_back_and_a_write_runs_once_per_episode_across_a_restart(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    defrost = {**DEFROST, "interlock": [{"device": "door-9", "metric": "door_open", "eq": 0}]}
    engine = RuleEngine(rules(defrost), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        async with consuming(consumer, journal):
            journal.submit(door(1))
            journal.submit(sample(9.0))  # warm while the walk-in's door is open: no defrost
            [held] = await recorded(journal, 1)
            assert (held["kind"], held["reason"]) == ("action.failed", "interlock")
            assert held["error"] == "door-9 door_open is 1 (must be eq 0)"
            assert held["key"] == "action:dairy-warm/fridge-1/1:raised:defrost"
            assert server.writes_received == 0
            assert not server.models[1].defrosting

            journal.submit(sample(5.0))  # clears episode 1
            journal.submit(door(0))
            journal.submit(sample(10.0))  # episode 2, the door shut
            done = (await recorded(journal, 2))[1]
        assert (done["kind"], done["alert_id"], done["level"]) == (
            "action.done",
            "dairy-warm/fridge-1/2",
            "raised",
        )
        assert (done["device_id"], done["point"], done["value"], done["source"]) == (
            "fridge-1",
            "defrost_start",
            True,
            "rule",
        )
        await until(lambda: server.models[1].defrosting, "the write started a defrost")
        assert server.writes_received == 1

        # A crash before the cursor moved: the same alerts are handed over again; nothing runs twice.
        events, _ = await journal.events_after(0, consumer.kinds, 100)
        await consumer.handle(events)
    assert server.writes_received == 1

    # A restart: a new journal object on the same file, a new engine and consumer from the start of the log.
    engine = RuleEngine(rules(defrost), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        again = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        events, _ = await journal.events_after(0, again.kinds, 100)
        assert [e.kind for e in events] == ["alert.raised", "alert.cleared", "alert.raised"]
        await again.handle(events)
    assert server.writes_received == 1
    assert len(records(journal)) == 2


async def test_a_failing_write_is_recorded_as_failed_and_not_retried(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    too_warm = {**DEFROST, "id": "setpoint", "point": "setpoint", "value": 40}
    engine = RuleEngine(rules(DEFROST, too_warm), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        server.muted.add(1)  # the controller stops answering
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        async with consuming(consumer, journal):
            journal.submit(sample(9.0))
            unreachable, refused = await recorded(journal, 2)
    assert (unreachable["kind"], unreachable["action"], unreachable["reason"]) == (
        "action.failed",
        "defrost",
        "unreachable",
    )
    # The write's own timeout, or (when the driver's polls of the muted unit failed first) the connection given up
    # on after several unanswered requests: unreachable either way.
    assert "no response" in unreachable["error"] or "requests in a row" in unreachable["error"]
    assert (refused["kind"], refused["action"], refused["reason"]) == ("action.failed", "setpoint", "refused")
    assert "outside" in refused["error"]
    assert server.writes_received == 1  # the defrost's one attempt; the refused one never reached the wire


def group_sample(values: dict[str, float]) -> Draft:
    """One poll group's sample of fridge-1, as the Modbus driver sends a controller's readings: dixell-xr's
    ``alarms`` group (status bits: the door, the defrost) apart from its ``temperatures`` group."""
    body = orjson.dumps({"values": values, "units": {}, "source": "dixell-xr"})
    return Draft("sensor.sample", "fridge-1", body, driver="modbus")


ALARMS = {"compressor_on": 1.0, "defrost_active": 0.0, "fan_on": 1.0, "door_open": 0.0}


async def test_the_interlock_reads_each_metric_from_the_newest_sample_that_holds_it(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    """The door and the fan are in the alarms group's sample, the warm temperature in the newer temperatures
    group's: the interlock finds them in the older one, and the newest alarms sample is the one that counts."""
    defrost = {**DEFROST, "interlock": [{"metric": "door_open", "eq": 0}, {"metric": "fan_on", "eq": 1}]}
    engine = RuleEngine(rules(defrost), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        async with consuming(consumer, journal):
            journal.submit(group_sample({**ALARMS, "fan_on": 0.0}))
            journal.submit(group_sample({**ALARMS, "fan_on": 1.0}))  # the fan runs since
            journal.submit(group_sample({"temperature": 9.0, "evaporator_temperature": -5.0}))
            [done] = await recorded(journal, 1)
            assert (done["kind"], done["action"]) == ("action.done", "defrost")
            await until(lambda: server.models[1].defrosting, "the write started a defrost")

            journal.submit(group_sample({"temperature": 5.0}))  # clears
            journal.submit(group_sample({**ALARMS, "fan_on": 0.0}))  # the fan stops
            journal.submit(group_sample({"temperature": 9.5}))  # episode 2
            held = (await recorded(journal, 2))[1]
    assert (held["kind"], held["reason"]) == ("action.failed", "interlock")
    assert held["error"] == "fridge-1 fan_on is 0 (must be eq 1)"
    assert server.writes_received == 1


async def test_fresh_samples_without_the_metric_hold_the_write_back(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    """The driver's own poll at start sent every group's sample: none holds a metric the profile lacks."""
    defrost = {**DEFROST, "interlock": [{"metric": "door_open", "eq": 0}, {"metric": "probe_ok", "eq": 1}]}
    engine = RuleEngine(rules(defrost), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        async with consuming(consumer, journal):
            journal.submit(group_sample({"temperature": 9.0}))
            [held] = await recorded(journal, 1)
    assert (held["reason"], held["error"]) == ("interlock", "fridge-1 did not report probe_ok (must be eq 1)")
    assert server.writes_received == 0


async def test_no_reading_since_the_start_holds_the_write_back(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    """The interlock reads only this run's samples: a device that has not reported since does not count."""
    engine = RuleEngine(
        rules({**DEFROST, "interlock": [{"device": "door-9", "metric": "door_open", "eq": 0}]}),
        RuleClock(lambda: True),
    )
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        async with consuming(consumer, journal):
            journal.submit(sample(9.0))
            [held] = await recorded(journal, 1)
    assert (held["reason"], held["error"]) == ("interlock", "no reading of door-9 in the last 300 s")
    assert server.writes_received == 0


async def test_a_raised_write_found_after_its_clear_does_not_run(
    tmp_path: Path, server: CountingFridgeServer
) -> None:
    engine = RuleEngine(rules(DEFROST), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), writing(journal, server) as ctx:
        journal.submit(sample(9.0))
        journal.submit(sample(5.0))
        await until(
            lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='alert.cleared'")), "cleared"
        )
        consumer = ActionConsumer("modbus_write", engine, journal, writers=ctx.device_writers)
        events, _ = await journal.events_after(0, consumer.kinds, 100)
        await consumer.handle(events)  # catching up after the alert already cleared
    [ended] = records(journal)
    assert (ended["kind"], ended["reason"]) == ("action.failed", "alert_ended")
    assert server.writes_received == 0


class Listener:
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    def on_message(self, message: Message) -> None:
        self.got.put_nowait((message.topic, bytes(message.payload), bool(message.retain)))

    async def next(self) -> tuple[str, bytes, bool]:
        async with asyncio.timeout(20):
            return await self.got.get()


async def test_a_buzzer_gets_its_messages_once_each_even_after_the_broker_was_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(persistence=True).start()  # the buzzer's session outlives the outage
    buzzer = {
        "id": "buzzer",
        "type": "mqtt_publish",
        "on": ["raised", "cleared"],
        "topic": "store/buzzer/{device_id}/set",
        "payload": '{"on": true, "alert": "{alert_id}", "why": "{message}"}',
        "payload_cleared": '{"on": false, "alert": "{alert_id}"}',
    }
    engine = RuleEngine(rules(buzzer), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    listener = Listener()
    client = MqttClient(BrokerConfig(port=broker.port), "buzzer-under-test", clean_start=False)
    client.on_message = listener.on_message
    publisher = BrokerPublisher(BrokerConfig(port=broker.port), "hk-0042-gw-1-actions")
    try:
        await client.connect()
        await client.subscribe([("store/buzzer/#", 1)])
        async with journal_running(journal):
            consumer = ActionConsumer(
                "mqtt_publish", engine, journal, publisher=publisher, store_id="hk-0042"
            )
            consumer.retry_base_s = 0.05
            async with consuming(consumer, journal):
                journal.submit(sample(9.0))
                topic, payload, _ = await listener.next()
                assert topic == "store/buzzer/fridge-1/set"
                message = orjson.loads(payload)
                assert message["on"] is True
                assert message["alert"] == "dairy-warm/fridge-1/1"
                assert "above 8 °C" in message["why"]
                await recorded(journal, 1)

                await client.disconnect()
                broker.stop()  # the store broker goes away: the clear waits for it
                journal.submit(sample(5.0))
                await until(
                    lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='alert.cleared'")), "cleared"
                )
                await until(lambda: "publishing failed" in caplog.text, "the clear waits for the broker")
                broker.start()
                client = MqttClient(BrokerConfig(port=broker.port), "buzzer-under-test", clean_start=False)
                client.on_message = listener.on_message
                await client.connect()
                await client.subscribe([("store/buzzer/#", 1)])
                topic, payload, _ = await listener.next()
                assert orjson.loads(payload) == {"on": False, "alert": "dairy-warm/fridge-1/1"}
                done = await recorded(journal, 2)
            events, _ = await journal.events_after(0, consumer.kinds, 100)
            await consumer.handle(events)  # handed over again (a crash before the cursor moved): nothing sent
    finally:
        await publisher.close()
        await client.disconnect()
        broker.close()
    assert listener.got.empty()
    assert [(d["kind"], d["level"], d["topic"]) for d in done] == [
        ("action.done", "raised", "store/buzzer/fridge-1/set"),
        ("action.done", "cleared", "store/buzzer/fridge-1/set"),
    ]
    assert done[1]["attempts"] > 1


async def test_a_topic_the_broker_refuses_is_failed_once_and_the_next_action_still_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL denial is the broker's answer (MQTT 5 PUBACK 0x87), the same on every try: recorded as failed
    (``refused``) and never retried, so the actions after it are not held up."""
    acl = tmp_path / "acl"
    acl.write_text("topic write store/ok/#\ntopic read store/#\n")
    broker = Mosquitto(extra_conf=f"acl_file {acl}\n").start()
    denied = {"id": "a-denied", "type": "mqtt_publish", "topic": "store/denied/{device_id}"}
    allowed = {"id": "b-ok", "type": "mqtt_publish", "topic": "store/ok/{device_id}", "payload": "{level}"}
    engine = RuleEngine(rules(denied, allowed), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    listener = Listener()
    client = MqttClient(BrokerConfig(port=broker.port), "listener", clean_start=True)
    client.on_message = listener.on_message
    publisher = BrokerPublisher(BrokerConfig(port=broker.port), "gw-actions")
    try:
        await client.connect()
        await client.subscribe([("store/#", 1)])
        async with journal_running(journal):
            consumer = ActionConsumer("mqtt_publish", engine, journal, publisher=publisher)
            consumer.retry_base_s = 0.01
            async with consuming(consumer, journal):
                journal.submit(sample(9.0))
                assert await listener.next() == ("store/ok/fridge-1", b"raised", False)
                refused, done = await recorded(journal, 2)
    finally:
        await publisher.close()
        await client.disconnect()
        broker.close()
    assert (refused["kind"], refused["action"], refused["reason"]) == ("action.failed", "a-denied", "refused")
    assert (refused["topic"], refused["attempts"]) == ("store/denied/fridge-1", 1)
    assert "Not authorized" in refused["error"]
    assert (done["kind"], done["action"]) == ("action.done", "b-ok")
    assert "publishing failed" not in caplog.text
    assert listener.got.empty()


@pytest.mark.parametrize("char", ["\u0085", "\u009f", "\ufdd0", "\ufffe", "\uffff", "\U0001ffff"])
async def test_a_value_that_brings_a_character_brokers_refuse_fails_the_action_as_invalid(
    tmp_path: Path, char: str
) -> None:
    """mosquitto drops a connection whose topic holds such a character (a malformed packet): the topic is
    refused before it is sent, and recorded as failed (``invalid``), never retried."""
    assert render_topic("store/display/{subject}", {"subject": f"needs_review:E1{char}"}) is None
    display = {"id": "display", "type": "mqtt_publish", "topic": "store/display/{subject}"}
    broker = Mosquitto().start()
    publisher = BrokerPublisher(BrokerConfig(port=broker.port), "gw-actions")
    engine = RuleEngine(rules(display), RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    try:
        async with journal_running(journal):
            consumer = ActionConsumer("mqtt_publish", engine, journal, publisher=publisher)
            alert = Alert(f"x/E1{char}/1", "raised", "dairy-warm", f"E1{char}", 1, None, "warning", "m")
            [action] = engine.rules["dairy-warm"].actions
            assert isinstance(action, MqttPublishAction)
            outcome = await consumer._publish(action, alert)
    finally:
        await publisher.close()
        broker.close()
    assert (outcome.reason, outcome.attempts) == ("invalid", 0)


def test_topics_stay_within_what_mqtt_and_the_event_allow() -> None:
    assert render_topic("store/{subject}", {"subject": "é" * 125}) == "store/" + "é" * 125
    assert render_topic("store/{subject}", {"subject": "é" * 126}) is None  # 258 bytes of UTF-8
    assert render_topic("store/{subject}", {"subject": "\u00a0\ufdf0\ufffd"}) is not None
    assert render_topic("store/{subject}", {"subject": "\ud800"}) is None  # a lone surrogate


def test_templates_never_make_a_wildcard_topic_and_payloads_stay_json() -> None:
    values = {"alert_id": "stock.low/A+B/1", "subject": "A#B", "message": 'say "hi"\n', "device_id": ""}
    assert render_topic("store/{subject}/set", values) is None
    assert render_topic("store/x/{alert_id}", values) is None
    assert render_topic("store/{device_id}", values) is None  # an empty last level
    assert render_topic("store/display/set", values) == "store/display/set"
    assert orjson.loads(render_payload('{"m": "{message}", "x": "{unknown}"}', values)) == {
        "m": 'say "hi"\n',
        "x": "{unknown}",
    }


@pytest.mark.parametrize(
    ("action", "words"),
    [
        ({"id": "a", "type": "mqtt_publish", "topic": "store/#"}, "String should match pattern"),
        ({"id": "a", "type": "mqtt_publish", "topic": "store/{nope}"}, "unknown placeholder(s) nope"),
        ({"id": "a", "type": "mqtt_publish", "topic": "/store"}, "no leading or trailing '/'"),
        ({**DEFROST, "value": "5"}, "value"),
        (
            {"id": "a", "type": "modbus_write", "point": "setpoint", "value": 5},
            "a modbus_write needs at least one condition",
        ),
        ({**DEFROST, "interlock": []}, "interlock: [{metric: door_open, eq: 0}]"),
        (
            {**DEFROST, "interlock": [{"metric": "door_open", "eq": 0, "lt": 1}]},
            "give exactly one of eq, ne, lt, le, gt, ge",
        ),
        ({**DEFROST, "on": ["raised", "raised"]}, "a level is named twice"),
    ],
)
def test_bad_actions_are_config_errors(action: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        rules(action)
    assert words in str(info.value)


def test_action_ids_are_unique_within_a_rule_and_changing_actions_keeps_the_rules_state() -> None:
    with pytest.raises(ValidationError, match="ids must be unique within the rule: defrost"):
        rules(DEFROST, DEFROST)
    assert rules()[0].fingerprint() == rules(DEFROST)[0].fingerprint()


def test_a_write_to_a_device_no_modbus_driver_has_is_a_config_error() -> None:
    from gateway.config import GatewayConfig

    base = gateway_config().model_dump(mode="json", exclude_defaults=True)
    fridges = tcp_config(1502, [{"id": "fridge-1", "unit": 1, "profile": "dixell-xr"}])
    rule = {"id": "warm", "type": "temperature", "max_c": 8, "actions": [{**DEFROST, "device": "fridge-2"}]}
    with pytest.raises(
        ValidationError, match="action defrost: 'fridge-2' is not a device of a modbus driver"
    ):
        GatewayConfig.model_validate({**base, "drivers": [fridges], "rules": [rule]})
    config = GatewayConfig.model_validate(
        {**base, "drivers": [fridges], "rules": [{**rule, "actions": [{**DEFROST, "device": "fridge-1"}]}]}
    )
    assert config.rules[0].actions[0].id == "defrost"


def test_broker_provision_lets_the_gateway_publish_on_its_actions_topics_only() -> None:
    """What is known at provisioning is filled in (the rule id, the store id, each of a rule's select.devices);
    only a level with a value known when the alert is raised is granted as '+'."""
    from gateway.broker_accounts import accounts, acl_text
    from gateway.config import GatewayConfig

    base = gateway_config().model_dump(mode="json", exclude_defaults=True)
    store = base["store"]["id"]
    buzzer = {"id": "buzzer", "type": "mqtt_publish", "topic": "store/buzzer/{device_id}/set"}
    display = {"id": "display", "type": "mqtt_publish", "topic": "store/display-{rule_id}"}
    board = {"id": "board", "type": "mqtt_publish", "topic": "{store_id}/board/{subject}/{level}"}
    config = GatewayConfig.model_validate(
        {
            **base,
            "store_broker": {"host": "127.0.0.1", "port": 1883, "username": "gateway"},
            "rules": [
                {
                    "id": "warm",
                    "type": "temperature",
                    "max_c": 8,
                    "select": {"devices": ["fridge-1", "fridge-2"]},
                    "actions": [buzzer, display, board],
                },
                {"id": "quiet", "type": "silent", "actions": [buzzer]},  # every device: its level is '+'
            ],
        }
    )
    gateway = accounts(config)[0]
    assert gateway.write == (
        "store/buzzer/fridge-1/set",
        "store/buzzer/fridge-2/set",
        "store/display-warm",
        f"{store}/board/+/+",
        "store/buzzer/+/set",
    )
    assert "user gateway\ntopic write store/buzzer/fridge-1/set\ntopic write store/buzzer/fridge-2/set\n" in (
        acl_text([gateway], "t")
    )


async def test_the_gateway_runs_a_rules_actions(tmp_path: Path, server: CountingFridgeServer) -> None:
    """The runtime wires both consumers: the store broker's message and the write through the Modbus driver."""
    from gateway.config_loader import load_config
    from tests.harness.e2e_helpers import running_gateway

    broker = Mosquitto().start()
    listener = Listener()
    client = MqttClient(BrokerConfig(port=broker.port), "buzzer-under-test", clean_start=True)
    client.on_message = listener.on_message
    path = tmp_path / "store.yaml"
    path.write_text(
        "gateway_id: gw-01\n"
        "store: {id: hk-001, name: Shop}\n"
        f"store_broker: {{host: 127.0.0.1, port: {broker.port}}}\n"
        "hq: {host: 127.0.0.1, port: 1}\n"  # no HQ: the gateway goes on without it
        f"data_dir: {tmp_path / 'data'}\n"
        "api: {enabled: false}\n"
        "drivers:\n"
        f"  - {{type: modbus, name: fridges, transport: tcp, host: 127.0.0.1, port: {server_port(server)},"
        " timeout_s: 0.3, devices: [{id: fridge-1, unit: 1, profile: dixell-xr,"
        " poll_intervals: {temperatures: 3600, alarms: 3600, parameters: 3600}}]}\n"
        "rules:\n"
        "  - id: warm\n"
        "    type: temperature\n"
        "    max_c: 8\n"
        "    for_s: 0\n"
        "    actions:\n"
        "      - {id: buzzer, type: mqtt_publish, topic: 'store/buzzer/{device_id}', payload: '{level}'}\n"
        "      - {id: defrost, type: modbus_write, point: defrost_start, value: true,"
        " interlock: [{metric: door_open, eq: 0}]}\n",
        encoding="utf-8",
    )
    try:
        await client.connect()
        await client.subscribe([("store/buzzer/#", 1)])
        async with running_gateway(load_config(path, env={}), wait_drivers=False) as gateway:
            journal = gateway.journal
            for name in ("actions-mqtt_publish", "actions-modbus_write"):
                async with asyncio.timeout(20):
                    while await journal.cursor(name) is None:  # noqa: ASYNC110 - set on another task
                        await asyncio.sleep(0.01)
            journal.submit(sample(9.0))
            assert await listener.next() == ("store/buzzer/fridge-1", b"raised", False)
            await until(lambda: server.models[1].defrosting, "the defrost started")
            done = await recorded(journal, 2)
    finally:
        await client.disconnect()
        broker.close()
    assert sorted((d["kind"], d["action"]) for d in done) == [
        ("action.done", "buzzer"),
        ("action.done", "defrost"),
    ]
    assert server.writes_received == 1
