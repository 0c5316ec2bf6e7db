"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): a few datagrams to ``$NOTIFY_SOCKET``.

The protocol is newline-separated ``KEY=value`` lines in one datagram to a Unix socket named by the environment
(a path, or an abstract name after ``@``): ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``. Without
``$NOTIFY_SOCKET`` (Docker, a terminal) every call does nothing. A send that fails is logged once and never
raises: the gateway's work does not depend on systemd hearing it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

_LOGGER = logging.getLogger(__name__)

MAX_STATUS: Final = 200
"""A ``STATUS=`` line is cut to this many characters (systemctl status shows one line)."""


class Notifier:
    """Tells systemd how the service is doing, if systemd asked (``$NOTIFY_SOCKET``)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_s = None if not watchdog_usec else watchdog_usec / 1_000_000
        """``WatchdogSec=`` in seconds (None: no watchdog asked for): a ping must arrive within it."""
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment describes. ``WATCHDOG_PID``, when set, must be this process."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False if there is no socket or the send failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, target)
        except OSError as err:
            if not self._warned:  # a socket gone away says so once, not every few seconds
                self._warned = True
                _LOGGER.warning("systemd notify socket %s: %s", self.address, err)
            return False
        self._warned = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status[:MAX_STATUS]}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status[:MAX_STATUS]}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status[:MAX_STATUS]}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
