"""A local user on the box: the journal (staff ids, GPS fixes, sales) and its side files are the gateway's
alone, on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.gateway.test_journal import new_journal, running
from tests.harness.pos_drafts import pos_draft


async def test_the_data_directory_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as a technician's mkdir leaves it
    journal = new_journal(data)
    async with running(journal):
        assert journal.submit(pos_draft("R1", [("SKU-1", "1")]))
        await journal.flush()
        modes = {name: stat.S_IMODE((data / name).stat().st_mode) for name in os.listdir(data)}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {"journal.db", "journal.db-wal", "journal.seq"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}
