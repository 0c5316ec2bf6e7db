"""A lean MQTT 3.1.1 QoS 1 publisher for benchmarks: pre-encoded PUBLISH packets, a PUBACK window.

paho's Python publisher tops out near 7,000 msg/s on this machine and would share the 2 cores with the
gateway under test; this one costs a few microseconds per message, so the benchmark measures the gateway.
It is real MQTT on a real socket: mosquitto is the peer, and every message counts only once PUBACKed.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _utf8(topic) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _remaining_length(len(body)) + body


async def publish_all(
    host: str, port: int, client_id: str, messages: Sequence[tuple[str, bytes]], window: int = 500
) -> tuple[float, float, int]:
    """Publish every (topic, payload) with QoS 1; returns (first send, last PUBACK) monotonic times, acked count."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet(client_id))
    await writer.drain()
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {connack!r}")
    acked = 0
    credit = asyncio.Semaphore(window)
    done = asyncio.Event()
    total = len(messages)

    async def read_acks() -> None:
        nonlocal acked
        buf = b""
        while acked < total:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
            while len(buf) >= 4:
                if buf[0] != 0x40:
                    raise RuntimeError(f"unexpected packet 0x{buf[0]:02x}")
                buf = buf[4:]
                acked += 1
                credit.release()
        done.set()

    ack_task = asyncio.create_task(read_acks())
    first = time.monotonic()
    for i, (topic, payload) in enumerate(messages):
        await credit.acquire()
        writer.write(publish_packet(topic, payload, i % 65535 + 1))
        if i % 64 == 0:
            await writer.drain()
    await writer.drain()
    await done.wait()
    last = time.monotonic()
    await ack_task
    writer.write(b"\xe0\x00")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    return first, last, acked
