"""A black-holed HQ link (a NAT or router that silently stops forwarding, without closing anything) is
detected by MQTT keepalive and recovered from, and nothing committed is lost."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.kernel.journal import Draft
from gateway.runtime import Gateway
from tests.harness.brokers import Mosquitto, free_port


class BlackholeProxy:
    """TCP proxy on loopback; ``blackhole()`` keeps every connection open but stops forwarding bytes."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self.forwarding = True
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def blackhole(self) -> None:
        self.forwarding = False

    def restore(self) -> None:
        self.forwarding = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]
        alive = [self.forwarding]  # a connection that met the black hole stays dead (its NAT state is gone)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    alive[0] = alive[0] and self.forwarding
                    if alive[0]:
                        dst.write(data)
                        await dst.drain()
                    # else: swallowed, and the connection stays open: a black hole

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.slow
async def test_a_black_holed_hq_link_is_detected_and_recovered(hq_broker: Mosquitto, tmp_path: Path) -> None:
    proxy = BlackholeProxy(hq_broker.port)
    await proxy.start()
    config = GatewayConfig.model_validate(
        {
            "gateway_id": "gw-1",
            "store": {"id": "s-1", "name": "S"},
            "data_dir": str(tmp_path / "data"),
            "store_broker": {"port": free_port()},  # no store broker: this test is about HQ
            "hq": {"port": proxy.port, "keepalive_s": 5},
            "api": {"enabled": False},
        }
    )
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await _until(lambda: gateway.uplink.connected and gateway.journal.delivered_seq >= 1, 20)
        proxy.blackhole()
        for i in range(5):  # committed while the link is a black hole
            gateway.journal.submit(Draft("gateway.status", None, b'{"status":"online","version":"%d"}' % i))
        await gateway.journal.flush()
        # Detection within 2 x keepalive (10 s here) plus the 1 s keepalive tick; generous deadline.
        await _until(lambda: not gateway.uplink.connected, 20)
        await asyncio.sleep(3)  # reconnects into the black hole fail too (no CONNACK): still not connected
        assert gateway.journal.delivered_seq < gateway.journal.last_seq
        proxy.restore()
        await _until(lambda: gateway.journal.delivered_seq >= gateway.journal.last_seq, 40)
        assert proxy.connections >= 2
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await proxy.close()


async def _until(condition: object, deadline_s: float) -> None:
    assert callable(condition)
    async with asyncio.timeout(deadline_s):
        while not condition():  # noqa: ASYNC110 - polling state that other tasks change
            await asyncio.sleep(0.1)
