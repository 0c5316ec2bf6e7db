"""Notifications over real HTTP to local endpoints that check what DingTalk, WeCom and Slack check: each alert
reaches each channel of its rule once, in order, and a channel that was down gets everything afterwards."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr, TypeAdapter

from gateway.kernel.consumer import STUCK_S, ConsumerState, run_consumer
from gateway.kernel.rule_config import Channel, RuleDefinition
from rules.clock import RuleClock
from rules.engine import RuleEngine
from rules.notify import ChannelConsumer, dingtalk_url
from tests.gateway.test_api import running
from tests.gateway.test_journal import new_journal, query, until
from tests.gateway.test_journal import running as journal_running
from tests.rules.test_in_journal import sample

SECRET = "SEC0123456789abcdef0123456789abcdef"
HOOK_KEY = "hook-key-0123456789"


class Endpoints:
    """Chat robots as their makers document them; ``down``: answer 503 to that many requests first."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.got: dict[str, list[str]] = {"ding": [], "wecom": [], "slack": [], "hook": []}
        self.down = 0
        self.unavailable: Callable[[], bool] = lambda: False
        """While it says so, every request is answered 503."""
        self.clock: Callable[[], float] = time.monotonic
        self.ding_at: list[float] = []
        """When each DingTalk message arrived, on :attr:`clock`."""
        self.ding_tried_at: list[float] = []
        """When each request reached the DingTalk robot, answered or not."""
        self.ding_requests = 0
        self.app = FastAPI()
        self.app.post("/ding")(self.ding)
        self.app.post("/wecom")(self.wecom)
        self.app.post("/slack")(self.slack)
        self.app.post("/hook")(self.hook)

    def _down(self) -> bool:
        if self.unavailable():
            return True
        if self.down:
            self.down -= 1
            return True
        return False

    async def ding(self, request: Request) -> Response:
        self.ding_requests += 1
        self.ding_tried_at.append(self.clock())
        if self._down():
            return Response(status_code=503)
        stamp, sign = request.query_params["timestamp"], request.query_params["sign"]
        assert abs(int(stamp) - time.time() * 1000) < 3600 * 1000  # DingTalk refuses older than an hour
        expected = base64.b64encode(
            hmac.new(self.secret.encode(), f"{stamp}\n{self.secret}".encode(), hashlib.sha256).digest()
        )
        if sign.encode() != expected:
            return Response(orjson.dumps({"errcode": 310000, "errmsg": "sign not match"}))
        body = orjson.loads(await request.body())
        assert body["msgtype"] == "text"
        self.got["ding"].append(body["text"]["content"])
        self.ding_at.append(self.clock())
        return Response(orjson.dumps({"errcode": 0, "errmsg": "ok"}))

    async def wecom(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        assert body["msgtype"] == "markdown"
        self.got["wecom"].append(body["markdown"]["content"])
        return Response(orjson.dumps({"errcode": 0, "errmsg": "ok"}))

    async def slack(self, request: Request) -> Response:
        self.got["slack"].append(orjson.loads(await request.body())["text"])
        return Response(b"ok")

    async def hook(self, request: Request) -> Response:
        raw = await request.body()
        stamp = request.headers["X-Webhook-Timestamp"]
        assert abs(int(stamp) - time.time()) < 300  # a receiver refuses stale timestamps: no replays
        mac = hmac.new(HOOK_KEY.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
        assert request.headers["X-Webhook-Signature"] == f"sha256={mac}"
        self.got["hook"].append(orjson.loads(raw)["text"])
        return Response(b"{}")


def channels(base: str) -> list[Channel]:
    return [
        Channel(
            id="ding",
            type="dingtalk",
            url=SecretStr(f"{base}/ding?access_token=t0k3n"),
            secret=SecretStr(SECRET),
        ),
        Channel(id="wecom", type="wecom", url=SecretStr(f"{base}/wecom?key=k")),
        Channel(id="slack", type="slack", url=SecretStr(f"{base}/slack")),
        Channel(id="hook", type="webhook", url=SecretStr(f"{base}/hook"), secret=SecretStr(HOOK_KEY)),
    ]


RULES = TypeAdapter(list[RuleDefinition]).validate_python(
    [
        {
            "id": "dairy-warm",
            "type": "temperature",
            "max_c": 8,
            "for_s": 0,
            "clear_for_s": 0,
            "severity": "critical",
            "notify": ["ding", "wecom", "slack", "hook"],
        }
    ]
)


@contextlib.asynccontextmanager
async def notifying(
    journal: Any, engine: RuleEngine, base: str, synced: Any = lambda: True, failed_after_s: float = 0.0
) -> AsyncIterator[list[ChannelConsumer]]:
    async with httpx.AsyncClient() as client:
        consumers = [
            ChannelConsumer(
                c, engine, journal, client, language="zh-Hant", store="Causeway Bay", synced=synced
            )
            for c in channels(base)
        ]
        for consumer in consumers:
            consumer.retry_base_s = 0.05
            consumer.failed_after_s = failed_after_s
            await journal.save_cursor(consumer.name, 0)  # from the start, whenever the tasks get going
        tasks = [asyncio.create_task(run_consumer(journal, c)) for c in consumers]
        try:
            yield consumers
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_each_alert_reaches_each_channel_once_in_order_even_after_an_outage(tmp_path: Path) -> None:
    endpoints = Endpoints()
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with (
        journal_running(journal),
        running(endpoints.app) as (base, _),
        notifying(journal, engine, base),
    ):
        endpoints.down = 3  # DingTalk answers 503 three times
        journal.submit(sample(9.0))
        journal.submit(sample(5.0))
        journal.submit(sample(10.0))
        await until(lambda: all(len(got) == 3 for got in endpoints.got.values()), "every message everywhere")
        await until(
            lambda: len(query(journal, "SELECT 1 FROM events WHERE kind='notification.sent'")) == 12, "sent"
        )
    assert endpoints.got["ding"] == [
        "[警報·嚴重] fridge-1: above 8 °C for 0 min (max 9.0 °C) (Causeway Bay)",
        "[已解除] fridge-1: back below 8 °C (Causeway Bay)",
        "[警報·嚴重] fridge-1: above 8 °C for 0 min (max 10.0 °C) (Causeway Bay)",
    ]
    assert endpoints.got["ding"] == endpoints.got["wecom"] == endpoints.got["slack"] == endpoints.got["hook"]
    attempts = [
        orjson.loads(b)["data"]
        for (b,) in query(journal, "SELECT body FROM events WHERE kind='notification.sent' ORDER BY seq")
    ]
    ding = [a for a in attempts if a["channel"] == "ding"]
    assert [(a["alert_id"], a["level"]) for a in ding] == [
        ("dairy-warm/fridge-1/1", "raised"),
        ("dairy-warm/fridge-1/1", "cleared"),
        ("dairy-warm/fridge-1/2", "raised"),
    ]
    assert ding[0]["attempts"] == 4
    # t0k3n (the robot's token) never reaches the journal
    assert not query(journal, "SELECT 1 FROM events WHERE CAST(body AS TEXT) LIKE '%t0k3n%'")


async def test_a_message_already_recorded_is_not_sent_again(tmp_path: Path) -> None:
    endpoints = Endpoints()
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), running(endpoints.app) as (base, _):
        async with notifying(journal, engine, base) as consumers:
            journal.submit(sample(9.0))
            await until(lambda: len(endpoints.got["slack"]) == 1, "sent")
            await until(
                lambda: len(query(journal, "SELECT 1 FROM events WHERE kind='notification.sent'")) == 4, "rec"
            )
        events, _ = await journal.events_after(0, frozenset({"alert.raised"}), 10)
        await consumers[2].handle(events)  # as after a crash before its cursor was saved
    assert len(endpoints.got["slack"]) == 1


async def test_a_wrong_secret_is_recorded_as_failed_and_the_channel_goes_on(tmp_path: Path) -> None:
    endpoints = Endpoints(secret="SECanother")  # the robot was given another secret than the config's
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with (
        journal_running(journal),
        running(endpoints.app) as (base, _),
        notifying(journal, engine, base),
    ):
        journal.submit(sample(9.0))
        await until(
            lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='notification.failed'")), "failed"
        )
    [(body,)] = query(journal, "SELECT body FROM events WHERE kind='notification.failed'")
    failed = orjson.loads(body)["data"]
    assert (failed["channel"], failed["attempts"]) == ("ding", 3)
    assert failed["error"] == "errcode 310000"  # the code only: an answer's text may echo the URL or message


async def test_refusals_are_retried_while_the_clock_is_unsynced_or_for_the_failed_after_time(
    tmp_path: Path,
) -> None:
    """A signature may be refused for a wrong clock: no failure is recorded until the clock is synchronised,
    nor before the refusals have lasted ``failed_after_s``."""
    endpoints = Endpoints(secret="SECanother")
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    synced = [False]
    async with (
        journal_running(journal),
        running(endpoints.app) as (base, _),
        notifying(journal, engine, base, synced=lambda: synced[0], failed_after_s=3600.0) as consumers,
    ):
        journal.submit(sample(9.0))
        await until(lambda: endpoints.ding_requests >= 4, "refused four times while unsynced")
        synced[0] = True
        seen = endpoints.ding_requests
        await until(lambda: endpoints.ding_requests >= seen + 4, "refused four more times, synced")
        assert not query(journal, "SELECT 1 FROM events WHERE kind='notification.failed'")
        ding = next(c for c in consumers if c.channel.id == "ding")
        ding.failed_after_s = 0.0
        await until(
            lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='notification.failed'")), "failed"
        )
        assert len(endpoints.got["slack"]) == 1  # the other channels went on meanwhile


def test_the_dingtalk_signature_is_the_documented_one() -> None:
    url = dingtalk_url("https://oapi.dingtalk.com/robot/send?access_token=abc", "SECabc", 1700000000000)
    digest = hmac.new(b"SECabc", b"1700000000000\nSECabc", hashlib.sha256).digest()
    from urllib.parse import quote_plus

    assert url.endswith(f"&timestamp=1700000000000&sign={quote_plus(base64.b64encode(digest))}")


async def test_a_clear_goes_where_its_alert_went_even_after_its_rule_is_gone(tmp_path: Path) -> None:
    from gateway.kernel.events import AlertCleared
    from gateway.kernel.pipeline import Event

    engine = RuleEngine([], RuleClock(lambda: True))  # the rule was removed
    journal = new_journal(tmp_path, processors=[engine])
    cleared = AlertCleared(
        rule="temperature",
        subject="fridge-1",
        alert_id="dairy-warm/fridge-1/1",
        reason="rule_removed",
        message="m",
        details={"rule_id": "dairy-warm", "channels": ["slack"]},
    )
    event = Event(5, "alert.cleared", "fridge-1", cleared.model_dump_json().encode(), cleared)
    async with httpx.AsyncClient() as client:
        consumers = {c.id: ChannelConsumer(c, engine, journal, client) for c in channels("https://x.example")}
    assert consumers["slack"]._wanted(event) == ("dairy-warm/fridge-1/1", "cleared")
    assert consumers["ding"]._wanted(event) is None


async def test_an_answer_without_a_robots_error_code_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    """A URL that is not a robot's (a proxy's page, another API) answers JSON without an integer errcode."""
    app = FastAPI()
    answers = [b'{"errcode": []}', b"[1, 2]", b'{"errcode": "0"}']

    seen: list[int] = []

    @app.post("/odd")
    async def odd() -> Response:
        seen.append(1)
        return Response(answers[(len(seen) - 1) % len(answers)], media_type="application/json")

    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), running(app) as (base, _), httpx.AsyncClient() as client:
        channel = Channel(id="wecom", type="wecom", url=SecretStr(f"{base}/odd"))
        consumer = ChannelConsumer(channel, engine, journal, client)
        consumer.retry_base_s, consumer.failed_after_s = 0.01, 0.0
        task = asyncio.create_task(run_consumer(journal, consumer))
        try:
            journal.submit(sample(9.0))
            await until(
                lambda: bool(query(journal, "SELECT 1 FROM events WHERE kind='notification.failed'")),
                "failed",
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    [(body,)] = query(journal, "SELECT body FROM events WHERE kind='notification.failed'")
    assert orjson.loads(body)["data"]["error"] == "the answer has no error code"


class VirtualTime:
    """A consumer's clock running ahead of real time: its waits (retries, the rate) take no real time, while its
    HTTP traffic is real. ``at`` is called with the time since the start whenever the clock moves."""

    def __init__(self, at: Callable[[float], Any]) -> None:
        self.start = self.now = time.monotonic()
        self._at = at

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await self._at(self.now - self.start)
        await asyncio.sleep(0.001)  # real I/O and the journal go on


class Plug:
    """A TCP port in front of an endpoint that can be pulled: connections are then refused (the robot's host
    is down), and open ones are cut."""

    def __init__(self, backend: str) -> None:
        self._backend = int(backend.rsplit(":", 1)[1])
        self._server: asyncio.Server | None = None
        self._open: list[asyncio.StreamWriter] = []
        self.port = 0

    async def plug_in(self) -> None:
        for attempt in range(50):  # the same port again: another process may hold it for a moment
            try:
                self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]

    async def pull(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:
            writer.close()
        self._open.clear()
        await self._server.wait_closed()
        self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._backend)
        self._open += [writer, up_writer]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_a_robot_down_for_ten_minutes_gets_every_message_afterwards_in_order_once_within_its_rate(
    tmp_path: Path,
) -> None:
    """Ten minutes (on the consumer's clock) of a DingTalk robot down: five answering 503, five with nothing
    listening. The 24 messages of the alerts raised and cleared meanwhile all arrive afterwards, in the alerts'
    order, each once, and never more than 20 in any minute (DingTalk throttles a robot for 10 minutes past that).
    """
    endpoints = Endpoints()
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), running(endpoints.app) as (base, _):
        plug = Plug(base)
        await plug.plug_in()
        phases: list[str] = []

        async def at(elapsed: float) -> None:
            if elapsed >= 300 and "pulled" not in phases:
                phases.append("pulled")
                await plug.pull()
            if elapsed >= 600 and "back" not in phases:
                phases.append("back")
                await plug.plug_in()

        clock = VirtualTime(at)
        endpoints.clock = clock.monotonic
        endpoints.unavailable = lambda: clock.now - clock.start < 300
        ding = channels(f"http://127.0.0.1:{plug.port}")[0]
        async with httpx.AsyncClient() as client:
            consumer = ChannelConsumer(ding, engine, journal, client, store="Causeway Bay")
            consumer.monotonic, consumer.sleep = clock.monotonic, clock.sleep
            await journal.save_cursor(consumer.name, 0)
            task = asyncio.create_task(run_consumer(journal, consumer))
            try:
                for i in range(12):
                    journal.submit(sample(9.0 + i / 10))  # raised
                    journal.submit(sample(5.0))  # cleared
                await until(lambda: len(endpoints.got["ding"]) == 24, "every message, after the outage")
                await until(
                    lambda: len(query(journal, "SELECT 1 FROM events WHERE kind='notification.sent'")) == 24,
                    "each recorded as sent",
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await plug.pull() if "back" in phases else None
    assert phases == ["pulled", "back"]
    assert endpoints.ding_requests > 24  # it was tried during the outage
    assert min(endpoints.ding_at) - clock.start >= 600  # nothing got through before the robot was back
    expected = []
    for i in range(12):
        expected += [
            f"[ALERT·critical] fridge-1: above 8 °C for 0 min (max {9.0 + i / 10:.1f} °C) (Causeway Bay)",
            "[CLEARED] fridge-1: back below 8 °C (Causeway Bay)",
        ]
    assert endpoints.got["ding"] == expected  # in order, each once
    assert not query(journal, "SELECT 1 FROM events WHERE kind='notification.failed'")
    for at in (endpoints.ding_at, endpoints.ding_tried_at):  # at most 20 in any minute, refused ones included
        assert all(at[i + 20] - at[i] >= 60 for i in range(len(at) - 20)), at


async def test_health_sees_a_channel_held_up_and_its_reason_and_then_caught_up(tmp_path: Path) -> None:
    endpoints = Endpoints()
    endpoints.down = 10**6  # answers 503 until told otherwise
    engine = RuleEngine(RULES, RuleClock(lambda: True))
    journal = new_journal(tmp_path, processors=[engine])
    async with journal_running(journal), running(endpoints.app) as (base, _), httpx.AsyncClient() as client:
        consumer = ChannelConsumer(channels(base)[0], engine, journal, client)
        consumer.retry_base_s = 0.05
        state = ConsumerState()
        await journal.save_cursor(consumer.name, 0)  # from the start, whenever the task gets going
        task = asyncio.create_task(run_consumer(journal, consumer, state))
        try:
            journal.submit(sample(9.0))
            await until(lambda: consumer.problem == "HTTP 503", "retrying")
            assert state.busy_since is not None
            held = state.report(state.busy_since + STUCK_S + 1, consumer.problem)
            assert (held["behind"], held["error"]) == (True, "HTTP 503")  # a minute on: reported as behind
            endpoints.down = 0
            await until(lambda: state.busy_since is None, "caught up")
            fine = state.report(time.monotonic(), consumer.problem)
            assert (fine["behind"], fine["error"], fine["busy_s"]) == (False, None, 0.0)
            assert fine["cursor"] >= 2  # past the alert (seq 2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
