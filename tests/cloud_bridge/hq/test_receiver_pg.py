"""Several HQ receivers sharing the load: one mosquitto with a shared subscription, one real PostgreSQL."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cloud_bridge.hq.model import StoreUnavailableError
from cloud_bridge.hq.postgres import PostgresReceiverStore
from cloud_bridge.hq.receiver import receiver_main
from tests.cloud_bridge.hq.test_receiver import (
    Protocol,
    batch,
    batch_bytes,
    check_export,
    eventually,
    fill_for_export,
    make_receiver,
    publish,
    publisher,
    running,
)
from tests.harness.brokers import Mosquitto
from tests.harness.pg import PostgresServer, session_server

GATEWAYS = ("gw-1", "gw-2", "gw-3", "gw-4")
PROTOCOLS: tuple[Protocol, Protocol] = ("5", "3.1.1")
"""One receiver of each MQTT version in the same share group: mosquitto shares across both."""


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


async def test_two_receivers_split_the_batches_and_store_each_event_once(
    hq_broker: Mosquitto, postgres: PostgresServer
) -> None:
    dsn = postgres.fresh_schema()
    stores = [PostgresReceiverStore(dsn), PostgresReceiverStore(dsn)]
    got: Counter[str] = Counter()
    receivers = [
        make_receiver(
            hq_broker,
            store,
            client_id=f"hq-{name}",
            protocol=protocol,
            share_group="hq-receivers",
            on_batch=lambda *args, name=name: got.update([name]),
        )
        for store, name, protocol in zip(stores, ("a", "b"), PROTOCOLS, strict=True)
    ]
    payloads = [
        (gw, batch_bytes("hk-001", gw, range(first, first + 25), complete_through=first - 1))
        for first in range(1, 501, 25)
        for gw in GATEWAYS
    ]
    try:
        async with running(receivers[0]), running(receivers[1]), publisher(hq_broker) as pub:
            for gw, payload in payloads:
                await publish(pub, "hk-001", gw, payload)
            for gw, payload in payloads[:10]:  # a reconnecting gateway sends some again
                await publish(pub, "hk-001", gw, payload)
            await eventually(lambda: sum(got.values()) == len(payloads) + 10, "every batch stored by someone")
        assert got["a"] > 0
        assert got["b"] > 0
        assert stores[0].count() == 2000
        rows = stores[1].summary()
        assert [r.gateway_id for r in rows] == list(GATEWAYS)
        for row in rows:
            assert (row.events, row.max_seq, row.missing, row.conflicts) == (500, 500, 0, 0)
        assert sum(r.duplicates for r in rows) == 250
    finally:
        for store in stores:
            store.close()


def test_a_lost_connection_is_retried_then_reconnected(postgres: PostgresServer) -> None:
    dsn = postgres.fresh_schema()
    store = PostgresReceiverStore(dsn)
    try:
        store.store_batch("hk-001", "gw-1", batch("hk-001", "gw-1", [1, 2]))
        with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = 'postgres' AND backend_type = 'client backend'"
                " AND query NOT ILIKE '%pg_terminate_backend%'"
            )
        with pytest.raises(StoreUnavailableError):
            store.store_batch("hk-001", "gw-1", batch("hk-001", "gw-1", [3]))
        store.store_batch("hk-001", "gw-1", batch("hk-001", "gw-1", [3]))  # reconnected
        assert store.count() == 3
    finally:
        store.close()


def test_report_on_postgres(postgres: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = postgres.fresh_schema()
    store = PostgresReceiverStore(dsn)
    store.store_batch("hk-001", "gw-1", batch("hk-001", "gw-1", [1, 4], complete_through=3))
    store.close()
    assert receiver_main(["--postgres", dsn, "--report", "--lost-grace", "0"]) == 2
    assert "lost hk-001/gw-1: 2..3" in capsys.readouterr().out
    assert receiver_main(["--postgres", "host=127.0.0.1 port=1 connect_timeout=1", "--report"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hq-receiver: cannot open the PostgreSQL database")
    assert err.count("\n") == 1


def test_export_on_postgres(postgres: PostgresServer, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    dsn = postgres.fresh_schema()
    fill_for_export(PostgresReceiverStore(dsn))
    check_export(["--postgres", dsn], capsysbinary)


def _socket_options(store: PostgresReceiverStore) -> tuple[int, int, int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT) of the store's connection."""
    sock = socket.socket(fileno=socket.dup(store._conn.pgconn.socket))
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
    finally:
        sock.close()


def test_the_connection_has_tcp_keepalives_unless_the_dsn_says_otherwise(postgres: PostgresServer) -> None:
    """A vanished database host sends no reset: keepalives and a TCP user timeout end the connection."""
    dsn = postgres.fresh_schema()
    store = PostgresReceiverStore(dsn)
    try:
        assert _socket_options(store) == (1, 30, 10, 3, 60_000)
    finally:
        store.close()
    store = PostgresReceiverStore(f"{dsn} keepalives_idle=7 tcp_user_timeout=9000")
    try:
        assert _socket_options(store) == (1, 7, 10, 3, 9000)
    finally:
        store.close()


def test_a_server_that_fails_to_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """The harness (tests/harness/pg.py): a start that fails (no initdb where it looks) leaves no directory."""
    server = PostgresServer(tmp_path / "no-such-bin")
    with pytest.raises(OSError):
        server.start()
    assert not server.dir.exists()
    assert server.proc is None
