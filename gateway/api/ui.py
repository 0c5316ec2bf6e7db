"""The local page (``/ui``): what a technician, a store manager and a viewer see of the gateway, offline.

One HTML page and a small hand-written script (``ui_static/``), no build step, nothing from the internet. The
script asks ``/ui/state`` every few seconds and redraws, so alerts appear without a reload, and it goes on asking
through a gateway restart. Logins: a token from the config (``api.users``, or the API token as admin) exchanged
for a session cookie (:mod:`gateway.api.session`); every POST carries the CSRF token. docs/UI.md tells more.
"""

from __future__ import annotations

import html
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from gateway.api import journal_read
from gateway.api.session import COOKIE, SESSION_S, Session, Sessions
from gateway.api.ui_text import LANGUAGES, TEXT, pick_language
from gateway.kernel.config import Role
from gateway.kernel.events import AlertAcknowledged
from gateway.kernel.journal import Journal
from gateway.kernel.journal.reader import oldest_pending, quarantine_page, snapshot
from gateway.kernel.model import StrictModel
from gateway.kernel.outbox import CLASSES
from gateway.kernel.ratelimit import SlidingWindow
from rules.acks import acknowledge
from rules.alerts import ALERT_ID
from rules.engine import RuleEngine, open_alerts
from rules.haccp import METRIC as HACCP_METRIC
from rules.haccp import watching_rule
from rules.report import stock_now

_LOGGER = logging.getLogger(__name__)

LANG_COOKIE: Final = "sg_lang"
LOGINS_PER_MINUTE: Final = 10
"""Failed logins a minute from one address, then it waits: a token cannot be guessed at the page's speed."""
LOGIN_FAILURES_ALL: Final = 60
"""Failed logins a minute from all addresses together."""
MAX_LOGIN_ADDRESSES: Final = 10_000
MAX_LOGIN_BODY: Final = 2048
HISTORY: Final = 30
MAX_RAISED: Final = 1000
SPARK_HOURS: Final = 24
STATIC: Final = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
ACK_ROLE: Final[Role] = "technician"
"""The least role that may acknowledge an alert (a viewer may not)."""


class UiAck(StrictModel):
    note: Annotated[str, Field(max_length=1000)] = ""


@dataclass
class UiSources:
    """What the page shows, from the runtime."""

    journal: Journal
    engine: RuleEngine
    health: Callable[[], dict[str, Any]]
    devices: Callable[[], list[dict[str, Any]]]
    clock_synced: Callable[[], bool]
    check_config: Callable[[], tuple[int, str]] | None
    store_name: str
    raised: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Open alerts' raises found in the journal (None: gone from it), so each is looked up once."""


def ui_router(sources: UiSources, sessions: Sessions) -> APIRouter:
    router = APIRouter()
    db_uri = sources.journal.path.absolute().as_uri() + "?mode=ro"
    failures: dict[str, SlidingWindow] = {}
    everyone = SlidingWindow(LOGIN_FAILURES_ALL, 60.0)

    def session_of(request: Request) -> tuple[Session, str] | None:
        cookie = request.cookies.get(COOKIE)
        found = sessions.check(cookie)
        return None if found is None or cookie is None else (found, cookie)

    def require(request: Request, role: Role = "viewer", post: bool = False) -> Session:
        found = session_of(request)
        if found is None:
            raise HTTPException(status_code=401, detail="log in first")
        session, cookie = found
        if post:
            if not _same_site(request):
                raise HTTPException(status_code=403, detail="a request from another site")
            if not sessions.csrf_ok(cookie, request.headers.get("x-csrf-token")):
                raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")
        if not session.may(role):
            raise HTTPException(status_code=403, detail=f"your role ({session.role}) may not do this")
        return session

    def language(request: Request) -> str:
        return pick_language(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))

    @router.get("/ui")
    def page(request: Request) -> Response:
        found = session_of(request)
        if found is None:
            return RedirectResponse("/ui/login", status_code=303)
        session, cookie = found
        lang = language(request)
        boot = {
            "csrf": sessions.csrf(cookie),
            "me": {"name": session.name, "role": session.role},
            "lang": lang,
            "text": TEXT[lang],
            "languages": LANGUAGES,
        }
        return _html(_page(lang, TEXT[lang]["title"], boot))

    @router.get("/ui/login")
    def login_page(request: Request, failed: int = 0) -> Response:
        return _html(_login(language(request), failed=bool(failed)))

    @router.post("/ui/login")
    async def login(request: Request) -> Response:
        lang = language(request)
        if not _same_site(request):  # no logging a browser in from another site, as someone else
            return _html(_login(lang, failed=True), status=403)
        client = request.client.host if request.client is not None else "-"
        body = await request.body()
        # From here to the failure's count nothing awaits: logins sent together are counted one by one.
        now = time.monotonic()
        window = failures.get(client)
        if (window is not None and window.wait(now) > 0) or everyone.wait(now) > 0:
            return _html(_login(lang, failed=True, slow=True), status=429)
        token = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace")).get("token", [""])[0].strip()
        made = sessions.login(token) if token else None
        if made is None:
            # Failures count, per address and for all: forgetting an address (a full table) never frees a
            # blocked one, and many addresses together still get LOGIN_FAILURES_ALL a minute.
            if window is None:
                if len(failures) >= MAX_LOGIN_ADDRESSES:
                    for address in [a for a, w in failures.items() if w.wait(now) == 0]:
                        del failures[address]
                window = failures.setdefault(client, SlidingWindow(LOGINS_PER_MINUTE, 60.0))
            window.use(now)
            everyone.use(now)
            _LOGGER.warning("local page: a login with a token that is not in the config (from %s)", client)
            return _html(_login(lang, failed=True), status=401)
        session, cookie = made
        _LOGGER.info("local page: %s logged in (%s)", session.name, session.role)
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        return response

    @router.post("/ui/logout")
    def logout(request: Request) -> Response:
        require(request, post=True)
        sessions.logout(request.cookies.get(COOKIE, ""))
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
        return response

    @router.get("/ui/lang/{code}")
    def set_language(code: str, request: Request) -> Response:
        if code not in LANGUAGES:
            raise HTTPException(status_code=404, detail="no such language")
        back = "/ui" if session_of(request) is not None else "/ui/login"
        response = RedirectResponse(back, status_code=303)
        response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, path="/", samesite="strict")
        return response

    @router.get("/ui/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(status_code=404, detail="no such file")
        body = resources.files("gateway.api").joinpath("ui_static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @router.get("/ui/state")
    async def state(request: Request) -> Response:
        session = require(request)
        health, devices = sources.health(), sources.devices()  # on the event loop, as they must be
        with journal_read():
            body = await run_in_threadpool(_state, sources, db_uri, session, health, devices)
        return Response(orjson.dumps(body, default=str), media_type="application/json")

    @router.post("/ui/alerts/{alert_id:path}/ack")
    async def ack(
        alert_id: Annotated[str, PathParam(max_length=200, pattern=ALERT_ID)], body: UiAck, request: Request
    ) -> Response:
        session = require(request, ACK_ROLE, post=True)
        with journal_read(), snapshot(db_uri) as conn:
            found = any(a["alert_id"] == alert_id for a in open_alerts(conn))
        if not found:
            raise HTTPException(status_code=404, detail=f"no open alert {alert_id}")
        event = AlertAcknowledged(
            alert_id=alert_id, note=body.note, role=session.role, via="ui", by=session.name
        )
        seq = await acknowledge(sources.journal, event)
        return Response(orjson.dumps({"alert_id": alert_id, "seq": seq}), media_type="application/json")

    @router.get("/ui/config")
    def config(request: Request) -> Response:
        require(request, "admin")
        if sources.check_config is None:
            raise HTTPException(status_code=404, detail="this gateway was not started from a config file")
        code, text = sources.check_config()
        return Response(orjson.dumps({"ok": code == 0, "report": text}), media_type="application/json")

    return router


def _state(
    sources: UiSources,
    db_uri: str,
    session: Session,
    health: dict[str, Any],
    devices: list[dict[str, Any]],
) -> dict[str, Any]:
    now = time.time()
    with snapshot(db_uri) as conn:
        conn.execute("BEGIN")  # one snapshot for everything shown together
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        alerts = open_alerts(conn)
        history = _recent(
            conn, "kind IN ('alert.raised', 'alert.cleared', 'alert.escalated') AND cls < 3", HISTORY
        )
        audit = _audit(conn)
        low, drafts = stock_now(conn, tables)
        fridges = _cold_chain(conn, tables, sources.engine, now)
        messages = {
            h["data"].get("details", {}).get("alert_id"): h for h in history if h["kind"] == "alert.raised"
        }
        for alert in alerts:  # an alert open for longer than the history shows: its own raise, looked up once
            alert_id = alert["alert_id"]
            if alert_id not in messages:
                if alert_id not in sources.raised:
                    row = conn.execute(
                        "SELECT body FROM events WHERE kind = 'alert.raised' AND cls < 3"
                        " AND json_extract(body, '$.data.details.alert_id') = ? ORDER BY seq DESC LIMIT 1",
                        (alert_id,),
                    ).fetchone()
                    if len(sources.raised) >= MAX_RAISED:
                        sources.raised.clear()
                    sources.raised[alert_id] = _slim(orjson.loads(row[0])) if row is not None else None
                found = sources.raised[alert_id]
                if found is not None:
                    messages[alert_id] = found
    for alert in alerts:
        rule = sources.engine.rules.get(alert["rule_id"])
        alert["severity"] = rule.severity if rule is not None else None
        raised = messages.get(alert["alert_id"])
        alert["message"] = raised["data"].get("message") if raised else None
        alert["details"] = raised["data"].get("details") if raised else None
    try:
        waiting = oldest_pending(db_uri)
    except sqlite3.Error:
        waiting = {}
    outbox = health.get("outbox", {})
    for cls, at in waiting.items():
        name = CLASSES[cls]
        if name in outbox:
            outbox[name]["oldest_age_s"] = round(max(0.0, now - _epoch(at)), 1)
    quarantine = [
        {
            "qid": row[0],
            "received_at": row[1],
            "driver": row[2],
            "device_id": row[3],
            "reason": row[5],
            "detail": row[6],
            # What a device sent is for those who fix devices; a viewer sees only why it was refused.
            "payload": None
            if not session.may("technician")
            else row[8][:200]
            if isinstance(row[8], str)
            else _preview(row[8]),
        }
        for row in quarantine_page(db_uri, 20)
    ]
    return {
        "me": {"name": session.name, "role": session.role, "may_ack": session.may(ACK_ROLE)},
        "identity": {
            "store_id": health.get("store_id"),
            "store_name": sources.store_name,
            "gateway_id": health.get("gateway_id"),
            "version": health.get("version"),
            "uptime_s": health.get("uptime_s"),
            "clock_synced": sources.clock_synced(),
            "status": health.get("status"),
            "reason": health.get("reason"),
        },
        "hq": {
            "connected": health.get("hq_connected"),
            "commands_connected": health.get("hq_commands_connected"),
            "last_seq": health.get("last_seq"),
            "delivered_seq": health.get("delivered_seq"),
            "backlog": health.get("backlog"),
            "outbox": outbox,
            "disk_low": health.get("disk_low"),
        },
        "devices": devices,
        "alerts": alerts,
        "history": history,
        "coldchain": fridges,
        "stock": {"low": low, "drafts": drafts},
        "quarantine": quarantine,
        "audit": audit,
        "warnings": health.get("warnings", []),
    }


def _recent(conn: sqlite3.Connection, where: str, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT body FROM events WHERE {where} ORDER BY seq DESC LIMIT ?",  # noqa: S608 - literal conditions
        (limit,),
    ).fetchall()
    return [_slim(orjson.loads(body)) for (body,) in rows]


def _slim(envelope: dict[str, Any]) -> dict[str, Any]:
    keep = ("seq", "kind", "device_id", "recorded_at", "data")
    return {k: envelope.get(k) for k in keep}


def _audit(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Who did what: acknowledgements (with their note), HQ's documents (rules, roster, planogram), and starts with
    a config other than the start before's. Each is an event, so HQ has the same log."""
    events = _recent(
        conn, "kind IN ('alert.acknowledged', 'document.updated', 'gateway.status') AND cls < 3", HISTORY * 4
    )
    out: list[dict[str, Any]] = []
    starts = [e for e in events if e["kind"] == "gateway.status" and e["data"].get("status") == "online"]
    changed = {
        newer["seq"]
        for newer, older in itertools.pairwise(starts)
        if newer["data"].get("config_hash") != older["data"].get("config_hash")
    }
    for event in events:
        data = event["data"]
        if event["kind"] == "alert.acknowledged":
            who, what = data.get("by") or data.get("role"), f"acknowledged {data.get('alert_id')}"
            entry = {"role": data.get("role"), "via": data.get("via"), "note": data.get("note")}
        elif event["kind"] == "document.updated":
            who, what = "HQ", f"{data.get('name')} v{data.get('version')} ({data.get('count')} entries)"
            entry = {"role": "hq", "via": "hq", "note": data.get("request_id")}
        elif event["seq"] in changed:  # whoever edited the file on the box: the config does not say
            who, what = "on the box", f"config changed ({str(data.get('config_hash'))[:12]})"
            entry = {"role": "-", "via": "config", "note": None}
        else:
            continue
        out.append({"seq": event["seq"], "at": event["recorded_at"], "who": who, "what": what, **entry})
    return out[:HISTORY]


def _cold_chain(
    conn: sqlite3.Connection, tables: set[str], engine: RuleEngine, now: float
) -> list[dict[str, Any]]:
    """Each fridge the HACCP log keeps: its last 24 h (one point per interval), the limit of the rule watching it,
    and its defrost and door now (from its latest logged reading: one read by seq, whatever the journal's size)."""
    if "haccp_interval" not in tables:
        return []
    since = int(now - SPARK_HOURS * 3600)
    rows = conn.execute(
        "SELECT device_id, start, last_c, last_seq FROM haccp_interval WHERE start >= ? ORDER BY device_id, start",
        (since,),
    ).fetchall()
    series: dict[str, list[tuple[int, float]]] = {}
    newest: dict[str, int] = {}
    for device, start, last, last_seq in rows:
        newest[device] = int(last_seq)
        if last is not None:
            series.setdefault(device, []).append((int(start), float(last)))
    out = []
    for device, points in sorted(series.items()):
        latest = conn.execute(
            "SELECT body, recorded_at FROM events WHERE seq = ?", (newest[device],)
        ).fetchone()
        data: dict[str, Any] = orjson.loads(latest[0])["data"] if latest else {}
        values: dict[str, Any] = data.get("values", {})
        rule = watching_rule(engine.rules, device, data.get("source"))
        metric, defrost, door = (
            (rule.metric, rule.defrost_metric, rule.door_metric)
            if rule is not None
            else (HACCP_METRIC, "defrost_active", "door_open")
        )
        limit = rule.max_c if rule is not None else None
        out.append(
            {
                "device_id": device,
                "last_c": values.get(metric, points[-1][1]),
                "last_at": latest[1] if latest else None,
                "limit_c": limit,
                "defrost": bool(values.get(defrost, 0) >= 0.5),
                "door_open": bool(values.get(door, 0) >= 0.5),
                "spark": _spark(points, limit, since, int(now)),
            }
        )
    return out


def _spark(
    points: Sequence[tuple[int, float]], limit: float | None, since: int, until: int
) -> dict[str, Any]:
    """An SVG path (120 x 32) of the readings over the last 24 h, and the limit's line."""
    values = [v for _, v in points] + ([limit] if limit is not None else [])
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def y(value: float) -> float:
        return round(30 - (value - low) / span * 28, 1)

    def x(at: int) -> float:
        return round((at - since) / max(1, until - since) * 120, 1)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x(at)},{y(v)}" for i, (at, v) in enumerate(points))
    if len(points) == 1:  # one interval so far: a short stroke, not an invisible point
        path += f" L{max(0.0, x(points[0][0]) - 3)},{y(points[0][1])}"
    return {"path": path, "limit_y": None if limit is None else y(limit), "low": low, "high": high}


def _preview(payload: bytes | None) -> str | None:
    if payload is None:
        return None
    try:
        text = bytes(payload[:200]).decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(payload)} bytes, not text>"
    return text if text.isprintable() else f"<{len(payload)} bytes, not printable>"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _same_site(request: Request) -> bool:
    """A POST the page itself sent: no Origin (not a browser's cross-site POST), or one naming this host (as the
    browser asked for it, or as a proxy in front says it was asked: X-Forwarded-Host)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    asked = {request.headers.get("host"), request.headers.get("x-forwarded-host")} - {None}
    return origin.split("://", 1)[-1] in asked


def _secure(request: Request) -> bool:
    """Secure cookies when the page is served over TLS (here, or by a reverse proxy in front that says so)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _html(body: str, status: int = 200) -> Response:
    return Response(
        body,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self';"
            " script-src 'self'; frame-ancestors 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",  # "no-referrer" would make the form's Origin "null"
            "Cache-Control": "no-store",
        },
    )


def _head(lang: str, title: str) -> str:
    return (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="stylesheet" href="/ui/static/style.css"></head>'
    )


def _switch(lang: str) -> str:
    return " ".join(
        f'<a class="lang{" on" if code == lang else ""}" href="/ui/lang/{code}">{html.escape(name)}</a>'
        for code, name in LANGUAGES.items()
    )


def _login(lang: str, failed: bool = False, slow: bool = False) -> str:
    text = TEXT[lang]
    error = ""
    if failed:
        error = f'<p class="error" role="alert">{html.escape(text["too_many" if slow else "bad_token"])}</p>'
    return (
        _head(lang, text["title"])
        + f'<body class="login"><main><h1>{html.escape(text["title"])}</h1>'
        + f'<form method="post" action="/ui/login"><label for="token">{html.escape(text["token"])}</label>'
        + '<input id="token" name="token" type="password" autocomplete="current-password" required>'
        + f'<button type="submit">{html.escape(text["log_in"])}</button></form>{error}'
        + f'<nav class="langs">{_switch(lang)}</nav></main></body></html>'
    )


def _page(lang: str, title: str, boot: dict[str, Any]) -> str:
    # The boot data goes in a JSON script element (not run): the script reads it; <, > and & escaped inside.
    data = orjson.dumps(boot).decode().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        _head(lang, title)
        + f'<body><script id="boot" type="application/json">{data}</script>'
        + f'<header><h1 id="title">{html.escape(title)}</h1><nav class="langs">{_switch(lang)}</nav></header>'
        + '<main id="app"><p id="loading">…</p></main>'
        + '<script src="/ui/static/app.js"></script></body></html>'
    )
