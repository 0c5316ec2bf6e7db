"""Alerts sent to people: DingTalk and WeCom group robots, Slack-compatible webhooks, signed JSON webhooks.

One consumer (:mod:`gateway.kernel.consumer`) per channel reads the committed ``alert.raised`` and
``alert.cleared`` events after its own cursor, in seq order, and sends those of the rules that name the channel.
A channel that is down only delays itself: intake, the rules and the other channels go on, and when it is back
every message arrives, in order, once. Each message's outcome is an event: ``notification.sent``, or
``notification.failed`` when the channel refuses it for good (a wrong URL or secret), under a dedup key of the
alert, its level and the channel; a message whose key is already committed is never sent again.

The window: a crash after the endpoint took a message but before its ``notification.sent`` committed sends it
once more at the next start.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import httpx
import orjson

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.events import (
    AlertCleared,
    AlertEscalated,
    AlertRaised,
    NotificationFailed,
    NotificationSent,
)
from gateway.kernel.journal import Journal
from gateway.kernel.pipeline import Event
from gateway.kernel.ratelimit import SlidingWindow
from gateway.kernel.rule_config import Channel
from gateway.kernel.supervise import Backoff
from rules.engine import RuleEngine

_LOGGER = logging.getLogger(__name__)

TIMEOUT_S: Final = 10.0
PERMANENT_AFTER: Final = 3
"""A channel that refuses a message this many times for a reason that will not pass (HTTP 4xx, an error code
other than a rate limit), over at least :attr:`ChannelConsumer.failed_after_s`, gets it recorded as failed;
network errors, 408, 425, 429 and 5xx are retried for as long as it takes."""
RETRY_CODES: Final = frozenset({-1, 130101, 45009})
"""Robot error codes that pass by waiting: busy (-1), sent too fast (DingTalk 130101, WeCom 45009)."""

WORDS: Final = {
    "en": {
        "raised": "ALERT",
        "cleared": "CLEARED",
        "escalated": "NOT ACKNOWLEDGED",
        "critical": "critical",
        "warning": "warning",
        "info": "info",
    },
    "zh-Hant": {
        "raised": "警報",
        "cleared": "已解除",
        "escalated": "未確認",
        "critical": "嚴重",
        "warning": "警告",
        "info": "提示",
    },
    "zh-Hans": {
        "raised": "警报",
        "cleared": "已解除",
        "escalated": "未确认",
        "critical": "严重",
        "warning": "警告",
        "info": "提示",
    },
}


class RefusedError(StoreGatewayError):
    """The channel answered, and not with success. ``retry``: worth trying again (a rate limit, a 5xx)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def dingtalk_url(url: str, secret: str, now_ms: int) -> str:
    """DingTalk's signed robot URL: ``timestamp`` in ms and ``sign``, the URL-encoded base64 of
    HMAC-SHA256(secret, "{timestamp}\\n{secret}")."""
    digest = hmac.new(secret.encode(), f"{now_ms}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"{url}{'&' if '?' in url else '?'}timestamp={now_ms}&sign={sign}"


def text_of(event: Event, language: str, store: str) -> str:
    """The short message: level, severity, the alert's own message, the store."""
    words = WORDS.get(language, WORDS["en"])
    model = event.model
    if isinstance(model, AlertRaised):
        return f"[{words['raised']}·{words.get(model.severity, model.severity)}] {model.message} ({store})"
    if isinstance(model, AlertEscalated):
        return f"[{words['escalated']}] {model.message} ({store})"
    assert isinstance(model, AlertCleared)
    return f"[{words['cleared']}] {model.message} ({store})"


class ChannelConsumer:
    """Sends one channel's messages, in seq order, each once."""

    kinds: frozenset[str] | None = frozenset({"alert.raised", "alert.cleared", "alert.escalated"})
    retry_base_s: float = 1.0
    """The first retry waits up to this long; each next one up to twice as long, at most 5 minutes."""
    failed_after_s: float = 600.0
    """A refused message is recorded as failed only after refusals over at least this long: a robot that
    refuses for a few minutes (its token being rotated, its group being set up) still gets the message."""

    def __init__(
        self,
        channel: Channel,
        engine: RuleEngine,
        journal: Journal,
        client: httpx.AsyncClient,
        *,
        language: str = "en",
        store: str = "",
        synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.channel = channel
        self._synced = synced
        """False while the wall clock is not synchronised: a signature's timestamp may be refused for that,
        so refusals are retried, not recorded as failed."""
        self.name = f"notify-{channel.id}"
        self._engine = engine
        self._journal = journal
        self._client = client
        self._language = language
        self._store = store
        self.problem: str | None = None
        """Why the message in hand is being retried (an HTTP status, a robot's error code, a connection error)."""
        self.monotonic: Callable[[], float] = time.monotonic
        """The clock of its waits (retries, the rate, the refusal window), with :attr:`sleep`."""
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._rate = SlidingWindow(channel.per_minute, 60.0)
        """Every attempt counts (a robot counts the calls it refuses too)."""

    async def handle(self, events: Sequence[Event]) -> None:
        for event in events:
            found = self._wanted(event)
            if found is None:
                continue
            alert_id, level = found
            key = f"notify:{self.channel.id}:{alert_id}:{level}"
            if level == "escalated":  # one alert may be escalated or re-notified many times: each once
                key += f":{event.seq}"
            if await self._journal.key_known(key):
                continue  # sent (or refused) before: a restart after its outcome committed
            attempts, error = await self._deliver(text_of(event, self._language, self._store), event)
            cls = NotificationSent if error is None else NotificationFailed
            outcome = cls(
                alert_id=alert_id, channel=self.channel.id, level=level, attempts=attempts, error=error
            )
            await self._record(outcome, key)

    def _wanted(self, event: Event) -> tuple[str, str] | None:
        model = event.model
        if isinstance(model, AlertRaised):
            alert_id, level = model.details.get("alert_id"), "raised"
        elif isinstance(model, AlertCleared):
            alert_id, level = model.alert_id, "cleared"
        elif isinstance(model, AlertEscalated):
            if self.channel.id not in model.channels:
                return None
            return model.alert_id, "escalated"
        else:
            return None
        # The channels the alert named when it was raised (its clear carries them too): a rule changed or removed
        # since does not redirect or drop its messages.
        channels = model.details.get("channels")
        if not isinstance(channels, list):  # an alert from before channels were recorded: the rule as it is
            rule = self._engine.rules.get(str(model.details.get("rule_id")))
            channels = rule.notify if rule is not None else []
        if not isinstance(alert_id, str) or self.channel.id not in channels:
            return None
        return alert_id, level

    async def _deliver(self, text: str, event: Event) -> tuple[int, str | None]:
        """Send until it is taken: (attempts, None), or refused for good: (attempts, why)."""
        backoff = Backoff(base=self.retry_base_s, cap=300.0)
        attempts = refusals = 0
        first_refusal = 0.0
        while True:
            wait = self._rate.wait(self.monotonic())
            if wait > 0:  # over the channel's rate: until the oldest send in the last minute is a minute old
                await self.sleep(wait)
                continue
            attempts += 1
            try:
                try:
                    await self._send(text, event)
                finally:  # counted when it ended: a robot counts a message when it gets it, at the latest then
                    self._rate.use(self.monotonic())
            except RefusedError as err:
                if not err.retry and self._synced():
                    refusals += 1
                    if refusals == 1:
                        first_refusal = self.monotonic()
                    if (
                        refusals >= PERMANENT_AFTER
                        and self.monotonic() - first_refusal >= self.failed_after_s
                    ):
                        _LOGGER.error("notification to %s refused: %s", self.channel.id, err)
                        self.problem = None
                        return attempts, str(err)[:500]
                reason = str(err)
            except (httpx.HTTPError, httpx.InvalidURL) as err:
                reason = type(err).__name__  # its text may hold the URL, and a robot's URL is its token
            else:
                self.problem = None
                return attempts, None
            self.problem = reason
            delay = backoff.next_delay()
            _LOGGER.warning(
                "notification to %s failed (%s), retrying in %.0f s", self.channel.id, reason, delay
            )
            await self.sleep(delay)

    async def _send(self, text: str, event: Event) -> None:
        channel = self.channel
        url = channel.url.get_secret_value()
        secret = channel.secret.get_secret_value() if channel.secret is not None else ""
        headers = {"Content-Type": "application/json"}
        if channel.type == "dingtalk":
            url = dingtalk_url(url, secret, int(time.time() * 1000))
            body = orjson.dumps({"msgtype": "text", "text": {"content": text}})
        elif channel.type == "wecom":
            body = orjson.dumps({"msgtype": "markdown", "markdown": {"content": text}})
        elif channel.type == "slack":
            body = orjson.dumps({"text": text})
        else:
            body = orjson.dumps({"text": text, "kind": event.kind, "seq": event.seq, "alert": _plain(event)})
            stamp = str(int(time.time()))
            signature = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers |= {"X-Webhook-Timestamp": stamp, "X-Webhook-Signature": f"sha256={signature}"}
        response = await self._client.post(url, content=body, headers=headers, timeout=TIMEOUT_S)
        # Only the status and the error code are kept: an answer's body may echo the URL or the message.
        if response.status_code in (408, 425, 429) or response.status_code >= 500:
            raise RefusedError(f"HTTP {response.status_code}", retry=True)
        if response.status_code >= 300:
            raise RefusedError(f"HTTP {response.status_code}", retry=False)
        if channel.type in ("dingtalk", "wecom"):
            try:
                answer = orjson.loads(response.content)
            except orjson.JSONDecodeError as err:
                raise RefusedError("the answer is not JSON", retry=True) from err
            code = answer.get("errcode", 0) if isinstance(answer, dict) else None
            if not isinstance(code, int) or isinstance(code, bool):  # not a robot's answer: a wrong URL
                raise RefusedError("the answer has no error code", retry=False)
            if code != 0:
                raise RefusedError(f"errcode {code}", retry=code in RETRY_CODES)

    async def _record(self, outcome: NotificationSent, key: str) -> None:
        kind = "notification.failed" if isinstance(outcome, NotificationFailed) else "notification.sent"
        await self._journal.record(kind, outcome, key)


def _plain(event: Event) -> dict[str, Any]:
    return event.model.model_dump(mode="json")
