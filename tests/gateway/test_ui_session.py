"""The local page's logins: signed session cookies (forged, tampered, expired, revoked, a token taken out of the
config), the CSRF token, the key file; the API's guard letting a session read only what its role may, over real
HTTP; the config's users; ``store-gateway hash-token``."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from gateway.api.session import COOKIE, KEY_FILE, SESSION_S, Sessions, load_key, token_sha256
from gateway.kernel.config import ApiConfig, ApiUser
from tests.gateway.test_api import AUTH, make_app, running
from tests.gateway.test_api import journal as journal  # the fixture: a journal file with its tables

MAY, VIC, TECH = "may-token-0123456789abcdef", "vic-token-0123456789abcdef", "tech-token-0123456789abcdef"


def user(name: str, role: Any, token: str) -> ApiUser:
    return ApiUser(name=name, role=role, token_sha256=token_sha256(token))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_signed_expires_and_ends_with_its_token_or_a_logout(tmp_path: Path) -> None:
    users = [user("May", "manager", MAY), user("Vic", "viewer", VIC)]
    clock = Clock()
    sessions = Sessions(load_key(tmp_path), lambda: users, clock)
    assert sessions.login("not-a-token-anyone-has") is None
    made = sessions.login(MAY)
    assert made is not None
    session, cookie = made
    assert (session.name, session.role) == ("May", "manager")
    assert sessions.check(cookie) == session
    assert session.may("technician")
    assert not session.may("admin")

    payload, signature = cookie.split(".")
    forged = Sessions(os.urandom(32), lambda: users, clock).login(MAY)
    assert forged is not None
    for bad in (
        f"{payload}.{signature[:-2]}AA",  # tampered signature
        f"{forged[1].split('.')[0]}x.{signature}",  # another payload
        forged[1],  # signed with another key
        "a.\xe9",  # not ASCII: refused, not an error
        "",
        None,
        "no-dot",
    ):
        assert sessions.check(bad) is None, bad

    assert not sessions.csrf_ok(cookie, None)
    assert not sessions.csrf_ok(cookie, "\xe9")
    assert not sessions.csrf_ok(cookie, sessions.csrf(forged[1]))
    assert sessions.csrf_ok(cookie, sessions.csrf(cookie))

    clock.now += SESSION_S + 1
    assert sessions.check(cookie) is None, "expired"
    clock.now -= SESSION_S + 1

    users[0] = user("May", "viewer", MAY)  # her role changed: log in again
    assert sessions.check(cookie) is None
    users[0] = user("May", "manager", MAY)
    assert sessions.check(cookie) is not None
    del users[0]  # her token left the config
    assert sessions.check(cookie) is None

    viewer = sessions.login(VIC)
    assert viewer is not None
    sessions.logout(viewer[1])
    assert sessions.check(viewer[1]) is None, "a logged-out cookie, copied before, no longer logs in"


def test_the_key_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    (tmp_path / "ui-session.tmp").write_bytes(b"old")
    (tmp_path / "ui-session.tmp").chmod(0o644)
    key = load_key(tmp_path)
    assert len(key) == 32
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert load_key(tmp_path) == key, "kept across restarts: sessions survive them"


async def test_a_session_reads_only_what_its_role_may_and_writes_nothing(
    journal: tuple[Path, sqlite3.Connection], tmp_path: Path
) -> None:
    users = [user("Vic", "viewer", VIC), user("Tess", "technician", TECH)]
    sessions = Sessions(load_key(tmp_path), lambda: users)
    app, _ = make_app(journal[0], session=sessions.check, devices=list)
    viewer, tech = sessions.login(VIC), sessions.login(TECH)
    assert viewer is not None
    assert tech is not None
    async with running(app) as (base, _), httpx.AsyncClient(base_url=base) as client:

        async def get(path: str, cookie: str | None, headers: dict[str, str] | None = None) -> int:
            sent = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
            return (await client.get(path, headers={**sent, **(headers or {})})).status_code

        assert await get("/api/devices", viewer[1]) == 200
        assert await get("/api/events", viewer[1]) == 403, "whole events are not for a viewer"
        assert await get("/api/events", tech[1]) == 200
        assert await get("/api/quarantine", tech[1]) == 200
        assert await get("/api/eventsX", tech[1]) == 401, "only the paths listed, not their prefixes"
        assert await get("/api/receipts/pos-01/R-1", tech[1]) == 401
        assert await get("/metrics", tech[1]) == 401
        assert await get("/api/devices", "forged.cookie") == 401
        assert await get("/api/devices", None) == 401
        # Another cookie the browser holds for this host (Grafana on the box) does not hide the session's.
        mixed = {"Cookie": f'grafana_prefs={{"a": 1}}; other=a b; {COOKIE}={viewer[1]}'}
        assert await get("/api/devices", None, mixed) == 200
        posted = await client.post(
            "/api/alerts/r/x/1/ack",
            headers={"Cookie": f"{COOKIE}={tech[1]}"},
            json={"note": "", "role": "technician"},
        )
        assert posted.status_code == 401, "a session never writes through the API: only with the token"
        assert (await client.get("/api/devices", headers=AUTH)).status_code == 200


def test_the_config_refuses_shared_or_borrowed_tokens() -> None:
    token = SecretStr("api-token-0123456789abcdef")
    ApiConfig(token=token, users=[user("May", "manager", MAY), user("Vic", "viewer", VIC)])
    cases = [
        [user("May", "manager", MAY), user("May", "viewer", VIC)],  # one name twice
        [user("May", "manager", MAY), user("Vic", "viewer", MAY)],  # one token twice
        [user("api-token", "viewer", VIC)],  # the API token's name
        [user("May", "viewer", token.get_secret_value())],  # the API token itself
    ]
    for users in cases:
        with pytest.raises(ValidationError):
            ApiConfig(token=token, users=users)


def test_hash_token_prints_the_hash_of_a_token_given_or_made() -> None:
    def run(*args: str, given: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "hash-token", *args],
            input=given,
            capture_output=True,
            text=True,
            check=False,
        )

    done = run(given=MAY + "\n")
    assert (done.returncode, done.stdout) == (0, f"token_sha256: {token_sha256(MAY)}\n")
    made = run("--new")
    token, digest = (line.split(": ", 1)[1] for line in made.stdout.splitlines())
    assert len(token) >= 16
    assert digest == token_sha256(token)
    assert run(given="short\n").returncode == 2
