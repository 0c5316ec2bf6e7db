"""The rule engine in the journal's pipeline, on a real journal file with its writer and ticks running: an alert
commits with the readings that caused it, once, and a restart raises nothing again; and ``rules check``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
from pydantic import TypeAdapter

from gateway.kernel.clock import ClockState
from gateway.kernel.journal import Draft
from gateway.kernel.rule_config import RuleDefinition
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.gateway.test_cli import SCRIPT
from tests.gateway.test_journal import flushed, new_journal, query, running, until

RULES = TypeAdapter(list[RuleDefinition]).validate_python(
    [{"id": "dairy-warm", "type": "temperature", "max_c": 8, "for_s": 0, "clear_for_s": 0}]
)


def sample(value: float, device: str = "fridge-1") -> Draft:
    body = orjson.dumps(
        {"values": {"temperature": value}, "units": {"temperature": "°C"}, "source": "dixell-xr"}
    )
    return Draft("sensor.sample", device, body, driver="modbus")


async def test_an_alert_commits_once_with_its_evidence_and_a_restart_does_not_repeat_it(
    tmp_path: Path,
) -> None:
    def engine() -> RuleEngine:
        return RuleEngine(RULES, RuleClock(lambda: True))

    journal = new_journal(tmp_path, processors=[engine()])
    async with running(journal):
        journal.submit(sample(9.0))
        await until(lambda: journal.last_seq >= 2, "the alert commits")
        journal.submit(sample(9.5))
        await flushed(journal)
    reopened = new_journal(tmp_path, processors=[engine()])
    async with running(reopened):
        reopened.submit(sample(10.0))
        reopened.submit(sample(5.0))
        await until(lambda: reopened.last_seq >= 6, "the clear commits")
    rows = query(reopened, "SELECT seq, kind, device_id, body FROM events ORDER BY seq")
    kinds = [(seq, kind) for seq, kind, _, _ in rows]
    assert kinds == [
        (1, "sensor.sample"),
        (2, "alert.raised"),
        (3, "sensor.sample"),
        (4, "sensor.sample"),
        (5, "sensor.sample"),
        (6, "alert.cleared"),
    ]
    raised = orjson.loads(rows[1][3])["data"]
    assert rows[1][2] == "fridge-1"
    assert raised["details"]["alert_id"] == "dairy-warm/fridge-1/1"
    assert raised["details"]["first"] == {"seq": 1, "value": 9.0}
    cleared = orjson.loads(rows[5][3])["data"]
    assert (cleared["alert_id"], cleared["reason"]) == ("dairy-warm/fridge-1/1", "recovered")
    assert query(reopened, "SELECT cls FROM events WHERE kind LIKE 'alert.%'") == [(0,), (0,)]  # critical


def test_rules_check_names_every_problem_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "rules:\n  - id: dairy-warm\n    type: temperature\n    max_c: eight\n  - {id: q, type: silnet}\n"
    )
    result = subprocess.run([SCRIPT, "rules", "check", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{bad}:4:")
    assert "rules[0].max_c" in lines[0]
    assert lines[1].startswith(f"{bad}:5:")
    assert "'silnet'" in lines[1]
    assert "hint:" in lines[1]
    assert lines[-1] == f"2 problem(s) in {bad}"
    good = tmp_path / "good.yaml"
    good.write_text(
        "rules:\n  - {id: dairy-warm, type: temperature, max_c: 8}\n  - {id: quiet, type: silent}\n"
    )
    result = subprocess.run(
        [SCRIPT, "rules", "check", str(good)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (0, f"OK: {good}: 2 rule(s): silent, temperature\n")


def test_clock_state_is_what_the_runtime_gives_the_rules() -> None:
    assert RuleClock(ClockState(override=True).synced).synced()


async def test_hq_rules_join_the_configured_ones_and_a_changed_rule_starts_afresh(tmp_path: Path) -> None:
    """HQ's rules.set document carries engine rules beside the ledger's stock.low thresholds: they apply in the
    transaction that stores them, replace a configured rule with the same id, and clear its open alert."""
    from cloud_bridge.documents import RuleSet
    from gateway.kernel.metrics import Metrics
    from gateway.ledger.commands import store_document
    from gateway.ledger.documents import engine_rules
    from tests.gateway.test_journal import stock_ledger

    metrics = Metrics()
    engine = RuleEngine(RULES, RuleClock(lambda: True), hq_rules=engine_rules)
    journal = new_journal(
        tmp_path, metrics=metrics, processors=[stock_ledger(metrics, TEA=(10, None)), engine]
    )
    async with running(journal):
        journal.submit(sample(9.0))
        await until(lambda: journal.last_seq >= 2, "the configured rule raises")
        document = RuleSet.model_validate(
            {
                "rules": [
                    {"id": "tea-low", "type": "stock.low", "sku": "TEA", "threshold": 3},
                    {"id": "dairy-warm", "type": "temperature", "max_c": 12, "for_s": 0, "clear_for_s": 0},
                    {"id": "door", "type": "door_open", "open_s": 0},
                ]
            }
        )
        assert await store_document(journal, "req-rules-1", document) == ("ok", {"version": 1, "count": 3})
        assert set(engine.rules) == {"dairy-warm", "door"}
        await until(lambda: journal.last_seq >= 4, "the changed rule's alert is cleared")
        journal.submit(sample(11.0))  # above the old limit, not the new one
        journal.submit(Draft("sensor.sample", "fridge-1", b'{"values":{"door_open":1}}', driver="modbus"))
        await flushed(journal)
        await until(lambda: journal.last_seq >= 7, "the door rule from HQ raises")
    kinds = [k for (k,) in query(journal, "SELECT kind FROM events ORDER BY seq")]
    assert kinds == [
        "sensor.sample",
        "alert.raised",
        "document.updated",
        "alert.cleared",
        "sensor.sample",
        "sensor.sample",
        "alert.raised",
    ]
    cleared = orjson.loads(query(journal, "SELECT body FROM events WHERE kind='alert.cleared'")[0][0])["data"]
    assert (cleared["alert_id"], cleared["reason"]) == ("dairy-warm/fridge-1/1", "rule_changed")
    door = orjson.loads(query(journal, "SELECT body FROM events WHERE seq=7")[0][0])["data"]
    assert door["rule"] == "door_open"
    assert query(journal, "SELECT safety_stock FROM stock WHERE sku='TEA'") == [(3.0,)]


def test_a_stored_rule_this_release_cannot_read_is_left_out_and_the_others_stay(tmp_path: Path) -> None:
    import sqlite3

    from gateway.ledger.documents import create_table, engine_rules, read_rules

    conn = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    create_table(conn)
    body = orjson.dumps(
        {
            "rules": [
                {"id": "tea-low", "type": "stock.low", "sku": "TEA", "threshold": 3},
                {"id": "future", "type": "rfid_shelf_gap", "shelf": "A1"},
                {"id": "dairy-warm", "type": "temperature", "max_c": 8},
            ]
        }
    )
    conn.execute(
        "INSERT INTO documents(name, version, body, request_id, updated_at) VALUES ('rules', 4, ?, 'r', '')",
        (body,),
    )
    rules = read_rules(conn)
    assert rules is not None
    assert [r.id for r in rules.rules] == ["tea-low", "dairy-warm"]
    assert rules.sku_thresholds == {"TEA": 3}
    assert [r.id for r in engine_rules(conn)] == ["dairy-warm"]


def test_hqs_rules_document_takes_every_rule_type_of_the_config() -> None:
    """One model for both: every engine rule type the config takes, HQ's rules document takes too."""
    from typing import get_args

    from cloud_bridge.documents import AnyRule, StockLowRule
    from gateway.kernel.rule_config import RuleDefinition, StockLowAlerts
    from rules.types import RULE_TYPES

    config_types = set(get_args(get_args(RuleDefinition)[0]))
    # "stock.low" in HQ's document is the ledger's threshold; the alerts' own settings are in the store config
    assert set(get_args(get_args(AnyRule)[0])) == config_types - {StockLowAlerts} | {StockLowRule}
    assert {t.model_fields["type"].annotation.__args__[0] for t in config_types} <= set(RULE_TYPES)


async def test_a_silence_timer_restarted_by_each_reading_is_written_later_and_recovered_from_the_journal(
    tmp_path: Path,
) -> None:
    """A reading that only restarts a ``silent`` timer is not written at once (one row per reading would be most
    of the rules' writes); a start finds the device's newest reading in the journal, and the alert names it."""
    mono = [1000.0]
    rules = TypeAdapter(list[RuleDefinition]).validate_python(
        [{"id": "quiet", "type": "silent", "after_s": 600}]
    )

    def engine() -> RuleEngine:
        return RuleEngine(rules, RuleClock(lambda: True, monotonic=lambda: mono[0]))

    journal = new_journal(tmp_path, processors=[engine()])
    async with running(journal):
        for value in (4.0, 4.1, 4.2, 4.3, 4.4):
            journal.submit(sample(value))
            await flushed(journal)  # a commit each
    ((stored,),) = query(journal, "SELECT data FROM rule_state WHERE rule_id = 'quiet'")
    assert orjson.loads(stored)["last_seq"] == 1  # the first reading started the timer; the others waited

    reopened = new_journal(tmp_path, processors=[engine()])  # as after a crash: nothing more was written
    async with running(reopened):
        mono[0] += 601  # the device stays quiet past after_s (counted from the start: late, never early)
        await until(lambda: bool(query(reopened, "SELECT 1 FROM events WHERE kind='alert.raised'")), "alert")
    ((body,),) = query(reopened, "SELECT body FROM events WHERE kind='alert.raised'")
    assert orjson.loads(body)["data"]["details"]["last_seq"] == 5  # the newest reading, from the journal


async def test_a_tills_receipts_restart_its_count_later_written_and_recovered_from_the_journal(
    tmp_path: Path,
) -> None:
    """``register_silent`` defers the same way: after a stop, the alert names the till's newest receipt."""
    mono = [1000.0]
    rules = TypeAdapter(list[RuleDefinition]).validate_python(
        [{"id": "till-quiet", "type": "register_silent", "after_s": 600}]
    )

    def engine() -> RuleEngine:
        return RuleEngine(rules, RuleClock(lambda: True, monotonic=lambda: mono[0]))

    def receipt(n: int) -> Draft:
        body = {
            "receipt_no": f"R{n}",
            "register_id": "pos-01",
            "currency": "HKD",
            "lines": [{"sku": "SKU-1", "quantity": "1", "unit_price": "10"}],
            "totals": {"subtotal": "10", "total": "10"},
        }
        return Draft("pos.sale", "pos-01", orjson.dumps(body), driver="mqtt")

    journal = new_journal(tmp_path, processors=[engine()])
    async with running(journal):
        for n in range(1, 4):
            journal.submit(receipt(n))
            await flushed(journal)
    ((stored,),) = query(journal, "SELECT data FROM rule_state WHERE rule_id = 'till-quiet'")
    assert orjson.loads(stored)["last_seq"] == 1

    reopened = new_journal(tmp_path, processors=[engine()])
    async with running(reopened):
        await until(lambda: reopened.last_seq >= 3, "started")
        mono[0] += 601
        await until(lambda: bool(query(reopened, "SELECT 1 FROM events WHERE kind='alert.raised'")), "alert")
    ((body,),) = query(reopened, "SELECT body FROM events WHERE kind='alert.raised'")
    assert orjson.loads(body)["data"]["details"]["last_seq"] == 3
