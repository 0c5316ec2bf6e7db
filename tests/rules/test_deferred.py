"""Deferred rule state (a ``silent`` or ``register_silent`` timer restarted by a reading is written within a minute)
through the pipeline's failure paths, on a real SQLite file with an ``events`` table: a failed commit, a failing
rule in the middle of a transaction, a failing ``observe``, a ``transact``'s reload."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter

import rules.tills as tills
from gateway.kernel.pipeline import Derived, Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from rules.clock import RuleClock
from rules.engine import ACTIVE, RuleEngine

SILENT = [{"id": "quiet", "type": "silent", "after_s": 600}]
Draft = tuple[str, str, bytes]


class Rig:
    """The engine as the journal's writer runs it: the pipeline in a transaction, then the events inserted."""

    def __init__(self, path: Path, rules: list[dict[str, Any]]) -> None:
        self.mono = [1000.0]
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute(
            "CREATE TABLE events(seq INTEGER PRIMARY KEY, kind TEXT, device_id TEXT, body BLOB)"
        )
        clock = RuleClock(lambda: True, monotonic=lambda: self.mono[0], boot=lambda: "boot")
        self.engine = RuleEngine(TypeAdapter(list[RuleDefinition]).validate_python(rules), clock)
        self.pipeline = Pipeline([self.engine])
        self.pipeline.setup(self.conn)
        self.seq = 0
        self.kinds: list[str] = []
        self.alert_ids: list[str] = []

    def commit(self, *batches: list[Draft], tick: bool = False, fail: bool = False) -> None:
        start, rows = self.seq, []

        def append(derived: list[Derived]) -> list[Event]:
            out = []
            for d in derived:
                self.seq += 1
                rows.append((self.seq, d.kind, d.device_id, d.data_json))
                out.append(Event(self.seq, d.kind, d.device_id, d.data_json, d.model))
                self.kinds.append(d.kind)
                details = getattr(d.model, "details", None)
                if d.kind == "alert.raised" and isinstance(details, dict):
                    self.alert_ids.append(str(details.get("alert_id")))
            return out

        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for batch in batches:
                feed = []
                for kind, device, body in batch:
                    self.seq += 1
                    rows.append((self.seq, kind, device, body))
                    feed.append(Event(self.seq, kind, device, body))  # type: ignore[arg-type]
                self.pipeline.run(self.conn, feed, append)
            if tick:
                self.pipeline.tick(self.conn, 0.0, append)
            self.conn.executemany("INSERT INTO events VALUES (?,?,?,?)", rows)
            if fail:
                raise sqlite3.OperationalError("disk I/O error")  # as the commit failing
            self.conn.execute("COMMIT")
            self.pipeline.committed()
        except sqlite3.Error:
            self.conn.execute("ROLLBACK")
            self.seq = start
            self.pipeline.rollback(self.conn)

    def stored(self, rule_id: str) -> tuple[str, float | None, dict[str, Any]]:
        state, due, data = self.conn.execute(
            "SELECT state, due, data FROM rule_state WHERE rule_id = ?", (rule_id,)
        ).fetchone()
        return state, due, orjson.loads(data)


def sample(device: str = "fridge-1") -> Draft:
    body = {"values": {"temperature": 4.0}, "units": {"temperature": "°C"}, "source": "dixell-xr"}
    return ("sensor.sample", device, orjson.dumps(body))


def receipt(n: int) -> Draft:
    body = {
        "receipt_no": f"R{n}",
        "register_id": "pos-01",
        "currency": "HKD",
        "lines": [{"sku": "SKU-1", "quantity": "1", "unit_price": "10"}],
        "totals": {"subtotal": "10", "total": "10"},
    }
    return ("pos.sale", "pos-01", orjson.dumps(body))


def test_a_failed_commit_never_records_a_seq_beyond_the_journal(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.db", SILENT)
    rig.commit([sample()])
    rig.mono[0] += 61
    rig.commit([sample()])
    rig.commit([sample(), sample(), sample()], fail=True)  # seqs 3..5 roll back
    rig.commit(tick=True)  # the next write of deferred changes
    ((deferred_seq,),) = rig.conn.execute("SELECT value FROM rule_meta WHERE key = 'deferred_seq'").fetchall()
    ((newest,),) = rig.conn.execute("SELECT MAX(seq) FROM events").fetchall()
    assert deferred_seq <= newest


def test_a_rule_failing_later_in_the_transaction_keeps_the_restart_deferred_earlier(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.db", SILENT)
    rig.commit([sample()])  # at 0: due 600, written
    rig.mono[0] += 30
    bad = ("sensor.sample", "fridge-1", b'{"values": 1}')  # the engine fails on it: a reload mid-transaction
    rig.commit([sample()], [bad])  # at 30: due 630, deferred; then the reload
    rig.mono[0] += 575  # 605: the old timer (600) would have fired
    rig.commit(tick=True)
    assert not [
        a for a in rig.alert_ids if a.startswith("quiet/")
    ]  # (the failing event is reported, not this)
    assert rig.engine._tracks["quiet", "fridge-1"].due == 630


def test_a_failing_observe_leaves_no_deferral_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path / "journal.db", [{"id": "till-quiet", "type": "register_silent", "after_s": 600}])
    rig.commit([receipt(1)])
    wait = tills._wait

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the store's hours")

    monkeypatch.setattr(tills, "_wait", broken)
    rig.commit([receipt(2)])  # observe defers, then fails: the receipt is skipped
    monkeypatch.setattr(tills, "_wait", wait)
    rig.mono[0] += 700
    rig.commit(tick=True)
    assert rig.stored("till-quiet")[0] == ACTIVE
    rig.mono[0] += 10
    rig.commit([receipt(3)])  # clears: written at once, not deferred
    assert rig.kinds == ["alert.raised", "alert.cleared"]
    assert rig.stored("till-quiet")[0] != ACTIVE


def test_a_reload_after_a_transact_keeps_the_deferred_timer(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "journal.db", SILENT)
    rig.commit([sample()])
    rig.mono[0] += 61
    rig.commit([sample()])  # at 61: written (a minute since the last write of deferred changes)
    rig.mono[0] += 5
    rig.commit([sample()])  # at 66: due 666, deferred
    rig.mono[0] += 50
    rig.pipeline.reload(rig.conn)  # as after a transact (HQ's stock.adjust), at 116
    assert rig.engine._tracks["quiet", "fridge-1"].due == 666
