"""Run ``store-gateway`` with its wall clock stepped at will, without touching the machine's clock (that would
disturb everything else on it):

    python tests/harness/wall_step.py OFFSET_FILE run --config store.yaml

``time.time()`` and ``time.time_ns()`` in the gateway process return the real time plus the number of seconds in
``OFFSET_FILE`` (read again at most every 50 ms): write ``3600`` to step the clock forward an hour, ``0`` to step it
back (write the file atomically: :func:`step`). That is what NTP's step does to the readers of the wall clock
that matter to timers: the rules' clock, the journal's ``recorded_at``, command signatures. The monotonic clock is
left alone, as the kernel leaves it. ``datetime.now`` is C code that reads the clock itself and is not stepped, so
a few stamps stay on the real time: the device registry's ``last_seen``, documents' ``updated_at``, command
answers' stamps. No timer reads them.

The shim is put in place before the gateway is imported, so defaults bound at import time (``wall=time.time``)
see it too.
"""

from __future__ import annotations

import contextlib
import os
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
            with contextlib.suppress(
                OSError, ValueError
            ):  # unreadable or half-written: the last offset holds
                text = path.read_text().strip()
                if text:
                    state["offset"] = float(text)
        return state["offset"]

    time.time = lambda: real_time() + offset()
    time.time_ns = lambda: real_time_ns() + int(offset() * 1e9)


def step(path: Path, offset_s: float) -> None:
    """Set the offset, atomically (a reader never sees the file half-written)."""
    part = path.with_name(path.name + ".part")
    part.write_text(f"{offset_s}\n")
    os.replace(part, path)


def main() -> int:
    install(Path(sys.argv[1]))
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
