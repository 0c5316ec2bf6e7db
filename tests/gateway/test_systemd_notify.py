"""systemd's ``Type=notify`` and ``WatchdogSec=`` with a real gateway process and a real datagram ``NOTIFY_SOCKET``:
READY=1 once the journal commits and the store broker's intake is connected; WATCHDOG=1 every half of
``WATCHDOG_USEC``; no ping while the journal's writer is wedged (another process holds the database's write lock),
pings again once it is healthy; STOPPING=1 at SIGTERM. The sensor reading sent while it was wedged is committed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.kernel.mqtt_client import MqttClient
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import broker_config, gateway_env, gateway_process, poll_until


class NotifySocket:
    """The socket systemd listens on: every datagram the gateway sends, in order."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sgn-"))  # a Unix socket's path must be short
        self.path = self.folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                raw = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in raw.decode().split("\n") if "=" in line)
            self.messages.append(fields)

    def index(self, key: str, value_start: str, after: int = -1) -> int | None:
        for i, message in enumerate(self.drain()):
            if i > after and message.get(key, "").startswith(value_start):
                return i
        return None

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def samples(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'sensor.sample'").fetchone()[0])


@pytest.mark.slow
async def test_ready_then_watchdog_pings_that_stop_while_the_writer_is_wedged(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path, notify: NotifySocket
) -> None:
    data_dir = tmp_path / "data"
    env = {**gateway_env(), "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    gateway = gateway_process(
        tmp_path, store_broker, hq_broker, env=env, devices=(), json_sensors=("fridge-1",)
    )
    sensor = MqttClient(broker_config(store_broker), "sensor-fridge", clean_start=True)
    gateway.start()
    try:
        await poll_until(lambda: notify.index("READY", "1") is not None, "READY=1", state=notify.drain)
        ready = notify.index("READY", "1")
        assert ready is not None
        assert notify.messages[ready]["STATUS"] == "running", "the store broker's intake was connected"
        assert not any("WATCHDOG" in m for m in notify.messages[:ready]), "no ping before READY=1"
        await poll_until(
            lambda: sum("WATCHDOG" in m for m in notify.drain()) >= 3, "three pings", state=notify.drain
        )

        # Another process takes the journal's write lock: the writer cannot commit the reading that comes next.
        journal = data_dir / "journal.db"
        holder = sqlite3.connect(journal, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            await sensor.connect()
            await sensor.publish("store/sensor/fridge-1/state", orjson.dumps({"temperature": 4.0}), qos=1)
            await poll_until(
                lambda: notify.index("STATUS", "not pinging the watchdog") is not None,
                "the gateway saying it stopped pinging",
                within=90,
                state=notify.drain,
            )
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        stopped = notify.index("STATUS", "not pinging the watchdog")
        assert stopped is not None
        await poll_until(
            lambda: notify.index("STATUS", "running", after=stopped) is not None,
            "the gateway saying it pings again",
            within=90,
            state=notify.drain,
        )
        healthy = notify.index("STATUS", "running", after=stopped)
        assert healthy is not None
        wedged = notify.messages[stopped + 1 : healthy]
        assert not any("WATCHDOG" in m for m in wedged), "no ping while the writer was wedged"
        await poll_until(
            lambda: any("WATCHDOG" in m for m in notify.drain()[healthy:]), "pings again", state=notify.drain
        )
        await poll_until(
            lambda: samples(journal) == 1, "the reading sent while the writer was wedged, committed"
        )

        assert await gateway.terminate() == 0
        await poll_until(lambda: notify.index("STOPPING", "1") is not None, "STOPPING=1", state=notify.drain)
    finally:
        with contextlib.suppress(Exception):
            await sensor.disconnect()
        gateway.close()
