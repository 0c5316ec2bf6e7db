"""Slowloris against the local API: real raw sockets against the real uvicorn server on a loopback port.

64 sockets that send one request line and go silent used to fill uvicorn's ``limit_concurrency``, and /health
and every webhook answered 503 for as long as they stayed open. The attackers connect from other loopback
addresses (127.0.0.0/8 is all local on Linux) than the clients that must still be served, as they would from
other hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import httpx
from fastapi import APIRouter, Request, Response
from prometheus_client import generate_latest
from starlette.requests import ClientDisconnect

from gateway.api import MAX_CONNECTIONS_PER_CLIENT, ConnectionLimits, create_app, serve_api
from gateway.kernel.metrics import Metrics
from tests.drivers.test_http_intake import WATER, post, sale_for, webhook_gateway
from tests.gateway.test_api import TOKEN, Health, make_journal
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import metric_sum, own_metrics, parse_metrics, poll_until

ATTACKERS: Final = 64
REQUEST_LINE: Final = b"POST /webhooks/web-shop HTTP/1.1\r\n"

Socket = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def silent_sockets(port: int, sources: list[str], first_bytes: bytes = REQUEST_LINE) -> list[Socket]:
    """One raw connection from each source address, each sending ``first_bytes`` and then nothing."""
    sockets: list[Socket] = []
    for source in sources:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        if first_bytes:
            writer.write(first_bytes)
            await writer.drain()
        sockets.append((reader, writer))
    return sockets


async def close_all(sockets: list[Socket]) -> None:
    """Close the test's sockets; the server may have reset them already (that is what it does to slow clients)."""
    for _, writer in sockets:
        with contextlib.suppress(OSError):
            writer.close()
            await writer.wait_closed()


def api_metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metric_sum(parse_metrics(generate_latest(metrics.registry).decode()), name, **labels)


@contextlib.asynccontextmanager
async def api(tmp_path: Path, limits: ConnectionLimits) -> AsyncIterator[tuple[int, Metrics]]:
    """The API on a free loopback port with ``limits``, and a webhook-like route that reads its body."""

    async def read_body(request: Request) -> Response:
        try:
            return Response(b"%d" % len(await request.body()))
        except ClientDisconnect:
            return Response(status_code=408)

    router = APIRouter()
    router.add_api_route("/webhooks/echo", read_body, methods=["POST"])
    make_journal(tmp_path / "journal.db").close()
    metrics = Metrics()
    app = create_app(tmp_path / "journal.db", TOKEN, metrics, Health(), routers=[router])
    started = asyncio.Event()
    port: list[int] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(serve_api(app, "127.0.0.1", 0, started, port, limits=limits), name="api")
        async with asyncio.timeout(10):
            await started.wait()
        yield port[0], metrics
        task.cancel()


async def answer_of(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(30):  # a deadline for a hung test, not a timing assertion
        return await reader.read()


async def test_64_silent_sockets_from_one_address_leave_health_and_webhooks_working(
    tmp_path: Path, store_broker: Mosquitto, hq_broker: Mosquitto
) -> None:
    async with webhook_gateway(tmp_path, store_broker, hq_broker) as (gateway, client):
        port = await gateway.wait_api()
        attack = await silent_sockets(port, ["127.0.0.2"] * ATTACKERS)
        try:
            evicted = ATTACKERS - MAX_CONNECTIONS_PER_CLIENT
            await poll_until(
                lambda: metric_sum(own_metrics(gateway), "storegw_api_connections_dropped_total") >= evicted,
                f"{evicted} of the attacker's connections evicted",
                state=lambda: own_metrics(gateway),
            )
            health = await client.get("/health")
            assert health.status_code == 200, health.text
            reply = await post(client, "web-shop", sale_for("web-shop", 1, [(WATER, 1)]))
            assert (reply.status_code, reply.json()["status"]) == (200, "committed")
            metrics = own_metrics(gateway)
            # Each connection past the address's share took the slot of its own oldest silent one.
            assert metric_sum(metrics, "storegw_api_connections_dropped_total", reason="evicted") == evicted
            assert metric_sum(metrics, "storegw_api_connections_dropped_total", reason="full") == 0
        finally:
            await close_all(attack)


async def test_silent_sockets_from_many_addresses_give_way_to_a_request(tmp_path: Path) -> None:
    limits = ConnectionLimits(idle_timeout_s=600, request_timeout_s=600)  # only eviction can free a slot here
    async with api(tmp_path, limits) as (port, metrics):
        attack = await silent_sockets(port, [f"127.0.1.{n}" for n in range(1, ATTACKERS + 1)])
        try:
            await poll_until(
                lambda: api_metric(metrics, "storegw_api_connections") == ATTACKERS, "every slot taken"
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health")).status_code == 200
                reply = await client.post("/webhooks/echo", content=b"x" * 1000)
                assert (reply.status_code, reply.text) == (200, "1000")
            # The oldest silent connection made room, and heard why it was closed.
            assert (await answer_of(attack[0][0])).startswith(b"HTTP/1.1 408 ")
            assert api_metric(metrics, "storegw_api_connections_dropped_total", reason="evicted") == 1
        finally:
            await close_all(attack)


async def test_silent_or_trickling_requests_lose_their_slot(tmp_path: Path) -> None:
    # The trickle sends a byte every 0.05 s: well inside the idle deadline even on a loaded CI machine.
    limits = ConnectionLimits(idle_timeout_s=1.0, request_timeout_s=2.0)
    async with api(tmp_path, limits) as (port, metrics):
        (quiet,) = await silent_sockets(port, ["127.0.0.2"], b"")
        (line,) = await silent_sockets(port, ["127.0.0.3"])
        (body,) = await silent_sockets(
            port,
            ["127.0.0.4"],
            b"POST /webhooks/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789",
        )
        trickle_reader, trickle_writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.5", 0)
        )

        async def trickle() -> None:
            """One byte of a header every 0.05 s: never idle, never done."""
            for byte in b"GET /health HTTP/1.1\r\nx-slow: " + b"a" * 10_000:
                trickle_writer.write(bytes([byte]))
                await trickle_writer.drain()
                await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        try:
            assert await answer_of(quiet[0]) == b""  # nothing of a request came: closed without an answer
            assert (await answer_of(line[0])).startswith(b"HTTP/1.1 408 ")
            assert (await answer_of(body[0])).startswith(b"HTTP/1.1 408 ")
            assert (await answer_of(trickle_reader)).startswith(b"HTTP/1.1 408 ")
            await poll_until(
                lambda: api_metric(metrics, "storegw_api_connections") == 0, "every connection closed"
            )
            assert api_metric(metrics, "storegw_api_connections_dropped_total", reason="idle") == 3
            assert api_metric(metrics, "storegw_api_connections_dropped_total", reason="too_slow") == 1
            # A request that arrives in time is still answered, on a connection kept alive in between.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health")).status_code == 200
                reply = await client.post("/webhooks/echo", content=b"y" * 70_000)
                assert (reply.status_code, reply.text) == (200, "70000")
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
            await close_all([quiet, line, body, (trickle_reader, trickle_writer)])
