"""A simulated Chafon CF-RU5102-style UHF RFID reader on a pseudo-terminal: tags appear and disappear.

The reader answers Inventory commands (0x01) written to its port with the tags in its field, in as many
frames as needed (status 0x03 "more data" on all but the last, 0xFB when no tag is in the field), exactly as
:mod:`drivers.serial.chafon` decodes them. Point a serial device at the printed port (or at ``--link``, a
symlink standing in for ``/dev/serial/by-id/...``).

:class:`PtyReader` is what tests use: ``open()`` creates the pty pair (and the link), ``close()`` pulls the
plug, ``answering = False`` makes the reader stop answering, ``garbage`` is written before each answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import random
import sys
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from drivers.epc import encode_sgtin96
from drivers.serial import chafon
from drivers.serial.framing import Frame
from simulators.catalog import CATALOG, CatalogItem

MAX_QUEUED: Final = 1 << 20
"""Bytes of answers the simulated reader keeps while the pty is full."""


def catalog_epcs(count: int, seed: int = 1, items: Sequence[CatalogItem] = CATALOG) -> list[bytes]:
    """``count`` SGTIN-96 EPCs of items in the simulated catalogue (``items``; serials 1, 2, ... per item):
    the n-th is a tag of ``items[n % len(items)]``."""
    rng = random.Random(seed)
    return [
        encode_sgtin96("0" + items[n % len(items)].gtin.zfill(13), n // len(items) + 1 + rng.randrange(1000))
        for n in range(count)
    ]


class TagField:
    """The tags in a reader's field: a population of which some are present; ``churn`` moves a few."""

    def __init__(self, population: list[bytes], present_ratio: float = 0.8, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self.population = population
        self.present = {epc for epc in population if self._rng.random() < present_ratio}

    def churn(self, fraction: float = 0.05) -> None:
        for epc in self.population:
            if self._rng.random() < fraction:
                self.present ^= {epc}

    def epcs(self) -> list[bytes]:
        return sorted(self.present)


class PtyReader:
    """One reader on a pty pair, served on the running event loop."""

    def __init__(self, field: TagField, address: int = 0, link: Path | None = None) -> None:
        self.field = field
        self.address = address
        self.link = link
        self.answering = True
        self.garbage = b""
        self.commands = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._framer = chafon.framer()
        self._out = bytearray()
        self.port = ""

    def open(self) -> str:
        """Plug the reader in: a new pty pair; returns the port path (the link, if one was given)."""
        master, slave = os.openpty()
        tty.setraw(slave)
        flags = fcntl.fcntl(master, fcntl.F_GETFL)
        fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._master, self._slave = master, slave
        self._framer = chafon.framer()
        self.port = os.ttyname(slave)
        asyncio.get_running_loop().add_reader(master, self._readable)
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.port)
            tmp.replace(self.link)
            return str(self.link)
        return self.port

    def close(self) -> None:
        """Pull the plug: the pty pair goes away (and the link with it, as udev removes by-id links)."""
        self._out.clear()
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            asyncio.get_running_loop().remove_writer(self._master)
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def write(self, data: bytes) -> None:
        """Write raw bytes on the line (answers, garbage, floods). What the pty does not take at once is
        queued and written as it drains (a large inventory is many frames); beyond MAX_QUEUED it is dropped,
        as a reader's own buffer would overflow."""
        if self._master is None:
            return
        if not self._out:
            with contextlib.suppress(BlockingIOError):
                data = data[os.write(self._master, data) :]
            if not data:
                return
            asyncio.get_running_loop().add_writer(self._master, self._writable)
        self._out += data[: MAX_QUEUED - len(self._out)]

    def _writable(self) -> None:
        assert self._master is not None
        try:
            del self._out[: os.write(self._master, self._out)]
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()
        if not self._out:
            asyncio.get_running_loop().remove_writer(self._master)

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except OSError:
            return
        for item in self._framer.feed(data):
            if isinstance(item, Frame):
                self._on_command(item)

    def _on_command(self, frame: Frame) -> None:
        command = chafon.decode_command(frame.payload)
        if isinstance(command, Exception) or command.address not in (self.address, chafon.BROADCAST):
            return
        self.commands += 1
        if not self.answering:
            return
        if command.command == chafon.CMD_INVENTORY:
            frames = chafon.encode_inventory_responses(self.address, self.field.epcs())
        else:
            frames = [chafon.encode_response(self.address, command.command, 0xFE)]
        self.write(self.garbage + b"".join(frames))


async def _serve(args: argparse.Namespace) -> None:
    field = TagField(catalog_epcs(args.tags, args.seed), args.present, args.seed)
    reader = PtyReader(field, args.address, Path(args.link) if args.link else None)
    port = reader.open()
    print(
        f"reader on {port} (pty {reader.port}), {len(field.present)} of {args.tags} tags present", flush=True
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration if args.duration else None
    try:
        while deadline is None or loop.time() < deadline:
            await asyncio.sleep(args.churn_s)
            field.churn(args.churn)
            print(f"{len(field.present)} tags present, {reader.commands} commands answered", flush=True)
    finally:
        reader.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway simulate rfid-reader", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--link", help="Also make this symlink to the port (stands in for /dev/serial/by-id/...)."
    )
    parser.add_argument("--tags", type=int, default=200, help="Tag population (default 200).")
    parser.add_argument("--present", type=float, default=0.8, help="Share of tags in the field at start.")
    parser.add_argument("--churn", type=float, default=0.05, help="Share of tags that move per churn step.")
    parser.add_argument("--churn-s", type=float, default=5.0, help="Seconds between churn steps.")
    parser.add_argument("--address", type=int, default=0, help="Reader address (0..254).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=0, help="Stop after this many seconds (0: never).")
    return parser


def main(argv: Sequence[str]) -> int:
    """``store-gateway simulate rfid-reader ...`` (see :mod:`simulators.cli`)."""
    args = _parser().parse_args(list(argv))
    if args.tags < 0 or not 0 <= args.address <= 254 or args.churn_s <= 0:
        print("rfid-reader: --tags >= 0, --address 0..254, --churn-s > 0", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0
