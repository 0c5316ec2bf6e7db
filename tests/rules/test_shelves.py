"""The RFID shelf rules (shelf_low, shelf_empty, possible_shrink, misplaced), through the engine on a real SQLite
file, with HQ's planogram stored and replaced as the downlink does it (the document and its document.updated in
one transaction)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_bridge.documents import Planogram
from gateway.kernel.events import AlertCleared, AlertRaised, DocumentUpdated, PosSale, RfidInventory
from gateway.kernel.journal import Draft
from gateway.kernel.journal.store import SCHEMA as JOURNAL_SCHEMA
from gateway.kernel.pipeline import Event, Pipeline
from gateway.ledger.documents import planogram, store_work
from rules.engine import RuleEngine
from tests.rules.conftest import RULE, Rig, Time

TEA = "00012345678905"
MILK = "00098765432109"
SOAP = "00011111111116"
SHELVES: list[dict[str, Any]] = [
    {"shelf_id": "A-01", "sku": "TEA", "gtin": TEA, "facings": 4, "min_on_shelf": 2},  # its reader: A-01
    {"shelf_id": "B-01", "sku": "MILK", "gtin": MILK, "facings": 3, "min_on_shelf": 1, "reader": "rfid-7"},
    {"shelf_id": "C-01", "sku": "BREAD", "facings": 2, "min_on_shelf": 1},  # no gtin: not watched
]


def epc(n: int) -> str:
    return f"3074257BF7194E4000{n:06X}"


class ShelfRig(Rig):
    """The rules' rig, with HQ's planogram read from the journal file as the runtime reads it."""

    def start(self, rules: list[dict[str, Any]]) -> None:
        self.conn.executescript(JOURNAL_SCHEMA)  # the journal's tables: the documents' dedup keys live there
        defs = [RULE.validate_python(r) for r in rules]
        self.engine = RuleEngine(defs, self.time.clock(), wall=lambda: self.time.wall, planogram=planogram)
        self.pipeline = Pipeline([self.engine])
        self.pipeline.setup(self.conn)

    def plan(self, shelves: list[dict[str, Any]]) -> None:
        """HQ's planogram.set: the document stored and its document.updated committed together."""
        self.seq += 1
        seq = self.seq
        work = store_work("planogram", Planogram(shelves=shelves), f"req-{seq}", f"planogram.set:req-{seq}")

        def run(writer: Any) -> None:
            _, drafts = work(self.conn)
            model = DocumentUpdated.model_validate_json(drafts[0].data_json)
            event = Event(seq, "document.updated", None, drafts[0].data_json, model)
            self.pipeline.run(self.conn, [event], writer.append)

        self._commit(run)

    def window(
        self,
        reader: str,
        tags: dict[str, str | None],
        departed: tuple[str, ...] = (),
        truncated: int = 0,
    ) -> int:
        """One rfid.inventory window of ``reader``: EPC -> GTIN (None: not an SGTIN). Returns its seq."""
        self.seq += 1
        model = RfidInventory.model_validate(
            {
                "window_s": 10,
                "reads": 3 * len(tags),
                "tags": [{"epc": e, "gtin": g, "reads": 3} for e, g in tags.items()],
                "departed": list(departed),
                "truncated": truncated,
            }
        )
        event = Event(self.seq, "rfid.inventory", reader, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))
        return event.seq

    def sale(self, sku: str, quantity: str = "1", gtin: str | None = None, till: str = "pos-01") -> None:
        self.seq += 1
        line: dict[str, Any] = {"sku": sku, "quantity": quantity, "unit_price": "10"}
        if gtin is not None:
            line["gtin"] = gtin
        model = PosSale.model_validate(
            {
                "receipt_no": f"R{self.seq}",
                "register_id": "REG1",
                "currency": "HKD",
                "lines": [line],
                "totals": {"subtotal": "10", "total": "10"},
            }
        )
        event = Event(self.seq, "pos.sale", till, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))


@pytest.fixture
def shelves_at(tmp_path: Path, time: Time) -> Iterator[Any]:
    rigs: list[ShelfRig] = []

    def make(rules: list[dict[str, Any]], shelves: list[dict[str, Any]] | None = None) -> ShelfRig:
        rig = ShelfRig(tmp_path / "journal.db", rules, time)
        rigs.append(rig)
        if shelves is not None:
            rig.plan(shelves)
        return rig

    yield make
    for rig in rigs:
        with contextlib.suppress(sqlite3.Error):
            rig.conn.close()


def tea(*ns: int) -> dict[str, str | None]:
    return {epc(n): TEA for n in ns}


def test_shelf_low_raises_below_the_minimum_and_clears_once_refilled_to_the_facings(shelves_at: Any) -> None:
    rig = shelves_at([{"id": "low", "type": "shelf_low"}], SHELVES)
    rig.window("A-01", tea(1, 2, 3))
    first = rig.window("A-01", tea(1))  # 1 < min_on_shelf 2
    rig.window("A-01", tea(1))
    rig.window("A-01", tea(1, 2, 3))  # at the minimum, below the 4 facings: still low
    rig.window("A-01", tea(1, 2, 3, 4))
    rig.window("A-01", tea(1))
    assert rig.kinds() == [("raised", "A-01/" + TEA), ("cleared", "A-01/" + TEA), ("raised", "A-01/" + TEA)]
    raised = rig.alerts[0]
    assert isinstance(raised, AlertRaised)
    assert raised.details["alert_id"] == f"low/A-01/{TEA}/1"
    assert {k: raised.details[k] for k in ("shelf_id", "sku", "gtin", "reader", "count", "seq")} == {
        "shelf_id": "A-01",
        "sku": "TEA",
        "gtin": TEA,
        "reader": "A-01",
        "count": 1,
        "seq": first,
    }
    assert (raised.details["min_on_shelf"], raised.details["facings"], raised.details["clear_at"]) == (
        2,
        4,
        4,
    )
    cleared = rig.alerts[1]
    assert isinstance(cleared, AlertCleared)
    assert (cleared.alert_id, cleared.details["count"]) == (f"low/A-01/{TEA}/1", 4)


def test_shelf_low_can_clear_at_the_minimum(shelves_at: Any) -> None:
    rig = shelves_at([{"id": "low", "type": "shelf_low", "clear_at": "min"}], SHELVES)
    rig.window("A-01", tea(1))
    rig.window("A-01", tea(1, 2))
    assert rig.kinds() == [("raised", "A-01/" + TEA), ("cleared", "A-01/" + TEA)]


def test_shelf_empty_raises_at_zero_and_clears_at_the_minimum_on_the_readers_device(shelves_at: Any) -> None:
    rig = shelves_at([{"id": "empty", "type": "shelf_empty", "select": {"devices": ["rfid-7"]}}], SHELVES)
    milk = {epc(10): MILK}
    rig.window("rfid-7", milk)
    rig.window("rfid-7", {})
    rig.window("rfid-7", {})  # the same empty window again: nothing new
    rig.window("A-01", {})  # another reader: not selected
    rig.window("rfid-7", milk)
    assert rig.kinds() == [("raised", "B-01/" + MILK), ("cleared", "B-01/" + MILK)]
    raised = rig.alerts[0]
    assert raised.details["reader"] == "rfid-7"
    assert rig.alerts[0].subject == "B-01/" + MILK


def test_a_truncated_window_raises_nothing_it_may_have_left_out(shelves_at: Any) -> None:
    rig = shelves_at([{"id": "empty", "type": "shelf_empty"}, {"id": "low", "type": "shelf_low"}], SHELVES)
    rig.window("A-01", {}, truncated=40)
    assert rig.alerts == []


def test_odd_windows_never_crash_and_count_for_nothing(shelves_at: Any) -> None:
    rules = [
        {"id": "low", "type": "shelf_low"},
        {"id": "shrink", "type": "possible_shrink"},
        {"id": "stray", "type": "misplaced"},
    ]
    rig = shelves_at(rules)  # no planogram yet: nothing is watched
    rig.window("A-01", {epc(1): None}, departed=(epc(9),))
    rig.sale("TEA", gtin="12345678")
    rig.plan(SHELVES)
    rig.window("X-99", tea(1), departed=(epc(2),))  # an unknown shelf
    rig.window("C-01", {epc(3): None, epc(4): SOAP})  # a shelf without gtin: not watched, nothing misplaced
    rig.window("A-01", {epc(5): None, **tea(6, 7)}, departed=(epc(8),))  # untagged GTIN; departed unknown tag
    rig.sale("UNKNOWN", quantity="0.5")
    assert rig.alerts == []
    assert rig.engine.layout.places.keys() == {f"A-01/{TEA}", f"B-01/{MILK}"}


def test_misplaced_goods_raise_per_gtin_and_clear_when_no_longer_seen(shelves_at: Any) -> None:
    rig = shelves_at([{"id": "stray", "type": "misplaced"}], SHELVES)
    seen = rig.window("A-01", {**tea(1, 2), epc(3): MILK, epc(4): MILK})
    rig.window("A-01", {**tea(1, 2), epc(3): MILK})
    rig.window("A-01", {**tea(1, 2)}, truncated=1)  # the milk may be among the left-out tags
    rig.window("A-01", tea(1, 2))
    assert rig.kinds() == [("raised", "A-01/" + MILK), ("cleared", "A-01/" + MILK)]
    raised = rig.alerts[0]
    assert {k: raised.details[k] for k in ("area", "reader", "gtin", "count", "epcs", "seq")} == {
        "area": "A-01",
        "reader": "A-01",
        "gtin": MILK,
        "count": 2,
        "epcs": [epc(3), epc(4)],
        "seq": seen,
    }


def test_a_departure_not_sold_within_the_window_raises_with_its_evidence(shelves_at: Any, time: Time) -> None:
    rig = shelves_at([{"id": "shrink", "type": "possible_shrink", "sale_window_s": 600}], SHELVES)
    rig.window("A-01", tea(1, 2, 3))
    gone = rig.window("A-01", tea(3), departed=(epc(1), epc(2)))
    rig.window("A-01", tea(3), departed=(epc(1), epc(2)))  # the same window twice: counted once
    time.advance(300)
    rig.sale("TEA")  # by SKU (the planogram's GTIN for it): accounts for one of the two
    time.advance(301)
    rig.tick()
    assert rig.kinds() == [("raised", "A-01/" + TEA)]
    raised = rig.alerts[0]
    assert isinstance(raised, AlertRaised)
    assert {k: raised.details[k] for k in ("shelf_id", "sku", "gtin", "count", "epcs", "seqs")} == {
        "shelf_id": "A-01",
        "sku": "TEA",
        "gtin": TEA,
        "count": 1,
        "epcs": [epc(2)],  # the oldest departure (by seq, then EPC) was the one sold
        "seqs": [gone],
    }
    time.advance(3600)  # an event alert: it closes clear_after_s after it was raised
    rig.tick()
    assert rig.kinds() == [("raised", "A-01/" + TEA), ("cleared", "A-01/" + TEA)]
    assert rig.alerts[1].details["cause"] == "time"


def test_sales_by_gtin_account_for_departures_and_tags_back_in_time_are_no_shrink(
    shelves_at: Any, time: Time
) -> None:
    rig = shelves_at([{"id": "shrink", "type": "possible_shrink"}], SHELVES)
    rig.window("rfid-7", {epc(1): MILK, epc(2): MILK, epc(3): MILK})
    rig.window("rfid-7", {epc(3): MILK}, departed=(epc(1), epc(2)))
    rig.sale("MILK-1L", quantity="1", gtin="098765432109")  # a UPC-A: its GTIN-14 is the tags'
    rig.window("rfid-7", {epc(2): MILK, epc(3): MILK})  # picked up and put back
    time.advance(700)
    rig.tick()
    assert rig.alerts == []


def test_a_shrink_alert_clears_when_its_tags_are_back_and_later_departures_wait_for_the_next_episode(
    shelves_at: Any, time: Time
) -> None:
    rig = shelves_at([{"id": "shrink", "type": "possible_shrink", "sale_window_s": 60}], SHELVES)
    rig.window("A-01", tea(1, 2))
    rig.window("A-01", tea(2), departed=(epc(1),))
    time.advance(61)
    rig.tick()
    rig.window("A-01", {}, departed=(epc(2),))  # while the first alert is open
    time.advance(61)
    rig.tick()
    assert rig.kinds() == [("raised", "A-01/" + TEA)]
    rig.window("A-01", tea(1))  # the first alert's tag is back: it clears, and the waiting one raises
    assert rig.kinds() == [("raised", "A-01/" + TEA), ("cleared", "A-01/" + TEA), ("raised", "A-01/" + TEA)]
    assert rig.alerts[1].details["cause"] == "back"
    assert (rig.alerts[2].details["alert_id"], rig.alerts[2].details["epcs"]) == (
        f"shrink/A-01/{TEA}/2",
        [epc(2)],
    )


def test_the_rules_state_survives_a_restart(shelves_at: Any, time: Time) -> None:
    rules = [
        {"id": "low", "type": "shelf_low"},
        {"id": "shrink", "type": "possible_shrink", "sale_window_s": 600},
        {"id": "stray", "type": "misplaced"},
    ]
    rig = shelves_at(rules, SHELVES)
    rig.window("A-01", {**tea(1, 2, 3), epc(9): MILK})
    rig.window("A-01", {**tea(1), epc(9): MILK}, departed=(epc(2), epc(3)))  # low; two departures; misplaced
    assert sorted(rig.kinds()) == [("raised", "A-01/" + TEA), ("raised", "A-01/" + MILK)]
    rig.conn.close()
    rig = shelves_at(rules)  # the same file, a new engine: the planogram is read from it
    time.advance(200)
    rig.window("A-01", {**tea(1), epc(9): MILK}, departed=(epc(2), epc(3)))  # nothing new
    rig.sale("TEA", gtin=TEA)
    time.advance(401)
    rig.tick()
    rig.window("A-01", tea(1, 4, 5, 6))  # refilled, milk gone
    kinds = [(a.rule, type(a).__name__) for a in rig.alerts]
    assert kinds == [
        ("possible_shrink", "AlertRaised"),
        ("shelf_low", "AlertCleared"),
        ("misplaced", "AlertCleared"),
    ]
    shrink = rig.alerts[0]
    assert (shrink.details["alert_id"], shrink.details["count"]) == (f"shrink/A-01/{TEA}/1", 1)
    assert rig.alerts[1].alert_id == f"low/A-01/{TEA}/1"


def test_a_new_planogram_takes_effect_in_the_transaction_that_stores_it(shelves_at: Any) -> None:
    rules = [
        {"id": "low", "type": "shelf_low", "clear_at": "min"},
        {"id": "stray", "type": "misplaced"},
        {"id": "shrink", "type": "possible_shrink"},
    ]
    rig = shelves_at(rules, SHELVES)
    rig.window("A-01", {**tea(1), epc(9): MILK}, departed=())
    assert sorted(rig.kinds()) == [("raised", "A-01/" + TEA), ("raised", "A-01/" + MILK)]
    lower = [dict(SHELVES[0], min_on_shelf=1, facings=1), SHELVES[1], SHELVES[2]]
    rig.plan([*lower, {"shelf_id": "A-01", "sku": "MILK", "gtin": MILK, "facings": 1, "min_on_shelf": 0}])
    assert [type(a).__name__ for a in rig.alerts[2:]] == ["AlertCleared", "AlertCleared"]
    assert {a.details["cause"] for a in rig.alerts[2:]} == {"count", "planogram"}
    rig.window("A-01", {}, departed=(epc(1),))  # TEA now empty: below the new minimum of 1
    rig.plan(SHELVES[1:])  # A-01 no longer watched: its alert ends, its tags are forgotten
    assert [type(a).__name__ for a in rig.alerts[4:]] == ["AlertRaised", "AlertCleared"]
    assert rig.alerts[5].details["cause"] == "planogram"
    rig.window("A-01", {epc(5): SOAP}, departed=(epc(1),))
    assert len(rig.alerts) == 6
    stored = rig.conn.execute("SELECT data FROM rule_state WHERE rule_id='shrink'").fetchall()
    assert all("pending" not in orjson.loads(d) for (d,) in stored)


def test_old_planograms_stay_valid_and_new_fields_are_checked() -> None:
    Planogram.model_validate(
        {"shelves": [{"shelf_id": "A-01", "sku": "TEA", "facings": 4, "min_on_shelf": 2}]}
    )
    bad = [
        {"shelf_id": "A-01", "sku": "TEA", "facings": 4, "min_on_shelf": 2, "gtin": "12345"},
        {"shelf_id": "A-01", "sku": "TEA", "facings": 4, "min_on_shelf": 2, "reader": "a/b"},
    ]
    for shelf in bad:
        with pytest.raises(ValueError):
            Planogram.model_validate({"shelves": [shelf]})
    twice = [dict(SHELVES[0]), dict(SHELVES[0], sku="TEA-2")]
    with pytest.raises(ValueError, match="shelf_id, gtin"):
        Planogram.model_validate({"shelves": twice})


def test_rules_check_takes_the_shelf_rules_of_the_docs(tmp_path: Path) -> None:
    """Every ``rules:`` example of the docs passes ``store-gateway rules check``, the shelf rules' among them."""
    from tests.gateway.test_cli import SCRIPT
    from tests.system.test_readme import yaml_examples

    examples = yaml_examples("rules:")
    shelf_types = {"shelf_low", "shelf_empty", "possible_shrink", "misplaced"}
    assert any(all(t in text for t in shelf_types) for _, text in examples)
    for n, (where, text) in enumerate(examples):
        path = tmp_path / f"rules-{n}.yaml"
        path.write_text(text)
        result = subprocess.run(
            [SCRIPT, "rules", "check", str(path)], capture_output=True, text=True, check=False
        )
        assert (result.returncode, result.stdout[:3]) == (0, "OK:"), (where, result.stdout)


async def test_in_a_real_journal_a_planogram_from_hq_and_a_readers_windows_raise_and_clear(
    tmp_path: Path,
) -> None:
    """The runtime's wiring: HQ's planogram.set stored through the journal, the reader's windows as drafts."""
    from gateway.ledger.commands import store_document
    from rules.clock import RuleClock
    from tests.gateway.test_journal import flushed, new_journal, query, running, until

    def window(*ns: int) -> Draft:
        body = {
            "window_s": 10,
            "reads": len(ns),
            "tags": [{"epc": epc(n), "gtin": TEA, "reads": 1} for n in ns],
        }
        return Draft("rfid.inventory", "A-01", orjson.dumps(body), driver="mqtt")

    rules = [RULE.validate_python({"id": "empty", "type": "shelf_empty"})]
    engine = RuleEngine(rules, RuleClock(lambda: True), planogram=planogram)
    journal = new_journal(tmp_path, processors=[engine])
    async with running(journal):
        journal.submit(window())  # no planogram yet: not watched
        await flushed(journal)
        assert await store_document(
            journal, "req-plan-1", Planogram.model_validate({"shelves": SHELVES})
        ) == (
            "ok",
            {"version": 1, "count": 3},
        )
        journal.submit(window())
        await until(lambda: journal.last_seq >= 4, "the empty shelf raises")
        journal.submit(window(1, 2))
        await until(lambda: journal.last_seq >= 6, "the refilled shelf clears")
    rows = query(journal, "SELECT kind, device_id, body FROM events ORDER BY seq")
    assert [kind for kind, _, _ in rows] == [
        "rfid.inventory",
        "document.updated",
        "rfid.inventory",
        "alert.raised",
        "rfid.inventory",
        "alert.cleared",
    ]
    raised = orjson.loads(rows[3][2])["data"]
    assert (rows[3][1], raised["subject"], raised["details"]["alert_id"]) == (
        None,
        f"A-01/{TEA}",
        f"empty/A-01/{TEA}/1",
    )


def test_the_gateways_downtime_does_not_run_out_a_sale_window(shelves_at: Any, time: Time) -> None:
    """The tills' sales made while the gateway was down arrive after it starts: each waiting departure waits for
    them a little longer."""
    rules = [{"id": "shrink", "type": "possible_shrink", "sale_window_s": 600}]
    rig = shelves_at(rules, SHELVES)
    rig.window("A-01", tea(1, 2))
    rig.window("A-01", tea(2), departed=(epc(1),))
    rig.conn.close()
    time.advance(900)  # down past the window's end
    rig = shelves_at(rules)
    rig.tick()
    rig.sale("TEA")  # sold while the gateway was down, delivered now
    time.advance(601)
    rig.tick()
    assert rig.alerts == []


def test_a_departed_tag_another_reader_sees_in_time_moved_and_is_no_shrink(
    shelves_at: Any, time: Time
) -> None:
    shelves = [*SHELVES, {"shelf_id": "D-01", "sku": "TEA", "gtin": TEA, "facings": 2, "min_on_shelf": 1}]
    rig = shelves_at([{"id": "shrink", "type": "possible_shrink", "sale_window_s": 600}], shelves)
    rig.window("A-01", tea(1, 2, 3))
    rig.window("A-01", {}, departed=(epc(1), epc(2), epc(3)))
    rig.window("D-01", tea(1))  # tea's other shelf
    rig.window("rfid-7", {epc(2): TEA, epc(10): MILK})  # left on the milk shelf
    time.advance(601)
    rig.tick()
    assert [(a.subject, a.details["epcs"]) for a in rig.alerts] == [(f"A-01/{TEA}", [epc(3)])]


def test_a_sale_before_the_reader_reports_the_departure_accounts_for_it_within_the_window(
    shelves_at: Any, time: Time
) -> None:
    rig = shelves_at([{"id": "shrink", "type": "possible_shrink", "sale_window_s": 600}], SHELVES)
    rig.window("A-01", tea(1, 2, 3))
    rig.sale("TEA", quantity="2")  # paid for before the reader's departure time passed
    time.advance(120)
    rig.window("A-01", tea(3), departed=(epc(1),))
    rig.window("A-01", tea(3), departed=(epc(2),))
    time.advance(601)
    rig.tick()
    rig.window("A-01", {}, departed=(epc(3),))  # the sale's window has ended: this one is unaccounted for
    time.advance(601)
    rig.tick()
    assert [a.details["epcs"] for a in rig.alerts] == [[epc(3)]]


def test_a_gateway_restarting_often_still_raises_a_departure_nobody_paid_for(
    shelves_at: Any, time: Time
) -> None:
    """Restarts every 5 minutes against a 10-minute window: each start gives a waiting departure 2 more minutes,
    not a whole window, so it still raises."""
    rules = [{"id": "shrink", "type": "possible_shrink", "sale_window_s": 600}]
    rig = shelves_at(rules, SHELVES)
    rig.window("A-01", tea(1, 2))
    rig.window("A-01", tea(2), departed=(epc(1),))
    for _ in range(3):
        time.advance(300)
        rig.conn.close()
        rig = shelves_at(rules)
        rig.tick()
    time.advance(121)
    rig.tick()
    assert [(a.subject, a.details["epcs"]) for a in rig.alerts] == [(f"A-01/{TEA}", [epc(1)])]
