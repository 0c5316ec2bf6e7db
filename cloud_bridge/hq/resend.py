"""Resend rounds: the receiver asks gateways for the seqs HQ lost, and learns from their answers.

Each round claims from the store the lost ranges of the gateways that are due (:meth:`ReceiverBackend
.claim_resends`) and sends each gateway a signed ``resend`` command carrying up to ``resend_ranges`` ranges
(docs/OUTBOX.md). A gateway that refuses ``ranges`` (a release of before them) is asked one range per command
from then on; the store remembers it, for every receiver sharing it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import orjson

from cloud_bridge import topics
from cloud_bridge.commands import MAX_RESEND_RANGES
from cloud_bridge.hq.model import (
    SINGLE_RANGE_COMMANDS,
    ReceiverBackend,
    ResendRequest,
    StoreUnavailableError,
    resend_args,
)
from cloud_bridge.hq.ranges import size
from cloud_bridge.hq.report import format_ranges
from cloud_bridge.signing import DEFAULT_VALIDITY_S, MAX_VALIDITY_S, CommandSigner
from gateway.kernel.events import uuid7
from gateway.kernel.mqtt_client import MqttClient, MqttError

_LOGGER = logging.getLogger("cloud_bridge.hq.receiver")  # the receiver's one log name (see service.py)

MAX_RESEND_COMMANDS: Final = SINGLE_RANGE_COMMANDS
"""Single-range commands per gateway per round with ``resend_ranges=1``, or for a gateway that refused a
multi-range command (one of before multi-range resends); otherwise one command of up to ``resend_ranges``
ranges, at most 100,000 seqs in all."""
MAX_TRACKED_ASKS: Final = 10_000
"""Multi-range resend commands remembered (request id -> gateway and ranges) until their answer comes; the
oldest are forgotten past this (an answer that comes later is ignored, and the next ask is refused again)."""
PUBLISH_TIMEOUT_S: Final = 10.0
SIGNATURE_REFUSALS: Final = frozenset(
    {"unsigned", "unknown_key", "bad_signature", "expired", "not_yet_valid"}
)
"""Codes of a gateway refusing a command's signature or validity: logged once per gateway and code."""


def responses_subscriptions(prefix: str, stores: Sequence[str] | None = None) -> list[str]:
    """The gateways' command answers a receiver reads: every store's, or only ``stores``'."""
    if not stores:
        return [topics.responses_topic(prefix, "+", "+")]
    return [topics.responses_topic(prefix, store, "+") for store in dict.fromkeys(stores)]


class ResendRounds:
    """The receiver's resend requests: ``interval_s`` None turns them off; ``ranges`` ranges per command (1:
    the single-range form, for gateways of before multi-range resends), each signed by ``signer`` (required
    then: gateways refuse unsigned commands). The receiver calls :meth:`ask_round` while connected, and
    :meth:`on_response` with each gateway answer it reads."""

    def __init__(
        self,
        store: ReceiverBackend,
        *,
        prefix: str,
        protocol: str,
        interval_s: float | None,
        ranges: int,
        signer: CommandSigner | None,
    ) -> None:
        if not 1 <= ranges <= MAX_RESEND_RANGES:
            raise ValueError(f"resend_ranges must be 1..{MAX_RESEND_RANGES}")
        if interval_s is not None and signer is None:
            raise ValueError("resend requests need a signer: gateways refuse unsigned commands")
        self._store = store
        self._prefix = prefix
        self._resend_interval = interval_s
        self._resend_ranges = ranges
        self._signer = signer
        self._signature_refusals: set[tuple[str, str]] = set()
        self._asked: OrderedDict[str, ResendRequest] = OrderedDict()
        """Multi-range resend commands whose answer has not come, by request id."""
        self._to_mark: dict[tuple[str, str], str] = {}
        """Gateways that refused a multi-range resend, not yet recorded in the store (which then flags their
        claims ``single_range``): (store, gateway) -> the gateway's error message."""
        self._retry: list[ResendRequest] = []
        """Refused multi-range asks, to ask again one range at a time in the next round."""
        self._claim: Callable[[], list[ResendRequest]] | None = None
        if interval_s is not None:
            per_round = ranges if ranges > 1 else MAX_RESEND_COMMANDS
            # Without MQTT 5 a command cannot expire: one to a gateway that is away would wait in its session
            # with every later one. Then only gateways heard from within the interval are asked (as before
            # MQTT 5).
            online_s = None if protocol == "5" else interval_s
            self._claim = functools.partial(
                store.claim_resends,
                interval_s,
                per_round,
                online_s=online_s,
                single_ranges=MAX_RESEND_COMMANDS,
            )
        self.commands = 0
        """Resend commands acknowledged by the broker."""
        self.ranges_asked = 0
        """Ranges those commands asked for."""

    async def ask_round(self, client: MqttClient, executor: ThreadPoolExecutor | None) -> None:
        """One round on ``client``: record the refusals heard, claim the lost ranges due (on ``executor``, the
        receiver's database thread) and ask for them, refused multi-range asks first, one range at a time."""
        claim = self._claim
        if claim is None:
            return  # resend requests are off
        loop = asyncio.get_running_loop()
        retry, self._retry = self._retry, []
        try:
            await self._record_refusals(loop, executor)
            requests = await loop.run_in_executor(executor, claim)
        except StoreUnavailableError as err:
            _LOGGER.debug("cannot look for lost seqs: %s", err)
            self._retry = retry + self._retry
            return
        for request in retry + requests:
            await self._ask_resend(client, request)

    def on_response(self, topic: str, payload: bytes) -> None:
        """A gateway's answer to a command: an ``invalid_args`` refusal of a multi-range resend this receiver
        sent means a gateway of before multi-range resends (it takes only from_seq/to_seq): it is asked one
        range at a time from then on, starting with the refused ranges in the next round."""
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict) or answer.get("command") != "resend":
            return
        error = answer.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if (
            isinstance(code, str)
            and code in SIGNATURE_REFUSALS
            and (topic, code) not in self._signature_refusals
        ):
            self._signature_refusals.add((topic, code))
            _LOGGER.warning(
                "%s refused a signed resend: %s: %s (check --key-id against the gateway's hq.command_keys,"
                " and both clocks)",
                topic.removesuffix("/responses"),
                code,
                str(error.get("message") if isinstance(error, dict) else "")[:300],
            )
        request_id = answer.get("request_id")
        request = self._asked.pop(request_id, None) if isinstance(request_id, str) else None
        if request is None or topic != topics.responses_topic(
            self._prefix, request.store_id, request.gateway_id
        ):
            return
        if (
            answer.get("status") != "error"
            or not isinstance(error, dict)
            or error.get("code") != "invalid_args"
            # An old release names the field it does not know; a current one refusing for another reason
            # (a range out of bounds) must not be slowed to one range per command.
            or "ranges" not in str(error.get("message"))
            or "not permitted" not in str(error.get("message"))
        ):
            return
        key = (request.store_id, request.gateway_id)
        self._to_mark[key] = str(error.get("message"))[:300]
        self._retry.append(ResendRequest(*key, request.ranges[:MAX_RESEND_COMMANDS], single_range=True))

    async def _record_refusals(
        self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor | None
    ) -> None:
        """Record in the store the gateways that refused multi-range resends (so every receiver sharing it,
        and this one after a restart, asks them one range at a time)."""
        while self._to_mark:
            key, message = next(iter(self._to_mark.items()))
            mark = functools.partial(self._store.mark_single_range, *key, f"invalid_args: {message}")
            if await loop.run_in_executor(executor, mark):
                _LOGGER.warning(
                    "%s/%s refused a multi-range resend (invalid_args: %s): a gateway of before multi-range"
                    " resends; asking it one range per command from now on",
                    *key,
                    message,
                )
            if self._to_mark.get(key) == message:
                del self._to_mark[key]

    async def _ask_resend(self, client: MqttClient, request: ResendRequest) -> None:
        """One multi-range command (or one single-range command per range, at most MAX_RESEND_COMMANDS, for
        a gateway of before multi-range resends, or all gateways with ``resend_ranges`` 1)."""
        topic = topics.commands_topic(self._prefix, request.store_id, request.gateway_id)
        single = (
            self._resend_ranges == 1
            or request.single_range
            or (request.store_id, request.gateway_id) in self._to_mark
        )
        batches = [[r] for r in request.ranges[:MAX_RESEND_COMMANDS]] if single else [request.ranges]
        signer = self._signer
        if signer is None:  # refused in __init__ when resends are on
            return
        interval = self._resend_interval or 1
        valid_for = min(MAX_VALIDITY_S, max(DEFAULT_VALIDITY_S, math.ceil(interval)))
        for ranges in batches:
            request_id = f"resend-{uuid7()}"
            payload = signer.sign(topic, request_id, "resend", resend_args(ranges), valid_for_s=valid_for)
            if len(ranges) > 1 and self._resend_interval is not None:
                self._asked[request_id] = request  # its answer may say the gateway takes one range only
                while len(self._asked) > MAX_TRACKED_ASKS:
                    self._asked.popitem(last=False)
            shown = format_ranges(ranges, limit=5)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    # Expires with the interval (MQTT 5): a gateway that is away must not find a pile of
                    # resends in its session, crowding out real commands; a fresh one follows if still lost.
                    expiry = max(1, math.ceil(interval))
                    await client.publish(topic, payload, qos=1, message_expiry_s=expiry)
            except (MqttError, TimeoutError) as err:
                _LOGGER.warning(
                    "could not ask %s/%s to resend %s (%s); asking again later",
                    request.store_id,
                    request.gateway_id,
                    shown,
                    err,
                )
                return
            self.commands += 1
            self.ranges_asked += len(ranges)
            _LOGGER.info(
                "asked %s/%s to resend %d lost seq(s) in %d range(s): %s",
                request.store_id,
                request.gateway_id,
                size(ranges),
                len(ranges),
                shown,
            )
