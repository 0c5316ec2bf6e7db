"""The data directory's own files beside the journal: the seq reservation (``journal.seq``), which keeps seqs
from going backwards when the journal is lost, and the lock file (``gateway.lock``): one gateway per data
directory."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import Final

from gateway.kernel.errors import StoreGatewayError

_LOGGER = logging.getLogger("gateway.kernel.recovery")  # one log name for all of recovery


SEQ_FILE: Final = "journal.seq"
"""The reservation sidecar, next to the journal."""
SEQ_BLOCK: Final = 1_000_000
"""Seqs reserved per write of the sidecar."""


def fsync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable (POSIX: the directory entry is its own write)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- seq reservation ------------------------------------------------------------------------------


class SeqReservation:
    """Seqs never go backwards, even when the journal is lost: ``<data_dir>/journal.seq`` records a seq the
    journal has not reached yet (``{"reserved_through": N}``), and a fresh journal starts above it.

    Written atomically (temporary file, fsync, rename, fsync of the directory) once per block of
    ``block`` seqs, so it costs one small write per ~900,000 events. Not thread-safe: use it from the
    journal's writer thread only.
    """

    def __init__(self, data_dir: Path, block: int = SEQ_BLOCK) -> None:
        if block < 10:
            raise ValueError(f"block must be at least 10, not {block}")
        self.path = data_dir / SEQ_FILE
        self._block = block
        self._headroom = block // 10
        self._reserved = 0
        self._loaded = False
        self._failing = False

    @property
    def reserved_through(self) -> int:
        """The highest seq reserved on disk (0: nothing yet)."""
        return self._reserved

    def load(self) -> int:
        """Read the sidecar; 0 if it is missing, or unreadable (logged: the guarantee is then weaker)."""
        self._loaded = True
        self._reserved = 0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as err:
            _LOGGER.error("cannot read the seq reservation %s: %s", self.path, err)
            return 0
        try:
            value = json.loads(raw)["reserved_through"]
        except (ValueError, KeyError, TypeError):
            value = None
        if type(value) is not int or value < 0:
            _LOGGER.error("the seq reservation %s is unreadable (%r): ignored", self.path, raw[:80])
            return 0
        self._reserved = value
        return value

    def ensure(self, last_seq: int) -> None:
        """Keep the reservation a tenth of a block ahead of ``last_seq`` (the journal's last committed seq).

        Call it once the journal is open and after every commit. One commit must add fewer than ``block/10``
        seqs, so no committed seq ever passes the reservation on disk. A failed write (disk full) is logged
        and retried on the next call; it never raises, so it cannot stall the writer.
        """
        if last_seq + self._headroom <= self._reserved:
            return
        if not self._loaded:
            self.load()
            if last_seq + self._headroom <= self._reserved:
                return
        target = last_seq + self._block
        try:
            self._write(target)
        except OSError as err:
            if not self._failing:
                _LOGGER.error("cannot write the seq reservation %s (will retry): %s", self.path, err)
            else:
                _LOGGER.debug("seq reservation write failed again: %s", err)
            self._failing = True
            return
        if self._failing:
            _LOGGER.warning("the seq reservation %s is written again", self.path)
            self._failing = False
        self._reserved = target

    def start_after_corruption(self, salvaged_last_seq: int | None = None) -> int:
        """The first seq of a fresh journal replacing a lost one: above the reservation, and above whatever
        seq could be salvaged from the old journal (in case the sidecar was lost too); 1 if there is neither.
        """
        if not self._loaded:
            self.load()
        return max(self._reserved, salvaged_last_seq or 0) + 1

    def _write(self, reserved_through: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"reserved_through": reserved_through}).encode() + b"\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno != errno.ENOSPC or not self.path.exists():
                raise
            # A full disk has no block for a new file, but the sidecar has one: overwrite it in place (a few
            # dozen bytes in one sector, so a power cut leaves the old number or the new one).
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data.ljust(max(len(data), os.fstat(fd).st_size)), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


# --- one gateway per data directory ---------------------------------------------------------------

LOCK_FILE: Final = "gateway.lock"
"""Held (``flock``) by the running gateway; its existence also marks a data directory that was used before."""


class DataDirBusyError(StoreGatewayError):
    """Another process holds the data directory's lock."""


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/gateway.lock`` for the life of the process.

    Two gateways on one data directory would both hand out seqs from the same journal and fail with
    ``UNIQUE constraint failed: events.seq`` (or worse, interleave). ``flock`` is released by the kernel when the
    holder dies, SIGKILL included, so a stale lock file never blocks a restart. The file is never deleted.

    Its lines: the holder's pid; ``state: fresh`` until a journal has been opened in the directory, then
    ``state: used`` (a journal missing together with its seq reservation is then a loss, not a first start:
    docs/OUTBOX.md, "Lost journal"); and ``damaged: <reason>`` from a run that stopped on a damaged journal
    until a start has replaced it (a second record beside ``journal.damaged``, which a failing disk may not
    have taken). A lock file without a ``state`` line is from an older release: the directory was used.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self.existed = False
        """The lock file was there before this process."""
        self.used = False
        """A journal was opened in this directory before (see the class docstring)."""
        self.damaged: tuple[str, str] | None = None
        """``(id, reason)``: a previous run stopped on a damaged journal, and no start has replaced it since."""
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirBusyError` naming the holder's pid."""
        import fcntl  # POSIX only; imported here so the module still imports elsewhere (tests of probe)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The directory itself is locked too: deleting the lock file while a gateway runs must not let a second
        # one in (it would lock a new file of the same name).
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise DataDirBusyError(self._busy_message(self._holder())) from None
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        self.existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except BaseException:
            self.release()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.release()
            raise DataDirBusyError(self._busy_message(self._holder())) from None
        except BaseException:
            os.close(fd)
            self.release()
            raise
        self._fd = fd
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").splitlines()
        states = [line[len("state: ") :].strip() for line in previous if line.startswith("state: ")]
        # No state line: an older release's lock file (a pid), so used; an empty one is a first start cut short.
        self.used = states[0] == "used" if states else any(line.strip() for line in previous)
        damaged = [line[len("damaged: ") :].strip() for line in previous if line.startswith("damaged: ")]
        self.damaged = None
        if damaged:
            first, _, rest = damaged[0].partition(" ")
            self.damaged = (first[3:], rest) if first.startswith("id=") else ("", damaged[0])
        self._write()
        if not self.existed:
            fsync_dir(self.path.parent)  # the first-start marker must survive a power cut

    def mark_used(self) -> None:
        """A journal is open in the directory: from now on, losing it with its reservation is a loss."""
        if not self.used:
            self.used = True
            self._write()

    def note_damaged(self, reason: str, damage_id: str = "") -> None:
        """Best effort (the disk may be failing): the next start replaces the journal even without its mark."""
        self.damaged = ("".join(damage_id.split()), " ".join(reason.split())[:300] or "damaged")
        try:
            self._write()
        except OSError as err:
            _LOGGER.error("cannot record the damaged journal in %s: %s", self.path, err)

    def clear_damaged(self) -> None:
        """Best effort: a record left behind is recognised as handled by the journal that replaced the file."""
        if self.damaged is not None:
            self.damaged = None
            try:
                self._write()
            except OSError as err:
                _LOGGER.error("cannot clear the damaged-journal record in %s: %s", self.path, err)

    def _write(self) -> None:
        if self._fd is None:
            return
        lines = [str(os.getpid()), f"state: {'used' if self.used else 'fresh'}"]
        if self.damaged is not None:
            lines.append(f"damaged: id={self.damaged[0]} {self.damaged[1]}")
        data = ("\n".join(lines) + "\n").encode()
        # Overwritten in place (never truncated first: a crash in between must not lose the state lines).
        os.pwrite(self._fd, data.ljust(max(len(data), os.fstat(self._fd).st_size)), 0)
        os.fsync(self._fd)

    def _holder(self) -> str:
        with contextlib.suppress(OSError):
            return (
                self.path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip() or "unknown"
            )
        return "unknown"

    def _busy_message(self, holder: str) -> str:
        return f"another store-gateway is using {self.path.parent} (pid {holder}); lock file {self.path}"

    def release(self) -> None:
        """Unlock (the file stays: it marks the directory as used)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


# --- the disk reserve ----------------------------------------------------------------------------

BALLAST_FILE: Final = "journal.reserve"
BALLAST_BYTES: Final = 8 * 1024 * 1024
"""Disk space kept in reserve next to the journal for a full disk (see :class:`Ballast`)."""


class Ballast:
    """A file of reserved space next to the journal (``BALLAST_BYTES``), released when the disk is full: the
    journal can then still open (start-up) and commit for a while (transactions, alerts) before it must pause."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self, min_free_bytes: int) -> None:
        """Create it if missing and the disk has room to spare (never the file that fills it)."""
        if self.path.exists():
            return
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < BALLAST_BYTES + min_free_bytes + BALLAST_BYTES:
                return
            with self.path.open("wb") as fh:
                try:  # real blocks, not a sparse file; allocated without writing them (no SD wear)
                    os.posix_fallocate(fh.fileno(), 0, BALLAST_BYTES)
                except OSError:  # a filesystem without fallocate
                    fh.write(bytes(BALLAST_BYTES))
        except OSError as err:
            _LOGGER.warning("cannot reserve %d MiB of disk in %s: %s", BALLAST_BYTES // 2**20, self.path, err)
            self.path.unlink(missing_ok=True)

    def release(self, why: str) -> bool:
        """Delete it; True if there was one to delete."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as err:
            _LOGGER.error("cannot release the disk reserve %s: %s", self.path, err)
            return False
        _LOGGER.critical("%s: released the %d MiB disk reserve %s", why, BALLAST_BYTES // 2**20, self.path)
        return True
