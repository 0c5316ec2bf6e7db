"""Alert latency at a steady load, with many rules loaded: the journal (a real SQLite file, synchronous=FULL),
the rule engine in its pipeline, 1,000 sensor samples a second from 200 fridges.

    python bench/rules_latency.py --rate 1000 --seconds 20 --rules 500

Every 0.2 s one fridge reads too warm. Half the fridges have a rule that raises at once (an event-driven alert: it
commits in the same transaction as the reading that triggered it), the other half one that raises after 3 s
above the limit (a timer, fired from the journal's ticks). Prints:

- for event-driven alerts: from the triggering reading's submit to the commit of the transaction holding it and
  its alert (p50, p99, max); the alert is always in its reading's own commit;
- for timer alerts: from the due time to the alert's commit (p50, p99, max);
- the submit-to-commit latency of all readings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import TypeAdapter  # noqa: E402

from gateway.kernel.clock import ClockState  # noqa: E402
from gateway.kernel.config import JournalConfig  # noqa: E402
from gateway.kernel.events import AlertRaised, SensorSample  # noqa: E402
from gateway.kernel.journal import QUEUE_LIMIT, Draft, Journal  # noqa: E402
from gateway.kernel.metrics import Metrics  # noqa: E402
from gateway.kernel.pipeline import Event, Processor  # noqa: E402
from gateway.kernel.rule_config import RuleDefinition  # noqa: E402
from rules.clock import RuleClock  # noqa: E402
from rules.engine import RuleEngine  # noqa: E402

DEVICES = 200
TIMER_S = 3.0
WARM_EVERY_S = 0.2


def rules(n: int) -> list[RuleDefinition]:
    """Per fridge: an immediate rule (even fridges) or a 3 s one (odd); the rest of the n are other devices'."""
    out: list[dict[str, object]] = []
    for i in range(DEVICES):
        for_s = 0 if i % 2 == 0 else TIMER_S
        out.append(
            {
                "id": f"warm-{i}",
                "type": "temperature",
                "max_c": 8,
                "for_s": for_s,
                "clear_for_s": 0,
                "select": {"devices": [f"fridge-{i}"]},
            }
        )
    others = [
        {"type": "door_open", "open_s": 180},
        {"type": "battery_low"},
        {"type": "controller_alarm"},
        {"type": "silent", "after_s": 900},
    ]
    for i in range(max(0, n - DEVICES)):
        out.append({**others[i % len(others)], "id": f"other-{i}", "select": {"devices": [f"logger-{i}"]}})
    return TypeAdapter(list[RuleDefinition]).validate_python(out)


class Probe(Processor):
    """After the engine: when each alert and each warm reading went through the pipeline (in its transaction)."""

    name = "probe"

    def __init__(self) -> None:
        self.warm_at: dict[str, float] = {}
        self.alerts: list[tuple[str, float]] = []

    def apply(self, event: Event) -> None:
        model = event.model
        if isinstance(model, SensorSample) and event.device_id not in self.warm_at:
            if (model.values.get("temperature") or 0) > 8:
                self.warm_at[str(event.device_id)] = time.monotonic()
        elif isinstance(model, AlertRaised):
            self.alerts.append((model.subject, time.monotonic()))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(rate: int, seconds: float, n_rules: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        metrics = Metrics()
        engine = RuleEngine(rules(n_rules), RuleClock(lambda: True))
        probe = Probe()
        journal = Journal(
            Path(folder) / "journal.db",
            "bench",
            "gw-1",
            JournalConfig(),
            metrics,
            [engine, probe],
            ClockState(override=True),
        )
        await journal.open()
        writer = asyncio.create_task(journal.run())
        submitted: dict[int, float] = {}
        committed: dict[int, float] = {}
        trigger: dict[str, int] = {}
        n = 0
        start = time.monotonic()
        next_warm = start
        warm = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate)
            while n < due:
                device = f"fridge-{n % DEVICES}"
                celsius = 4.0
                if now >= next_warm and device not in trigger and warm < DEVICES:
                    celsius, next_warm = 12.0, next_warm + WARM_EVERY_S
                    trigger[device] = n
                    warm += 1
                elif device in trigger and trigger[device] != n:
                    celsius = 12.0  # stays warm
                sample = SensorSample(values={"temperature": celsius}, source="bench")
                i = n

                def done(seq: int | None, i: int = i) -> None:
                    committed[i] = time.monotonic()

                submitted[i] = time.monotonic()
                draft = Draft("sensor.sample", device, sample.model_dump_json().encode(), sample, done=done)
                while not journal.submit(draft):  # the queue is full: wait for room, as a driver does
                    room = asyncio.Event()
                    journal.when_below(QUEUE_LIMIT, room.set)
                    await room.wait()
                n += 1
            await asyncio.sleep(0.005)
        await asyncio.sleep(TIMER_S + 2)  # the last timers fire
        await journal.flush()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()
    intake = [committed[i] - submitted[i] for i in committed]
    first_alert: dict[str, float] = {}
    for subject, at in probe.alerts:
        first_alert.setdefault(subject, at)
    event_driven, timers = [], []
    for device, i in trigger.items():
        if device not in first_alert or i not in committed:
            continue
        if int(device.split("-")[1]) % 2 == 0:
            # the alert is applied just before its transaction commits: its reading's commit is the alert's
            event_driven.append(committed[i] - submitted[i])
        else:
            timers.append(first_alert[device] - (probe.warm_at[device] + TIMER_S))
    missing = [d for d in trigger if d not in first_alert]
    print(f"{n} readings at {rate}/s for {seconds:.0f} s, {n_rules} rules; {len(trigger)} fridges went warm")
    for name, values in (
        ("reading submit -> commit", intake),
        ("event alert: trigger submit -> commit", event_driven),
        ("timer alert: due -> commit", timers),
    ):
        if values:
            print(
                f"{name}: p50 {statistics.median(values) * 1000:.1f} ms, p99 {pct(values, 0.99) * 1000:.1f} ms,"
                f" max {max(values) * 1000:.1f} ms (n={len(values)})"
            )
    print(f"warm fridges without an alert: {len(missing)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rules", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.rate, args.seconds, args.rules))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
