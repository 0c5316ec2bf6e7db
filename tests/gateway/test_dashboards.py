"""The Grafana dashboards against real peers: every metric the store dashboard's panels name is on a running gateway's
``/metrics``; every SQL query of the HQ dashboard runs on a real PostgreSQL filled by the HQ receiver's store, and
returns rows; the monitoring compose file's images are pinned by the technician, and its provisioning matches the
dashboards' data sources."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cloud_bridge.hq.postgres import PostgresReceiverStore
from tests.cloud_bridge.hq.test_receiver import batch_of, envelope
from tests.harness.brokers import Mosquitto
from tests.harness.e2e_helpers import API_TOKEN, gateway_process
from tests.harness.pg import PostgresServer, session_server

DOCKER = Path(__file__).resolve().parents[2] / "docker"
STORE_DASHBOARD = DOCKER / "monitoring" / "grafana" / "dashboards" / "store.json"
HQ_DASHBOARD = DOCKER / "hq" / "grafana" / "hq-dashboard.json"
METRIC = re.compile(r"\bstoregw_[a-z_]+\b")


def targets(dashboard: Path) -> list[dict[str, Any]]:
    panels = orjson.loads(dashboard.read_bytes())["panels"]
    found = [target for panel in panels for target in panel["targets"]]
    assert found, f"{dashboard.name} has no queries"
    return found


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


@pytest.mark.slow
async def test_every_metric_the_store_dashboard_names_is_on_a_running_gateway(
    store_broker: Mosquitto, hq_broker: Mosquitto, tmp_path: Path
) -> None:
    named = {name for target in targets(STORE_DASHBOARD) for name in METRIC.findall(target["expr"])}
    gateway = gateway_process(tmp_path, store_broker, hq_broker)
    gateway.start()
    try:
        await gateway.wait_healthy()
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                f"{gateway.base_url}/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"}
            )
        assert answer.status_code == 200
    finally:
        assert await gateway.terminate() == 0
        gateway.close()
    exposed: set[str] = set()
    for family in text_string_to_metric_families(answer.text):
        # The names a query may use: a counter's with _total, a histogram's series, a gauge's own.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            family.type, ("",)
        )
        exposed |= {family.name + suffix for suffix in suffixes}
    assert sorted(named - exposed) == []
    for wanted in ("storegw_device_events", "storegw_outbox_oldest_age_seconds", "storegw_alerts"):
        assert any(name.startswith(wanted) for name in named), f"the dashboard shows {wanted}"


def grafana_macros(sql: str) -> str:
    """The two macros the HQ dashboard uses, expanded as Grafana's PostgreSQL data source writes them (a range of
    the last 7 days, as literal timestamps; hourly buckets in epoch seconds)."""
    now = datetime.now(UTC) + timedelta(seconds=1)  # Grafana's "now" is when the panel asks: after the events
    start, end = (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"), now.strftime("%Y-%m-%dT%H:%M:%SZ")
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 BETWEEN '{start}' AND '{end}'", sql)
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*1h\)", r'floor(extract(epoch from \1)/3600)*3600 AS "time"', sql
    )
    assert "$__" not in sql, f"a Grafana macro the test does not expand: {sql}"
    return sql


def fill(dsn: str) -> None:
    """Two stores as the receiver stores them: sales, an alert, a gap the gateway explained (outbox.evicted) and
    one it did not, and a gateway whose newest event was recorded before its clock synchronised."""
    store = PostgresReceiverStore(dsn)
    try:
        sale = {"receipt_no": "R-1", "totals": {"total": "12.50", "currency": "HKD"}}
        alert = {
            "rule": "temperature",
            "severity": "warning",
            "subject": "fridge-1",
            "message": "fridge-1: above 8 °C for 10 min",
            "details": {"alert_id": "dairy-warm/fridge-1/1"},
        }
        evicted = {"ranges": [[6, 7], [8, 9]], "reason": "disk_budget"}  # two eviction steps, one gap
        one = [
            envelope("hk-001", "gw-1", 1, kind="gateway.status", data={"status": "online"}),
            envelope("hk-001", "gw-1", 2, kind="pos.sale", data=sale),
            envelope("hk-001", "gw-1", 3, kind="pos.sale", data={**sale, "receipt_no": "R-2"}),
            envelope("hk-001", "gw-1", 4, kind="alert.raised", data=alert),
            envelope("hk-001", "gw-1", 5, kind="pos.sale", data={**sale, "receipt_no": "R-3"}),
            envelope("hk-001", "gw-1", 10, kind="outbox.evicted", data=evicted),
        ]
        two = [  # seqs 1 and 2 never came: a gap before the first seq HQ has
            envelope("hk-002", "gw-2", 3, kind="pos.sale", data=sale),
            envelope("hk-002", "gw-2", 4, kind="pos.sale", data={**sale, "receipt_no": "R-9"}),
            envelope(
                "hk-002", "gw-2", 7, kind="gateway.status", data={"status": "online"}, clock_synced=False
            ),
        ]
        for store_id, gateway_id, bodies in (("hk-001", "gw-1", one), ("hk-002", "gw-2", two)):
            store.store_batch(store_id, gateway_id, batch_of(store_id, gateway_id, bodies))
    finally:
        store.close()


@pytest.mark.slow
def test_every_query_of_the_hq_dashboard_runs_on_the_receivers_postgresql_and_returns_rows(
    postgres: PostgresServer,
) -> None:
    dsn = postgres.fresh_schema()
    fill(dsn)
    queries = [target["rawSql"] for target in targets(HQ_DASHBOARD)]
    with psycopg.connect(dsn) as conn:
        gaps: list[tuple[Any, ...]] = []
        for query in queries:
            rows = conn.execute(grafana_macros(query)).fetchall()  # type: ignore[call-overload]
            assert rows, f"no rows: {query}"
            if "FROM runs" in query:
                gaps = rows
    # (store, first, last, missing, explained): one gap explained by two adjacent ranges, one not at all, one
    # before the first seq HQ has.
    assert {(r[0], r[2], r[3], r[4], r[5]) for r in gaps} == {
        ("hk-001", 6, 9, 4, 4),
        ("hk-002", 1, 2, 2, 0),
        ("hk-002", 5, 6, 2, 0),
    }


def test_the_monitoring_compose_file_pins_its_images_and_matches_the_dashboards() -> None:
    compose = yaml.safe_load((DOCKER / "compose.monitoring.yaml").read_text())
    for name, service in compose["services"].items():
        assert service["profiles"] == ["monitoring"], name
        image = service["image"]
        # The technician names the image, pinned by digest: compose refuses to start without it.
        assert re.fullmatch(r"\$\{[A-Z_]+:\?set [A-Z_]+ to \S+ pinned by digest .*\}", image), image
        assert "healthcheck" in service, name
        assert {"max-size", "max-file"} <= set(service["logging"]["options"]), name
    grafana = compose["services"]["grafana"]
    assert all(port.startswith("127.0.0.1:") for port in grafana["ports"])
    assert "ports" not in compose["services"]["prometheus"]
    scrape = yaml.safe_load((DOCKER / "monitoring" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == "/run/secrets/prometheus_api_token"
    source = yaml.safe_load(
        (DOCKER / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    uids = {target["datasource"]["uid"] for target in targets(STORE_DASHBOARD)}
    assert uids == {source["uid"]}
    assert {target["datasource"]["uid"] for target in targets(HQ_DASHBOARD)} == {"hq-postgres"}
