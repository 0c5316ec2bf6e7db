"""The rule engine alone: events per second of CPU with many rules loaded, and how that grows with rules.

    python bench/rules_engine.py --rules 500 --events 200000

Mixed rules (temperature, door_open, battery_low, controller_alarm, silent), each watching one of 200 devices,
plus a few that watch every device. The events are realistic fridge samples spread over the devices, fed to
the engine as the journal's writer feeds it (in commits of 500, on a real SQLite file, with the rules' state
written at each commit). Prints events/s per core (this process's CPU time) for the given number of rules and
for none, so the cost of unrelated rules shows.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import TypeAdapter  # noqa: E402

from gateway.kernel.events import SensorSample  # noqa: E402
from gateway.kernel.pipeline import Derived, Event, Pipeline  # noqa: E402
from gateway.kernel.rule_config import RuleDefinition  # noqa: E402
from rules.clock import RuleClock  # noqa: E402
from rules.engine import RuleEngine  # noqa: E402

DEVICES = 200
BATCH = 500


def rules(n: int) -> list[RuleDefinition]:
    kinds = [
        {"type": "temperature", "max_c": 8, "for_s": 600},
        {"type": "door_open", "open_s": 180},
        {"type": "battery_low"},
        {"type": "controller_alarm"},
        {"type": "silent", "after_s": 900},
    ]
    out = []
    for i in range(n):
        spec = dict(kinds[i % len(kinds)], id=f"r{i}")
        if i >= 5:  # the first five watch every device
            spec["select"] = {"devices": [f"fridge-{i % DEVICES}"]}
        out.append(spec)
    return TypeAdapter(list[RuleDefinition]).validate_python(out)


def events(n: int) -> list[Event]:
    rng = random.Random(7)
    out = []
    for seq in range(1, n + 1):
        values = {"temperature": round(rng.uniform(2, 9), 1), "door_open": float(rng.random() < 0.02)}
        values |= {"high_temp_alarm": 0.0, "battery_pct": 80.0}
        model = SensorSample(values=values, source="dixell-xr")
        out.append(Event(seq, "sensor.sample", f"fridge-{seq % DEVICES}", b"{}", model))
    return out


def run(n_rules: int, feed: list[Event]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        conn = sqlite3.connect(Path(folder) / "journal.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        engine = RuleEngine(rules(n_rules), RuleClock(lambda: True))
        pipeline = Pipeline([engine])
        pipeline.setup(conn)
        seq = len(feed)

        def append(derived: list[Derived]) -> list[Event]:
            nonlocal seq
            out = []
            for d in derived:
                seq += 1
                out.append(Event(seq, d.kind, d.device_id, d.data_json, d.model))
            return out

        start = time.process_time()
        for i in range(0, len(feed), BATCH):
            conn.execute("BEGIN IMMEDIATE")
            pipeline.run(conn, feed[i : i + BATCH], append)  # type: ignore[arg-type]
            conn.execute("COMMIT")
            pipeline.committed()
        cpu = time.process_time() - start
        conn.close()
    return len(feed) / cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", type=int, default=500)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    feed = events(args.events)
    for n in (0, args.rules):
        print(f"{n:>5} rules: {run(n, feed):>10,.0f} events/s per core (CPU time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
