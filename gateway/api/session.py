"""The local page's logins: a token from the config exchanged for a signed session cookie, and its CSRF token.

The cookie holds who logged in (the user's name and role, and which token: the first hex digits of its hash),
until when, and an HMAC over that with a key kept in the data directory (``ui-session.key``, made at the first
start). So a session survives a gateway restart, and ends when it expires, when the key file is removed, or when
its token is no longer in the config. The CSRF token is another HMAC of the same cookie: a page from elsewhere
cannot read it, and every POST must send it back in ``X-CSRF-Token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from gateway.kernel.config import ROLES, ApiUser, Role

SESSION_S: Final = 12 * 3600
"""A login lasts a working day."""
COOKIE: Final = "sg_session"
KEY_FILE: Final = "ui-session.key"
MAX_REVOKED: Final = 10_000
"""Logged-out sessions remembered until they would have expired."""


def key_id(user: ApiUser) -> str:
    """Which token a session came from (the first hex digits of its hash): it ends when the token is removed."""
    return user.token_sha256[:16]


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    role: Role
    key_id: str
    expires: int

    def may(self, role: Role) -> bool:
        """Whether this session's role is ``role`` or above."""
        return ROLES.index(self.role) >= ROLES.index(role)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_key(data_dir: Path) -> bytes:
    """The data directory's session key, made (0600) if there is none yet."""
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    path.with_suffix(".tmp").unlink(missing_ok=True)  # a leftover keeps its mode: start afresh with 0600
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    os.replace(path.with_suffix(".tmp"), path)
    folder = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return key


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Logins against the configured users; cookies signed with the data directory's key."""

    def __init__(
        self, key: bytes, users: Callable[[], Sequence[ApiUser]], clock: Callable[[], float] = time.time
    ):
        self._key = key
        self._users = users
        self._clock = clock
        self._revoked: dict[str, int] = {}
        """Signatures of logged-out sessions -> when they would have expired."""

    def login(self, token: str) -> tuple[Session, str] | None:
        """The session (and its cookie value) for a configured token; None for any other."""
        digest = token_sha256(token)
        for user in self._users():
            if hmac.compare_digest(digest, user.token_sha256):
                session = Session(user.name, user.role, key_id(user), int(self._clock()) + SESSION_S)
                payload = _b64(orjson.dumps([session.name, session.role, session.key_id, session.expires]))
                return session, f"{payload}.{self._sign(b'session|' + payload.encode())}"
        return None

    def check(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, if it is ours, unexpired, and its token is still configured."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 1000:
            return None
        payload, signature = cookie.split(".")
        if not cookie.isascii() or not hmac.compare_digest(
            signature.encode(), self._sign(b"session|" + payload.encode()).encode()
        ):
            return None
        if signature in self._revoked:
            return None
        try:
            name, role, kid, expires = orjson.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if not isinstance(expires, int) or expires <= self._clock() or role not in ROLES:
            return None
        if not any(key_id(u) == kid and u.role == role and u.name == name for u in self._users()):
            return None  # the token was removed from the config, or its role changed: log in again
        return Session(str(name), role, str(kid), expires)

    def csrf(self, cookie: str) -> str:
        return self._sign(b"csrf|" + cookie.encode())

    def csrf_ok(self, cookie: str, given: str | None) -> bool:
        return (
            given is not None
            and given.isascii()
            and hmac.compare_digest(given.encode(), self.csrf(cookie).encode())
        )

    def logout(self, cookie: str) -> None:
        """This session's cookie no longer logs in (until the gateway restarts: then it lasts until it expires)."""
        now = self._clock()
        self._revoked = {sig: until for sig, until in self._revoked.items() if until > now}
        session = self.check(cookie)
        if session is not None and len(self._revoked) < MAX_REVOKED:
            self._revoked[cookie.rpartition(".")[2]] = session.expires

    def _sign(self, message: bytes) -> str:
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())
