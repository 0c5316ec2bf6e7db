"""Backtest: live equals replay. A live journal with the rule engine, its events exported with
``store-gateway export``, replayed with ``store-gateway rules test``: the same alerts, in the same order; and
``--against`` shows what another threshold would have done."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import orjson
from pydantic import TypeAdapter

from gateway.kernel.rule_config import RuleDefinition
from rules.backtest import difference, read_envelopes, replay
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.gateway.test_cli import SCRIPT
from tests.gateway.test_config import MINIMAL
from tests.gateway.test_journal import flushed, new_journal, query, running, until
from tests.rules.test_in_journal import sample

RULES_YAML = """rules:
  - {id: dairy-warm, type: temperature, max_c: 8, for_s: 1, clear_below_c: 6, clear_for_s: 0}
  - {id: quiet, type: silent, after_s: 3600}
"""


def alerts_in(journal_rows: list[tuple[bytes]]) -> list[tuple[str, str]]:
    out = []
    for (body,) in journal_rows:
        envelope = orjson.loads(body)
        data = envelope["data"]
        alert_id = data["details"]["alert_id"] if envelope["kind"] == "alert.raised" else data["alert_id"]
        out.append((envelope["kind"], alert_id))
    return out


async def test_live_equals_replay_and_a_stricter_rule_shows_its_difference(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES_YAML)
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(
        RULES_YAML.replace("max_c: 8", "max_c: 5").replace("clear_below_c: 6", "clear_below_c: 4")
    )
    rules = TypeAdapter(list[RuleDefinition]).validate_python(
        [
            {
                "id": "dairy-warm",
                "type": "temperature",
                "max_c": 8,
                "for_s": 1,
                "clear_below_c": 6,
                "clear_for_s": 0,
            },
            {"id": "quiet", "type": "silent", "after_s": 3600},
        ]
    )
    journal = new_journal(tmp_path, processors=[RuleEngine(rules, RuleClock(lambda: True))])
    async with running(journal):
        journal.submit(sample(9.0))
        await until(lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='alert.raised'")), "raised")
        journal.submit(sample(7.0))  # the hysteresis band: still open
        journal.submit(sample(5.5, device="fridge-2"))
        journal.submit(sample(4.0))
        await until(
            lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='alert.cleared'")), "cleared"
        )
        journal.submit(sample(9.5))
        await until(
            lambda: len(query(journal, "SELECT 1 FROM events WHERE kind='alert.raised'")) == 2, "again"
        )
        await flushed(journal)
    live = alerts_in(query(journal, "SELECT body FROM events WHERE kind LIKE 'alert.%' ORDER BY seq"))
    assert live == [
        ("alert.raised", "dairy-warm/fridge-1/1"),
        ("alert.cleared", "dairy-warm/fridge-1/1"),
        ("alert.raised", "dairy-warm/fridge-1/2"),
    ]
    config = tmp_path / "store.yaml"
    config.write_text(MINIMAL + f"data_dir: {tmp_path}\n")
    exported = (
        await asyncio.to_thread(
            subprocess.run,
            [SCRIPT, "export", "--config", str(config)],
            capture_output=True,
            check=True,
            timeout=60,
        )
    ).stdout
    events = tmp_path / "events.jsonl"
    events.write_bytes(exported)
    replayed = replay(rules, list(read_envelopes(exported.splitlines())))
    assert [(o.kind, o.alert_id) for o in replayed] == live  # live equals replay

    result = await asyncio.to_thread(
        subprocess.run,
        [SCRIPT, "rules", "test", str(rules_file), "--events", str(events)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["raised", "dairy-warm/fridge-1/1"],
        ["cleared", "dairy-warm/fridge-1/1"],
        ["raised", "dairy-warm/fridge-1/2"],
    ]
    against = await asyncio.to_thread(
        subprocess.run,
        [SCRIPT, "rules", "test", str(rules_file), "--events", str(events), "--against", str(stricter)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    compared = against.stdout.splitlines()
    # At 5 °C the 7 °C and 5.5 °C readings are too warm as well: fridge-2 alerts, fridge-1 clears later.
    assert any(line.startswith("+ ") and "dairy-warm/fridge-2/1" in line for line in compared)
    assert all(line[:2] in ("- ", "+ ") for line in compared)


def test_difference_is_empty_for_the_same_rules() -> None:
    assert difference([], []) == []
