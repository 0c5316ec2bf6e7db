"""Shared by the rule tests: the rules' clock moved by the test, and the engine on a real SQLite file."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from gateway.kernel.events import AlertCleared, AlertEscalated, AlertRaised, DeviceStatus, SensorSample
from gateway.kernel.pipeline import Event, Pipeline
from gateway.kernel.rule_config import RuleDefinition
from rules.clock import RuleClock
from rules.engine import RuleEngine
from tests.gateway.test_pipeline import Writer

RULE = TypeAdapter(RuleDefinition)


class Time:
    """The monotonic and wall clocks the rules' clock reads, moved by the test."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0
        self.synced = True
        self.boot = "boot-1"
        """The machine's boot: a test that reboots it changes this (and the monotonic clock starts elsewhere)."""

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def clock(self) -> RuleClock:
        return RuleClock(lambda: self.synced, lambda: self.mono, lambda: self.wall, lambda: self.boot)


class Rig:
    """A journal file, and the engine as the journal's writer runs it (one transaction per call)."""

    def __init__(self, path: Path, rules: list[dict[str, Any]], time: Time) -> None:
        self.path = path
        self.time = time
        self.seq = 0
        self.alerts: list[Any] = []
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.start(rules)

    def start(self, rules: list[dict[str, Any]]) -> None:
        defs = [RULE.validate_python(r) for r in rules]
        self.engine = RuleEngine(defs, self.time.clock(), wall=lambda: self.time.wall)
        self.pipeline = Pipeline([self.engine])
        self.pipeline.setup(self.conn)

    def _commit(self, work: Any) -> None:
        writer = Writer(self.seq)
        self.conn.execute("BEGIN IMMEDIATE")
        work(writer)
        self.conn.execute("COMMIT")
        self.pipeline.committed()
        self.seq = writer.last_seq
        self.alerts += [
            e.model
            for e in writer.emitted
            if isinstance(e.model, AlertRaised | AlertCleared | AlertEscalated)
        ]

    def sample(self, device: str = "fridge-1", **values: float) -> None:
        self.seq += 1
        model = SensorSample(values=values, source="dixell-xr")
        event = Event(self.seq, "sensor.sample", device, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))

    def status(self, status: str, device: str = "fridge-1") -> None:
        self.seq += 1
        model = DeviceStatus(status=status, reason="poll timed out" if status == "error" else None)  # type: ignore[arg-type]
        event = Event(self.seq, "device.status", device, model.model_dump_json().encode(), model)
        self._commit(lambda w: self.pipeline.run(self.conn, [event], w.append))

    def tick(self) -> None:
        self._commit(lambda w: self.pipeline.tick(self.conn, self.time.wall, w.append))

    def kinds(self) -> list[tuple[str, str]]:
        names = {AlertRaised: "raised", AlertCleared: "cleared", AlertEscalated: "escalated"}
        return [(names[type(a)], a.subject) for a in self.alerts]


@pytest.fixture
def time() -> Time:
    return Time()


@pytest.fixture
def rig_at(tmp_path: Path, time: Time) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(rules: list[dict[str, Any]]) -> Rig:
        rig = Rig(tmp_path / "journal.db", rules, time)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        with contextlib.suppress(sqlite3.Error):
            rig.conn.close()
