"""The rule engine on a real SQLite file, with the rules' clock moved by the test: alerts raise once per episode,
clear with hysteresis, ignore defrost and door readings, keep their timers across a restart, and start afresh
when their rule changes."""

from __future__ import annotations

from typing import Any

from gateway.kernel.events import AlertCleared, AlertRaised
from tests.rules.conftest import Time

WARM = {
    "id": "dairy-warm",
    "type": "temperature",
    "max_c": 8,
    "for_s": 600,
    "clear_below_c": 6,
    "clear_for_s": 300,
}


def test_too_warm_for_long_enough_raises_once_and_recovery_clears_once(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(599)
    rig.sample(temperature=9.5)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    rig.tick()
    [raised] = rig.alerts
    assert isinstance(raised, AlertRaised)
    assert (raised.rule, raised.subject, raised.severity) == ("temperature", "fridge-1", "warning")
    assert raised.details["alert_id"] == "dairy-warm/fridge-1/1"
    assert raised.details["first"] == {"seq": 1, "value": 9.0}
    assert raised.details["max_c"] == 9.5
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"
    rig.sample(temperature=7.0)  # in the hysteresis band: still an excursion
    time.advance(400)
    rig.tick()
    rig.sample(temperature=5.0)
    time.advance(299)
    rig.tick()
    assert len(rig.alerts) == 1
    time.advance(1)
    rig.tick()
    cleared = rig.alerts[1]
    assert isinstance(cleared, AlertCleared)
    assert (cleared.alert_id, cleared.reason) == ("dairy-warm/fridge-1/1", "recovered")
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    assert rig.alerts[2].details["alert_id"] == "dairy-warm/fridge-1/2"  # the next episode


def test_a_reading_back_in_range_before_the_duration_raises_nothing(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(500)
    rig.sample(temperature=7.9)
    time.advance(500)
    rig.tick()
    assert rig.alerts == []


def test_defrost_door_and_faulty_readings_count_for_nothing(rig_at: Any, time: Time) -> None:
    rig = rig_at([{**WARM, "post_defrost_grace_s": 900, "door_grace_s": 120}])
    rig.sample(temperature=12.0, defrost_active=1)
    time.advance(800)
    rig.sample(temperature=11.0, defrost_active=0)  # within the grace after the defrost
    time.advance(800)
    rig.tick()
    assert rig.alerts == []
    rig.sample(temperature=10.0, door_open=1)
    time.advance(60)
    rig.sample(temperature=10.0, door_open=0)  # within the door's grace
    rig.sample(humidity=40.0)  # no temperature: a fault is not in range either
    time.advance(700)
    rig.tick()
    assert rig.alerts == []


def test_a_timer_survives_a_restart_and_counts_the_time_away(rig_at: Any, time: Time) -> None:
    """Waiting 10 min above 8 °C, restarted at minute 6 after 2 min away: fires at minute 10, not 16."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(240)
    rig.tick()  # the rules' clock saved at minute 4
    time.advance(120)  # running until minute 6, unsaved
    rig.conn.close()
    time.advance(120)  # away for 2 min: a reboot; the monotonic clock of the new boot starts elsewhere
    time.mono = 5.0
    time.boot = "boot-2"
    rig2 = rig_at([WARM])
    rig2.tick()
    assert rig2.alerts == []
    time.advance(119)
    rig2.tick()
    assert rig2.alerts == []
    time.advance(1)
    rig2.tick()
    assert rig2.kinds() == [("raised", "fridge-1")]


def test_overdue_at_start_fires_once_with_the_time_it_was_due(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    rig.tick()
    rig.conn.close()
    time.advance(3600)  # down for an hour
    rig2 = rig_at([WARM])
    rig2.tick()
    rig2.tick()
    [raised] = rig2.alerts
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"


def test_an_open_alert_is_not_raised_again_after_a_restart_and_still_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    rig.conn.close()
    rig2 = rig_at([WARM])
    rig2.sample(temperature=9.0)
    time.advance(600)
    rig2.tick()
    assert rig2.alerts == []
    rig2.sample(temperature=5.0)
    time.advance(300)
    rig2.tick()
    assert rig2.kinds() == [("cleared", "fridge-1")]


def test_a_changed_rule_clears_its_open_alerts_and_an_unchanged_one_keeps_them(
    rig_at: Any, time: Time
) -> None:
    other = {
        **WARM,
        "id": "freezer-warm",
        "max_c": -15,
        "clear_below_c": -17,
        "select": {"devices": ["freezer-1"]},
    }
    rig = rig_at([WARM, other])
    rig.sample(temperature=9.0)
    rig.sample(device="freezer-1", temperature=-10.0)
    time.advance(600)
    rig.tick()
    assert sorted(rig.kinds()) == [("raised", "freezer-1"), ("raised", "fridge-1")]
    rig.conn.close()
    rig2 = rig_at([{**WARM, "max_c": 9}, other])
    rig2.tick()
    [cleared] = rig2.alerts
    assert isinstance(cleared, AlertCleared)
    assert (cleared.alert_id, cleared.reason) == ("dairy-warm/fridge-1/1", "rule_changed")
    rig2.sample(device="freezer-1", temperature=-20.0)
    time.advance(300)
    rig2.tick()
    assert rig2.kinds()[1:] == [("cleared", "freezer-1")]  # the unchanged rule kept its alert and timers


def test_a_silent_device_raises_and_its_next_reading_clears(rig_at: Any, time: Time) -> None:
    rig = rig_at([{"id": "quiet", "type": "silent", "after_s": 900}])
    rig.sample(temperature=4.0)
    time.advance(899)
    rig.tick()
    assert rig.alerts == []
    time.advance(1)
    rig.tick()
    rig.tick()
    assert rig.kinds() == [("raised", "fridge-1")]
    rig.sample(temperature=4.0)
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1")]
    rig.status("error")
    rig.status("error")
    assert rig.kinds()[2:] == [("raised", "fridge-1")]
    assert rig.alerts[2].details["alert_id"] == "quiet/fridge-1/2"


def test_a_selector_keeps_a_rule_to_its_devices(rig_at: Any, time: Time) -> None:
    rig = rig_at([{**WARM, "select": {"devices": ["fridge-2"]}}])
    rig.sample(temperature=20.0)
    time.advance(1000)
    rig.tick()
    assert rig.alerts == []


def test_an_unacknowledged_alert_is_told_again_and_escalated_until_someone_acknowledges(
    rig_at: Any, time: Time
) -> None:
    from gateway.kernel.events import AlertAcknowledged, AlertEscalated
    from gateway.kernel.pipeline import Event

    rule = {
        **WARM,
        "for_s": 0,
        "notify": ["staff"],
        "renotify_s": 600,
        "escalate": [{"after_s": 900, "notify": ["manager"]}, {"after_s": 1800, "notify": ["area"]}],
    }
    rig = rig_at([rule])
    rig.sample(temperature=9.0)
    for _ in range(20):
        time.advance(300)
        rig.tick()
    escalated = [a for a in rig.alerts if isinstance(a, AlertEscalated)]
    assert [(e.step, e.channels) for e in escalated[:4]] == [
        (0, ["staff"]),  # 10 min: the rule's own channel again
        (1, ["manager"]),  # 15 min: the first escalation step
        (0, ["staff"]),  # 20 min
        (2, ["area"]),  # 30 min
    ]
    raised = next(a for a in rig.alerts if isinstance(a, AlertRaised))
    assert escalated[1].message == f"not acknowledged after 15 min: {raised.message}"
    told = len(escalated)
    ack = AlertAcknowledged(alert_id="dairy-warm/fridge-1/1", note="on it", role="manager", via="api")
    rig.seq += 1
    event = Event(rig.seq, "alert.acknowledged", None, ack.model_dump_json().encode(), ack)
    rig._commit(lambda w: rig.pipeline.run(rig.conn, [event], w.append))
    for _ in range(10):
        time.advance(600)
        rig.tick()
    assert len([a for a in rig.alerts if isinstance(a, AlertEscalated)]) == told  # acknowledged: quiet


def test_episodes_go_on_across_a_rule_change_and_wording_changes_keep_an_open_alert(
    rig_at: Any, time: Time
) -> None:
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    rig.conn.close()
    reworded = {**WARM, "description": "Dairy", "severity": "critical"}  # says nothing new about the fridge
    rig2 = rig_at([reworded])
    rig2.tick()
    assert rig2.alerts == []  # still open, same timers
    rig2.conn.close()
    rig3 = rig_at([{**reworded, "max_c": 7}])  # decides differently: starts afresh
    rig3.tick()
    rig3.sample(temperature=9.0)
    time.advance(600)
    rig3.tick()
    assert [a.details.get("alert_id") or a.alert_id for a in rig3.alerts] == [
        "dairy-warm/fridge-1/1",  # cleared: rule_changed
        "dairy-warm/fridge-1/2",  # the next episode, never 1 again
    ]
    rig3.conn.close()
    rig4 = rig_at([])  # removed: clears; back later, its numbers go on
    rig4.tick()
    rig4.conn.close()
    rig5 = rig_at([{**reworded, "max_c": 7}])
    rig5.sample(temperature=9.0)
    time.advance(600)
    rig5.tick()
    assert rig5.alerts[-1].details["alert_id"] == "dairy-warm/fridge-1/3"


def test_silent_watches_only_devices_that_send_readings_and_not_the_gateways_own_downtime(
    rig_at: Any, time: Time
) -> None:
    rules = [{"id": "loggers", "type": "silent", "after_s": 900, "select": {"sources": ["dixell-xr"]}}]
    rig = rig_at(rules)
    rig.status("online", device="till-1")  # a till: never sends readings
    rig.status("offline", device="till-1")
    rig.sample(temperature=4.0)  # fridge-1, format dixell-xr
    rig.status("offline")  # no 'source' in a device.status: the format its readings had counts
    assert rig.kinds() == [("raised", "fridge-1")]
    rig.status("online")
    assert rig.kinds()[1:] == [("cleared", "fridge-1")]
    time.advance(600)
    rig.tick()
    rig.conn.close()
    time.advance(3600)  # the gateway is down for an hour
    rig2 = rig_at(rules)
    rig2.tick()
    assert rig2.alerts == []  # the fridge gets its full 15 min after the start
    time.advance(900)
    rig2.tick()
    assert rig2.kinds() == [("raised", "fridge-1")]


def test_a_start_before_the_clock_syncs_counts_the_time_away_once_it_syncs(rig_at: Any, time: Time) -> None:
    """A power cut: the box starts without a real-time clock; the overdue timer fires when NTP syncs."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    rig.tick()
    rig.conn.close()
    time.advance(3600)
    time.synced = False
    time.boot = "boot-2"  # a power cut: a new boot, no real-time clock
    time.mono = 7.0
    rig2 = rig_at([WARM])
    time.advance(5)
    rig2.tick()
    assert rig2.alerts == []  # the time away is not known yet
    time.synced = True
    rig2.tick()
    [raised] = rig2.alerts
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"


def test_a_defrost_during_a_waiting_timer_raises_nothing_and_a_faulty_probe_never_clears(
    rig_at: Any, time: Time
) -> None:
    rig = rig_at([{**WARM, "post_defrost_grace_s": 600}])
    rig.sample(temperature=8.3)  # just before a defrost
    time.advance(30)
    for _ in range(20):
        rig.sample(temperature=12.0, defrost_active=1)
        time.advance(60)
        rig.tick()
    assert rig.alerts == []
    time.advance(600)
    rig.sample(temperature=4.0, defrost_active=0)  # the grace is over, it is cold
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    assert rig.kinds() == [("raised", "fridge-1")]
    rig.sample(temperature=5.9)  # recovering...
    for _ in range(10):
        time.advance(60)
        rig.sample(humidity=50.0)  # ...and then the probe fails: no temperature
        rig.tick()
    assert rig.kinds() == [("raised", "fridge-1")]  # a broken probe never clears
    rig.sample(temperature=5.0)  # a real reading again
    rig.tick()
    assert rig.kinds() == [("raised", "fridge-1"), ("cleared", "fridge-1")]


def test_a_restart_on_the_same_boot_counts_the_time_away_without_ntp(rig_at: Any, time: Time) -> None:
    """The gateway restarted (a crash, an upgrade), the machine did not: its monotonic clock ran on."""
    time.synced = False
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(240)
    rig.tick()
    rig.conn.close()
    time.advance(400)  # down, same boot
    rig2 = rig_at([WARM])
    rig2.tick()
    assert rig2.kinds() == [("raised", "fridge-1")]  # due at 600 s; the clock says 640 s: overdue, fired once


def test_a_rule_that_stops_re_notifying_while_an_alert_is_open_goes_quiet(rig_at: Any, time: Time) -> None:
    from gateway.kernel.events import AlertEscalated

    rig = rig_at([{**WARM, "for_s": 0, "renotify_s": 600}])
    rig.sample(temperature=9.0)
    time.advance(600)
    rig.tick()
    assert len([a for a in rig.alerts if isinstance(a, AlertEscalated)]) == 1
    rig.conn.close()
    rig2 = rig_at([{**WARM, "for_s": 0}])  # renotify_s removed: a change of who is told, the alert stays open
    for _ in range(10):
        time.advance(1)
        rig2.tick()
    time.advance(3600)
    rig2.tick()
    assert [a for a in rig2.alerts if isinstance(a, AlertEscalated)] == []
    rig2.conn.close()
    rig3 = rig_at([{**WARM, "for_s": 0, "renotify_s": 600}])  # and back: it re-notifies again
    rig3.tick()
    time.advance(600)
    rig3.tick()
    assert len([a for a in rig3.alerts if isinstance(a, AlertEscalated)]) >= 1


def test_channel_lists_and_urls_are_checked() -> None:
    import pytest
    from pydantic import TypeAdapter, ValidationError

    from gateway.kernel.rule_config import Notifications, RuleDefinition

    adapter = TypeAdapter(RuleDefinition)
    with pytest.raises(ValidationError, match="at most 50"):
        adapter.validate_python({**WARM, "notify": [f"c{i}" for i in range(51)]})
    with pytest.raises(ValidationError, match="named twice"):
        adapter.validate_python({**WARM, "notify": ["a", "a"]})
    with pytest.raises(ValidationError, match="60"):
        adapter.validate_python({**WARM, "escalate": [{"after_s": 0.001, "notify": ["a"]}]})
    for bad in (
        "oapi.dingtalk.com/robot/send",
        "http://hooks.example.com/x",
        "https://[::1/x",
        "https://h:x/",
    ):
        with pytest.raises(ValidationError):
            Notifications.model_validate({"channels": [{"id": "c", "type": "slack", "url": bad}]})
    with pytest.raises(ValidationError, match="signed"):
        Notifications.model_validate(
            {"channels": [{"id": "c", "type": "webhook", "url": "https://x.example/h"}]}
        )
    Notifications.model_validate({"channels": [{"id": "c", "type": "slack", "url": "http://127.0.0.1:9/h"}]})


def test_a_same_boot_restart_before_sync_keeps_the_wall_reading_for_a_later_reboot(
    rig_at: Any, time: Time
) -> None:
    """Restarted on the same boot while the clock is not synchronised, then a power cut: the saved wall reading
    is carried forward, so the time away is still counted once the clock syncs."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    rig.tick()
    rig.conn.close()
    time.advance(100)
    time.synced = False  # the gateway restarts, same boot; NTP has not answered this time
    rig2 = rig_at([WARM])
    time.advance(61)
    rig2.tick()  # saves the clock, with the wall reading carried forward
    rig2.conn.close()
    time.advance(3600)
    time.boot = "boot-2"  # a power cut
    time.mono = 7.0
    rig3 = rig_at([WARM])
    rig3.tick()
    assert rig3.alerts == []  # the time away is not known yet
    time.synced = True
    rig3.tick()
    [raised] = rig3.alerts
    assert raised.details["due_at"] == "2027-01-15T08:10:00Z"


def test_a_wall_clock_step_during_a_window_neither_shortens_nor_stretches_it(rig_at: Any, time: Time) -> None:
    """NTP steps the wall clock by an hour either way in the middle of a 10-minute window: the alert still comes
    at minute 10 of the monotonic clock, once, and its due_at is the wall clock's time at that moment."""
    for step in (3600.0, -3600.0):
        rig = rig_at([{**WARM, "id": f"warm{int(step)}"}])
        rig.sample(temperature=9.0)
        time.advance(300)
        time.wall += step  # the step: the monotonic clock does not move
        rig.tick()
        time.advance(299)
        rig.tick()
        assert rig.alerts == []
        time.advance(1)
        rig.tick()
        rig.tick()
        [raised] = rig.alerts
        assert raised.details["due_at"] is not None
        rig.conn.close()
        rig.path.unlink()


def test_readings_out_of_order_or_repeated_are_taken_in_seq_order(rig_at: Any, time: Time) -> None:
    """Device timestamps are evidence, never the timer: a reading the device dated earlier, or the same reading
    again (an MQTT redelivery the journal kept), moves nothing back."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)
    time.advance(300)
    rig.sample(temperature=9.0)  # the same reading again
    rig.sample(temperature=9.2)
    time.advance(300)
    rig.tick()
    [raised] = rig.alerts
    assert raised.details["first"] == {"seq": 1, "value": 9.0}  # the window still opened with the first one


def test_after_a_rollback_readings_reach_the_tracks_as_reloaded(rig_at: Any, time: Time) -> None:
    """The engine works out once which tracks a device's readings go to; a failed commit's rollback reloads the
    tracks, and the readings after it must reach the reloaded ones (a stale track would let this timer fire)."""
    rig = rig_at([WARM])
    rig.sample(temperature=9.0)  # a waiting timer, committed
    rig.engine.rollback(rig.conn)  # as the journal's writer does after a failed commit
    rig.sample(temperature=5.0)  # back in range: the timer stops
    time.advance(700)
    rig.tick()
    assert rig.alerts == []


def test_the_devices_worked_out_are_bounded_and_forgetting_them_changes_nothing(
    rig_at: Any, time: Time, monkeypatch: Any
) -> None:
    import rules.engine

    monkeypatch.setattr(rules.engine, "MAX_PLANS", 3)
    rig = rig_at([WARM])
    for n in range(10):
        rig.sample(f"fridge-{n}", temperature=9.0)
    assert len(rig.engine._plans) <= 3
    rig.sample("fridge-0", temperature=5.0)  # its plan was forgotten: worked out again, same track
    time.advance(600)
    rig.tick()
    assert sorted(a.subject for a in rig.alerts) == [f"fridge-{n}" for n in range(1, 10)]


def test_timers_due_in_the_same_tick_fire_in_the_rules_order(rig_at: Any, time: Time) -> None:
    """A device's tracks are made in the order of its rules (a rule reading one format among them), so timers due
    together fire, and their alerts take seqs, in that order."""
    rig = rig_at(
        [
            {**WARM, "id": "by-format", "select": {"sources": ["dixell-xr"]}},
            {**WARM, "id": "any-format"},
        ]
    )
    rig.sample(temperature=9.0)
    rig.sample(temperature=9.5)  # the second reading meets the tracks the first one made
    time.advance(600)
    rig.tick()
    assert [a.details["rule_id"] for a in rig.alerts] == ["by-format", "any-format"]


def test_an_event_no_rule_reads_is_not_parsed(rig_at: Any) -> None:
    from gateway.kernel.pipeline import Event

    rig = rig_at([WARM])
    event = Event(1, "barcode.scanned", "scanner-1", b'{"not": "a barcode"}')  # payload parsed only when read
    rig.engine.apply(event)
    assert event._model is None
