"""Shared pieces of the outbox benchmarks (drain, startup_backlog, wire_size, sd_writes).

A gateway process on real mosquitto brokers, its /health and /metrics read over HTTP, simulated tills as a
separate process, a lean HQ subscriber that counts events per batch header, and a journal backlog built
in-process through the real :class:`gateway.kernel.journal.Journal` (real envelopes, stock ledger and outbox
counters), so a million-event journal takes about half a minute instead of the two to three minutes the
gateway itself needs to ingest it over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Final

import orjson
import psutil

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drivers.mqtt.config import MqttDriverConfig, TopicRoute  # noqa: E402
from drivers.mqtt.decode import Decoded, TopicRouter, decode_message, dedup_key  # noqa: E402
from gateway.kernel.config import BrokerConfig, JournalConfig  # noqa: E402
from gateway.kernel.events import PosSale  # noqa: E402
from gateway.kernel.journal import QUEUE_LIMIT, Draft, Journal  # noqa: E402
from gateway.kernel.metrics import Metrics  # noqa: E402
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError  # noqa: E402
from gateway.ledger.config import StockConfig, StockItem  # noqa: E402
from gateway.ledger.stock import StockLedger  # noqa: E402
from simulators.catalog import CATALOG, CatalogItem  # noqa: E402
from simulators.pos import PosTerminal  # noqa: E402
from tests.harness.brokers import free_port  # noqa: E402

TOKEN: Final = "bench-token-0123456789abcdef"
STORE_ID: Final = "bench-001"
GATEWAY_ID: Final = "gw-bench"
SKUS: Final = [f"SKU-{i:04d}" for i in range(1, 21)]
ROUTES: Final = {"pos.sale": "store/pos/{device_id}/sale", "pos.return": "store/pos/{device_id}/return"}
INTAKE_CLIENT_ID: Final = f"{STORE_ID}-{GATEWAY_ID}-intake-store-mqtt"
"""The gateway's intake session on the store broker (``GatewayConfig.client_id``, driver 'store-mqtt')."""


def terminals(count: int) -> list[str]:
    return [f"till-{i:02d}" for i in range(1, count + 1)]


def gateway_config(
    data_dir: Path,
    store_port: int,
    hq_port: int,
    api_port: int,
    *,
    tills: list[str],
    hq: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway config as a dict (written as JSON, which YAML reads); ``hq`` overrides HQ settings, ``extra``
    adds drivers (``extra["drivers"]`` is appended) and top-level sections."""
    extra = dict(extra or {})
    more_drivers = extra.pop("drivers", [])
    return {
        "gateway_id": GATEWAY_ID,
        "store": {"id": STORE_ID, "name": "Benchmark store", "timezone": "Asia/Hong_Kong"},
        "data_dir": str(data_dir),
        "store_broker": {"host": "127.0.0.1", "port": store_port},
        "hq": {"host": "127.0.0.1", "port": hq_port, **(hq or {})},
        "drivers": [
            {"type": "mqtt", "routes": [{"pattern": p, "kind": k} for k, p in ROUTES.items()]},
            *more_drivers,
        ],
        "devices": [{"id": t, "profile": "pos_terminal"} for t in tills],
        "stock": {"items": [{"sku": s, "on_hand": 100_000_000, "safety_stock": 10} for s in SKUS]},
        "api": {"host": "127.0.0.1", "port": api_port, "token": {"env": "BENCH_API_TOKEN"}},
        "log": {"level": "WARNING"},
        **extra,
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as {'name{labels}': value}; comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_total(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class GatewayProcess:
    """``store-gateway run`` as a child process, with its local API for health and metrics."""

    def __init__(
        self,
        work: Path,
        store_port: int,
        hq_port: int,
        tills: list[str],
        hq: dict[str, Any] | None = None,
        data_dir: Path | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.api_port = free_port()
        self.data_dir = data_dir or work / "data"
        self.config_path = work / "store.yaml"
        cfg = gateway_config(
            self.data_dir, store_port, hq_port, self.api_port, tills=tills, hq=hq, extra=extra
        )
        self.config_path.write_text(json.dumps(cfg, indent=1))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_wall = 0.0
        """time.time() just before the process was spawned."""

    def start(self) -> GatewayProcess:
        env = {**os.environ, "BENCH_API_TOKEN": TOKEN}
        self.started_wall = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config_path)], cwd=ROOT, env=env
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def _get(self, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def health(self) -> dict[str, Any] | None:
        """The /health document, or None while the API does not answer 200."""
        status, body = self._get("/health")
        return orjson.loads(body) if status == 200 else None

    def metrics(self) -> dict[str, float]:
        status, body = self._get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(body.decode())

    def wait_healthy(self, timeout: float = 60, poll: float = 0.05, ok: bool = True) -> dict[str, Any]:
        """Wait for /health to answer 200 (and, with ``ok``, report every driver connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with code {self.proc.returncode}")
            doc = self.health()
            if doc is not None and (not ok or doc["status"] == "ok"):
                return doc
            time.sleep(poll)
        raise RuntimeError(f"gateway /health not {'ok' if ok else '200'} within {timeout} s")

    def committed(self, kinds: tuple[str, ...] = ("pos.sale", "pos.return")) -> int:
        m = self.metrics()
        return int(sum(m.get(f'storegw_events_committed_total{{kind="{k}"}}', 0.0) for k in kinds))

    def wait_committed(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.committed() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not commit {count} sales within {timeout} s")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM (a clean shutdown) and wait; the exit code, None if it had to be killed."""
        return stop_process(self.proc, grace_s=30)


def start_tills(port: int, tills: list[str], rate_per_s: float, duration_s: float) -> subprocess.Popen[bytes]:
    """The POS simulator (``store-gateway simulate pos``) as its own process: realistic sales and returns,
    QoS 1, about ``rate_per_s`` in total, shared by ``tills``."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "simulate", "pos", "--port", str(port),
         "--device-ids", ",".join(tills), "--rate", str(rate_per_s / len(tills)), "--duration", str(duration_s)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10) -> int | None:
    """SIGTERM, then SIGKILL after ``grace_s``; the exit code, or None if it had to be killed (or never ran)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def sale_payloads(
    count: int, tills: list[str], seed: int = 0, catalog: Sequence[CatalogItem] = CATALOG
) -> list[list[tuple[str, bytes]]]:
    """Realistic sales from the simulator's terminals: per till, (topic, payload) messages."""
    out: list[list[tuple[str, bytes]]] = []
    for n, device in enumerate(tills):
        till = PosTerminal(device, seed=seed * 1000 + n, return_ratio=0.0, catalog=catalog)
        share = count // len(tills) + (1 if n < count % len(tills) else 0)
        topic = ROUTES["pos.sale"].format(device_id=device)
        out.append([(topic, till.make_sale().payload) for _ in range(share)])
    return out


async def create_intake_session(port: int) -> None:
    """Make the store broker hold the gateway's persistent intake session (as after any earlier run), so a
    sale published before the gateway subscribes is queued for it instead of dropped."""
    broker = BrokerConfig(host="127.0.0.1", port=port)
    client = MqttClient(broker, INTAKE_CLIENT_ID, clean_start=False)
    await client.connect()
    await client.subscribe([(p.replace("{device_id}", "+"), 1) for p in ROUTES.values()])
    await client.disconnect()


# --- HQ side ------------------------------------------------------------------------------------------


@dataclass
class BatchCounter:
    """A lean HQ subscriber: counts events from each batch's one-line header, never decompresses.

    With ``cover_through`` set, it also notes when the batches received cover every seq from 1 to it (the
    backlog is at HQ): ``drained_at``, and how many events had arrived by then. It assumes each seq arrives
    once (no reconnect or resend during the measurement)."""

    cover_through: int = 0
    events: int = 0
    batches: int = 0
    wire_bytes: int = 0
    covered: int = 0
    drained_at: float | None = None
    events_at_drained: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time, events in the batch) per batch."""

    def on_message(self, message: Message) -> None:
        payload = message.payload
        newline = payload.find(b"\n")
        if newline < 0:
            return  # not a batch
        head = orjson.loads(payload[:newline])
        now = time.monotonic()
        count = int(head["count"])
        self.arrivals.append((now, count))
        self.events += count
        self.batches += 1
        self.wire_bytes += len(payload)
        limit = self.cover_through
        for first, last in head["ranges"]:
            if first <= limit:
                self.covered += min(last, limit) - first + 1
        if self.drained_at is None and limit and self.covered >= limit:
            self.drained_at = now
            self.events_at_drained = self.events

    @property
    def first_at(self) -> float | None:
        return self.arrivals[0][0] if self.arrivals else None

    def peak_rate(self, window_s: float = 1.0) -> float:
        """Most events received in any ``window_s`` window, per second."""
        best, total, start = 0, 0, 0
        for at, count in self.arrivals:
            total += count
            while at - self.arrivals[start][0] > window_s:
                total -= self.arrivals[start][1]
                start += 1
            best = max(best, total)
        return best / window_s

    async def run(self, port: int, connected: asyncio.Event, stop: asyncio.Event) -> None:
        """Connect as soon as HQ's broker listens (retrying every 10 ms), subscribe, count until ``stop``."""
        broker = BrokerConfig(host="127.0.0.1", port=port, receive_maximum=65535)
        while True:
            client = MqttClient(broker, "bench-hq-counter", clean_start=True, on_message=self.on_message)
            try:
                await client.connect(within_s=2)
                break
            except MqttError:
                await asyncio.sleep(0.01)
        try:
            await client.subscribe([("retail/+/+/events", 1)])
            connected.set()
            await stop.wait()
        finally:
            await client.disconnect()


class DelayProxy:
    """A loopback TCP proxy that holds every chunk ``one_way_s`` before passing it on, in both directions: a
    WAN round trip of twice that between a gateway and HQ. Order is kept; bandwidth is not limited."""

    def __init__(self, listen_port: int, target_port: int, one_way_s: float) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.one_way_s = one_way_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def close(self) -> None:
        """Stop listening and cut every connection (the handlers then end on their own)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # one side went away: so does the other
        finally:
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(forward())
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((loop.time() + self.one_way_s, chunk))
            queue.put_nowait((loop.time() + self.one_way_s, b""))
            await sender
        finally:
            sender.cancel()


# --- building a journal backlog in-process ----------------------------------------------------------------


def _router() -> TopicRouter:
    routes = [TopicRoute(pattern=p, kind=k) for k, p in ROUTES.items()]
    return TopicRouter(MqttDriverConfig(routes=routes, unknown_devices="accept"), frozenset())


def decoded_sales(
    count: int, tills: list[str], seed: int = 0, catalog: Sequence[CatalogItem] = CATALOG
) -> list[Decoded]:
    """Realistic sales through the MQTT driver's own decoder (the validated payload the journal stores)."""
    router = _router()
    out: list[Decoded] = []
    # The tills interleave, as they do at a store's broker.
    for group in zip_longest(*sale_payloads(count, tills, seed, catalog)):
        for message in group:
            if message is not None:
                decoded = decode_message(router, *message)
                assert isinstance(decoded, Decoded), decoded
                out.append(decoded)
    return out


def sale_drafts(count: int, pool: list[Decoded]) -> Iterator[Draft]:
    """``count`` sale drafts cycling through ``pool`` (decoded once: pydantic costs 45 us a sale); each gets a
    receipt number of its own, in its body and dedup key, so every event is distinct to the journal."""
    for i in range(count):
        src = pool[i % len(pool)]
        data = src.data
        assert isinstance(data, PosSale)
        old = b'"receipt_no":%s' % orjson.dumps(data.receipt_no)
        receipt = f"{src.device_id}-bench-{i}"
        body = src.data_json.replace(old, b'"receipt_no":%s' % orjson.dumps(receipt), 1)
        yield Draft(
            src.kind,
            src.device_id,
            body,
            data,
            src.occurred_at,
            dedup_key(src.device_id, src.kind, data.register_id, receipt),
            None,
            "store-mqtt",
        )


async def fill_journal(data_dir: Path, drafts: Iterator[Draft], commit_events: int = 20_000) -> Journal:
    """Commit every draft through a real Journal (stock ledger included, as the gateway runs it) in large
    group commits; returns the closed journal (its counters say what was written)."""
    metrics = Metrics()
    stock = StockConfig(items=[StockItem(sku=s, on_hand=100_000_000, safety_stock=10) for s in SKUS])
    journal = Journal(
        data_dir / "journal.db",
        STORE_ID,
        GATEWAY_ID,
        JournalConfig(commit_max_events=commit_events, commit_max_delay_ms=0, synchronous="NORMAL"),
        metrics,
        processors=[StockLedger(stock, metrics)],
    )
    await journal.open()
    writer = asyncio.create_task(journal.run())
    try:
        for n, draft in enumerate(drafts):
            if not journal.submit(draft):  # the queue is full: wait for the writer to take half of it
                room = asyncio.Event()
                journal.when_below(QUEUE_LIMIT // 2, room.set)
                await room.wait()
                journal.submit(draft)
            elif n % 5000 == 0:
                await asyncio.sleep(0)  # let the writer pick up work
        await journal.flush()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await journal.close()
    return journal


def build_backlog(count: int, data_dir: Path | None = None, pool_size: int = 5000) -> tuple[Path, float]:
    """A data dir whose journal holds ``count`` undelivered sales (plus the ledger's stock.level events);
    returns it and the seconds it took."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="sg-backlog-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pool = decoded_sales(min(count, pool_size), terminals(10))
    asyncio.run(fill_journal(data_dir, sale_drafts(count, pool)))
    return data_dir, time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def proc_status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB, e.g. VmHWM (peak RSS); -1 if absent."""
    prefix = key + ":"
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(prefix):
                return int(line.split()[1])
    return -1


def decode_rate(
    run: Callable[[bytes], object],
    payload: bytes,
    seconds: float,
    clock: Callable[[], float] = time.process_time,
) -> float:
    """Calls of ``run(payload)`` per second for about ``seconds`` of ``clock``: by default this process's CPU
    time, so other work on a shared machine does not count. The first call fails loudly on a bad vector."""
    run(payload)
    count = 0
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(200):
            run(payload)
        count += 200
        now = clock()
        if now >= deadline:
            return count / (now - start)
