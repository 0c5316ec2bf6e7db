"""A real PostgreSQL server for tests: initdb in a temp dir, ``postgres`` on a free loopback port.

One server per test session, tuned for speed (no fsync: a crashed test server is thrown away anyway). initdb
and the server refuse to run as root, so as root they run as the ``postgres`` user the Debian package creates.
Each test gets its own schema (``fresh_schema``), much cheaper than a database per test. Tests that use it are
skipped, with the reason, only when PostgreSQL is not installed (.ci/run installs it) or, as root, when there is
no ``postgres`` user to run it as.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness.brokers import free_port


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with initdb, or the directory of an initdb on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    """One postgres process; ``dsn()`` connects as the superuser ``postgres`` (trust auth, loopback only)."""

    def __init__(self, bin_dir: Path, settings: dict[str, str] | None = None) -> None:
        self._settings = dict(settings or {})
        """Server settings over the fast test ones (a benchmark turns fsync back on)."""
        self._as: dict[str, Any] = {}
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as")
            self._as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self.bin_dir = bin_dir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)

    def start(self) -> PostgresServer:
        """initdb and start; on any failure the process and the directory are removed before raising."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        # cwd: the server user may not be allowed into the directory pytest runs in.
        initdb = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            cwd=self.dir,
            **self._as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr.decode(errors='replace')}")
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "32MB",
            # Concurrent receivers wait on each other's row locks: find a deadlock fast (it is retried).
            "deadlock_timeout": "100ms",
            **self._settings,
        }
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.dir, **self._as)
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postgres exited: {self.log.read_text()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("postgres did not accept connections within 30 s") from None
                time.sleep(0.05)

    def dsn(self, schema: str | None = None) -> str:
        dsn = f"host={self.host} port={self.port} user=postgres dbname=postgres"
        return dsn if schema is None else f"{dsn} options='-csearch_path={schema}'"

    def fresh_schema(self) -> str:
        """A new empty schema; returns a DSN whose connections use it."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(
                signal.SIGINT
            )  # fast shutdown: disconnects clients; the data dir goes anyway
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


_SERVER: PostgresServer | None = None


def session_server() -> Iterator[PostgresServer]:
    """Body of a session-scoped fixture: the session's one server (started on first use, by whichever module
    asks first), or a skip saying why when PostgreSQL is not installed::

        @pytest.fixture(scope="session")
        def postgres() -> Iterator[PostgresServer]:
            yield from session_server()
    """
    global _SERVER  # one server per session, shared by every module that uses it
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): run .ci/run or 'apt-get install postgresql'")
    if _SERVER is None:
        _SERVER = PostgresServer(bin_dir).start()
    yield _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        _SERVER = None
