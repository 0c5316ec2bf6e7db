"""Run ``store-gateway`` with its wall clock stepped at will, without touching the machine's clock (that would
disturb everything else on it):

    python tests/harness/wall_step.py OFFSET_FILE run --config store.yaml

``time.time()`` and ``time.time_ns()`` in the gateway process return the real time plus the number of seconds in
``OFFSET_FILE`` (read again at most every 50 ms): write ``3600`` to step the clock forward an hour, ``0`` to step it
back. That is what NTP's step does to every reader of the wall clock (the rules' clock, the journal's
``recorded_at``, command signatures). The monotonic clock is left alone, as the kernel leaves it. (``datetime.now``
is C code that reads the clock itself and is not stepped; the gateway's timers do not read it.)

The shim is put in place before the gateway is imported, so defaults bound at import time (``wall=time.time``)
see it too.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path


def install(path: Path) -> None:
    real_time, real_time_ns, monotonic = time.time, time.time_ns, time.monotonic
    state = {"offset": 0.0, "read_at": -1.0}

    def offset() -> float:
        now = monotonic()
        if now - state["read_at"] >= 0.05:
            state["read_at"] = now
            with contextlib.suppress(OSError, ValueError):  # being rewritten: the last offset holds
                state["offset"] = float(path.read_text().strip() or 0)
        return state["offset"]

    time.time = lambda: real_time() + offset()
    time.time_ns = lambda: real_time_ns() + int(offset() * 1e9)


def main() -> int:
    install(Path(sys.argv[1]))
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
