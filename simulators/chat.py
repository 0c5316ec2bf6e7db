"""A local stand-in for a DingTalk group robot: it checks each message's signature as DingTalk does, and shows it.

The gateway's ``dingtalk`` channel posts to the robot's URL with ``timestamp`` (ms) and ``sign`` added:
the URL-encoded base64 of HMAC-SHA256 of ``"{timestamp}\\n{secret}"`` with the robot's secret (docs/RULES.md).
:class:`ChatRobot` serves ``POST /robot/send?access_token=...`` on loopback and answers as the robot does:
``{"errcode": 0}`` for a text message it took; ``310000`` for a signature that does not match or a timestamp more
than an hour from its clock (DingTalk's window); ``300001`` for an unknown access token. Each message taken goes
to ``on_message``. The demo runs one and points its config's ``dingtalk`` channel at it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

import orjson
from fastapi import FastAPI, Request, Response

from gateway.api import serve_api

MAX_AGE_MS: Final = 3600 * 1000
"""DingTalk refuses a signature whose timestamp is more than an hour from its own clock."""
MAX_BODY_BYTES: Final = 64 * 1024
BAD_SIGN: Final = 310000
BAD_TOKEN: Final = 300001


def signature_problem(secret: str, timestamp: str, sign: str, now_ms: int) -> str | None:
    """Why DingTalk would refuse this ``timestamp`` and ``sign`` (``sign`` as the query string decodes it),
    or None when it matches."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 16:
        return "timestamp is not milliseconds"
    if abs(int(timestamp) - now_ms) > MAX_AGE_MS:
        return "timestamp is more than an hour from the robot's clock"
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(base64.b64encode(digest), sign.encode("utf-8", "replace")):
        return "sign does not match"
    return None


def _answer(errcode: int, errmsg: str) -> Response:
    return Response(orjson.dumps({"errcode": errcode, "errmsg": errmsg}), media_type="application/json")


@dataclass
class ChatRobot:
    """A signed DingTalk robot on loopback: ``async with robot.serving(): robot.url ...``."""

    on_message: Callable[[str], None]
    secret: str = field(default_factory=lambda: "SEC" + secrets.token_hex(32))
    access_token: str = field(default_factory=lambda: secrets.token_hex(16))
    received: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    """Requests refused, by reason."""
    port: int = 0

    @property
    def url(self) -> str:
        """The robot's URL for the channel's ``url`` (without timestamp and sign: the gateway adds them)."""
        return f"http://127.0.0.1:{self.port}/robot/send?access_token={self.access_token}"

    def app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.post("/robot/send")(self.send)
        return app

    def _refuse(self, why: str, errcode: int) -> Response:
        self.refused[why] = self.refused.get(why, 0) + 1
        return _answer(errcode, why)

    async def send(self, request: Request) -> Response:
        query = request.query_params
        if not hmac.compare_digest(query.get("access_token", "").encode(), self.access_token.encode()):
            return self._refuse("token is not exist", BAD_TOKEN)
        why = signature_problem(
            self.secret, query.get("timestamp", ""), query.get("sign", ""), int(time.time() * 1000)
        )
        if why is not None:
            return self._refuse(why, BAD_SIGN)
        raw = await request.body()
        text = _text_of(raw) if len(raw) <= MAX_BODY_BYTES else None
        if text is None:
            self.refused["not a text message"] = self.refused.get("not a text message", 0) + 1
            return Response(status_code=400)
        self.received.append(text)
        self.on_message(text)
        return _answer(0, "ok")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ChatRobot]:
        """Serve on a free loopback port (``port``, ``url``) for the block's duration."""
        started = asyncio.Event()
        bound: list[int] = []
        task = asyncio.create_task(serve_api(self.app(), "127.0.0.1", 0, started, bound), name="chat-robot")
        try:
            waiting = asyncio.ensure_future(started.wait())
            await asyncio.wait((waiting, task), return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if task.done():
                task.result()  # raises why it could not listen
            self.port = bound[0]
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _text_of(raw: bytes) -> str | None:
    """The content of a DingTalk text message, or None for anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("msgtype") != "text":
        return None
    text = body.get("text")
    content = text.get("content") if isinstance(text, dict) else None
    return content if isinstance(content, str) else None
