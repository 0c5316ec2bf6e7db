"""What refusing duplicate JSON keys costs a till's sale decode (and the kiosk's), measured A/B on one core.

For each payload it times the decoder as it was without the check (A) and the candidate checks on top of it:

- ``A``: pydantic ``validate_json`` straight from the bytes (the sale decoder before the check);
- ``B``: A + ``orjson.loads`` + counting parsed keys against raw ``"<ws>:`` key endings, with a full
  duplicate-detecting parse only when they differ (what gateway/kernel/strict_json.py does);
- ``C``: A + ``json.loads(object_pairs_hook=...)`` on every message (the plain way);
- kiosk: ``decode_checkin`` as shipped (it parses with orjson already, so only the count is added) against the
  same without the check.

Rounds alternate A and B (and C) so drift on a busy machine hits both alike; time is this process's CPU time,
and the figure is the median of the rounds.

    python bench/duplicate_keys.py [--rounds 7] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench._common import decode_rate  # noqa: E402
from drivers.mqtt import checkin  # noqa: E402
from drivers.mqtt.decode import _ADAPTERS  # noqa: E402
from gateway.kernel import strict_json  # noqa: E402
from gateway.kernel.strict_json import has_duplicate_keys  # noqa: E402
from simulators.kiosk import Kiosk  # noqa: E402
from simulators.pos import PosTerminal  # noqa: E402


def _pairs_hook(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        raise ValueError("duplicate key")
    return out


def variants() -> dict[str, Callable[[bytes], object]]:
    sale = _ADAPTERS["pos.sale"]

    def a(payload: bytes) -> object:
        return sale.validate_json(payload)

    def b(payload: bytes) -> object:
        message = sale.validate_json(payload)
        if has_duplicate_keys(payload, orjson.loads(payload)):
            raise ValueError("duplicate key")
        return message

    def c(payload: bytes) -> object:
        message = sale.validate_json(payload)
        json.loads(payload, object_pairs_hook=_pairs_hook)
        return message

    return {"A validate_json": a, "B + orjson count": b, "C + json pairs hook": c}


def compare(
    title: str,
    runs: Mapping[str, Callable[[bytes], object]],
    payload: bytes,
    rounds: int,
    seconds: float,
    prepare: dict[str, Callable[[], None]] | None = None,
) -> None:
    per: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if prepare is not None:
                prepare[name]()
            per[name].append(1e6 / decode_rate(run, payload, seconds))
    base = statistics.median(per[next(iter(runs))])
    print(f"{title} ({len(payload)} B), median of {rounds} rounds:")
    for name, micros in per.items():
        mid = statistics.median(micros)
        print(f"  {name:<26} {mid:7.2f} us/decode  {100 * (mid - base) / base:+6.1f} %")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds (default 7)")
    parser.add_argument(
        "--seconds", type=float, default=0.5, help="time per variant per round (default 0.5 s)"
    )
    args = parser.parse_args()
    terminal = PosTerminal("till-01", seed=1, return_ratio=0)
    sales = [terminal.next_message().payload for _ in range(50)]
    typical = sorted(sales, key=len)[len(sales) // 2]
    compare("till sale, median size", variants(), typical, args.rounds, args.seconds)
    compare("till sale, largest of 50", variants(), max(sales, key=len), args.rounds, args.seconds)

    kiosk_payload = Kiosk("kiosk-01", seed=1).next_payload()
    real_check = strict_json.has_duplicate_keys

    def check_off() -> None:
        setattr(checkin, "has_duplicate_keys", lambda _payload, _doc: False)  # noqa: B010

    def check_on() -> None:
        setattr(checkin, "has_duplicate_keys", real_check)  # noqa: B010

    kiosk = {
        "kiosk without the check": checkin.decode_checkin,
        "kiosk with the check": checkin.decode_checkin,
    }
    prepare = {"kiosk without the check": check_off, "kiosk with the check": check_on}
    compare("kiosk check-in", kiosk, kiosk_payload, args.rounds, args.seconds, prepare)
    check_on()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
