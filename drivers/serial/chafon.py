"""Chafon CF-RU5102 / UHFReader18-style UHF RFID readers: pure frame encoding and decoding.

Frames (both directions): ``Len Adr Cmd [Status] Data CRC-LSB CRC-MSB``; ``Len`` counts the bytes after
itself, the CRC is CRC-16/MCRF4XX over ``Len .. Data``. Responses carry a status byte after ``reCmd``.
Inventory (EPC C1G2, command 0x01) answers ``Num`` then ``Num`` entries of ``EPC length, EPC``; status 0x01
(inventory finished early), 0x02 (scan time overflowed) and 0x04 (reader buffer full) end an inventory,
0x03 (more data) says another frame follows, 0xFB says there is no tag in the field.

Sources: the UHFReader18 SDK header (status codes InventoryReturnEarly_G2 = 0x01, InventoryTimeOut_G2 = 0x02,
InventoryMoreData_G2 = 0x03, ReadermoduleMCUFull_G2 = 0x04) and github.com/miek/ru5102 (src/lib.rs: frame
layout, MCRF4XX CRC, NoTags = 0xFB, and its test vectors). Not verified on hardware. CF-RU5102 inventory
answers carry no RSSI and no antenna number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from drivers.errors import DecodeError
from drivers.serial.crc import crc16_mcrf4xx
from drivers.serial.framing import LengthCrcFramer

CMD_INVENTORY: Final = 0x01
BROADCAST: Final = 0xFF

STATUS_OK: Final = 0x00
STATUS_DONE: Final = 0x01
STATUS_TIMEOUT: Final = 0x02
STATUS_MORE: Final = 0x03
STATUS_FULL: Final = 0x04
STATUS_NO_TAG: Final = 0xFB

STATUS_NAMES: Final = {
    0x00: "ok",
    0x01: "inventory finished",
    0x02: "inventory scan time overflowed",
    0x03: "more data follows",
    0x04: "reader buffer full",
    0x05: "access password error",
    0x0B: "tag does not support the command",
    0xF9: "command execution error",
    0xFA: "poor communication with the tag",
    0xFB: "no tag",
    0xFC: "tag error",
    0xFD: "wrong command length",
    0xFE: "illegal command",
    0xFF: "parameter error",
}
_INVENTORY_STATUSES: Final = frozenset({STATUS_DONE, STATUS_TIMEOUT, STATUS_MORE, STATUS_FULL})
MAX_FRAME: Final = 256
"""Len is one byte: a frame is at most 255 + 1 bytes."""
MAX_EPC_BYTES: Final = 62


def framer() -> LengthCrcFramer:
    """A framer for this protocol (commands are 5 bytes or more, responses 6 or more)."""
    return LengthCrcFramer("mcrf4xx", len_adjust=1, crc_order="little", min_frame=5, max_frame=MAX_FRAME)


def _frame(body: bytes) -> bytes:
    crc = crc16_mcrf4xx(body)
    return body + bytes((crc & 0xFF, crc >> 8))


def encode_command(address: int, command: int, data: bytes = b"") -> bytes:
    """A host-to-reader frame. Raises ValueError for arguments out of range (a caller's bug, not device input)."""
    if not 0 <= address <= 0xFF or not 0 <= command <= 0xFF or len(data) > MAX_FRAME - 5:
        raise ValueError("address and command are bytes; data is at most 251 bytes")
    return _frame(bytes((len(data) + 4, address, command)) + data)


def encode_inventory() -> bytes:
    """Inventory (G2) addressed to every reader on the line (broadcast address 0xFF)."""
    return encode_command(BROADCAST, CMD_INVENTORY)


def encode_response(address: int, command: int, status: int, data: bytes = b"") -> bytes:
    """A reader-to-host frame (the simulator's side). Raises ValueError when it cannot fit one frame."""
    if not 0 <= address <= 0xFF or not 0 <= command <= 0xFF or not 0 <= status <= 0xFF:
        raise ValueError("address, command and status are bytes")
    if len(data) > MAX_FRAME - 6:
        raise ValueError("data is at most 250 bytes")
    return _frame(bytes((len(data) + 5, address, command, status)) + data)


def encode_inventory_responses(
    address: int, epcs: list[bytes], final_status: int = STATUS_DONE
) -> list[bytes]:
    """An inventory answer as the reader sends it: as many frames as needed, all but the last with status
    0x03 (more data); no EPCs gives one 0xFB (no tag) frame."""
    if not epcs:
        return [encode_response(address, CMD_INVENTORY, STATUS_NO_TAG)]
    frames: list[bytes] = []
    chunk: list[bytes] = []
    size = 1
    for epc in epcs:
        if not 1 <= len(epc) <= MAX_EPC_BYTES:
            raise ValueError("an EPC is 1..62 bytes")
        if size + 1 + len(epc) > MAX_FRAME - 6:
            frames.append(_inventory_frame(address, STATUS_MORE, chunk))
            chunk, size = [], 1
        chunk.append(epc)
        size += 1 + len(epc)
    frames.append(_inventory_frame(address, final_status, chunk))
    return frames


def _inventory_frame(address: int, status: int, epcs: list[bytes]) -> bytes:
    data = bytes((len(epcs),)) + b"".join(bytes((len(e),)) + e for e in epcs)
    return encode_response(address, CMD_INVENTORY, status, data)


@dataclass(frozen=True, slots=True)
class Command:
    address: int
    command: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Response:
    address: int
    command: int
    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Inventory:
    """One inventory response frame: its EPCs, and whether more frames of the same inventory follow."""

    status: int
    epcs: list[bytes]

    @property
    def more(self) -> bool:
        return self.status == STATUS_MORE


def decode_command(payload: bytes) -> Command | DecodeError:
    """A framed command without its CRC (``Len Adr Cmd Data``), as :func:`framer` yields it."""
    if len(payload) < 3 or payload[0] != len(payload) + 1:
        return DecodeError("bad_frame", "a command is Len Adr Cmd Data, Len = bytes after it")
    return Command(payload[1], payload[2], payload[3:])


def decode_response(payload: bytes) -> Response | DecodeError:
    """A framed response without its CRC (``Len Adr reCmd Status Data``)."""
    if len(payload) < 4 or payload[0] != len(payload) + 1:
        return DecodeError("bad_frame", "a response is Len Adr reCmd Status Data, Len = bytes after it")
    return Response(payload[1], payload[2], payload[3], payload[4:])


def decode_inventory(response: Response) -> Inventory | DecodeError:
    """The EPCs of an inventory response; a non-inventory status is a DecodeError naming it."""
    if response.command != CMD_INVENTORY:
        return DecodeError(
            "unexpected_command", f"response to command {response.command:#04x}, not inventory"
        )
    status = response.status
    if status == STATUS_NO_TAG:
        return Inventory(status, [])
    if status not in _INVENTORY_STATUSES:
        name = STATUS_NAMES.get(status, "unknown status")
        return DecodeError("reader_status", f"inventory status {status:#04x}: {name}")
    data = response.data
    if not data:
        return DecodeError("truncated", "inventory response without its tag count")
    count = data[0]
    epcs: list[bytes] = []
    pos = 1
    for n in range(count):
        if pos >= len(data):
            return DecodeError("truncated", f"inventory response ends before tag {n + 1} of {count}")
        size = data[pos]
        end = pos + 1 + size
        if size == 0 or end > len(data):
            return DecodeError("truncated", f"tag {n + 1} of {count}: EPC length {size} does not fit")
        epcs.append(bytes(data[pos + 1 : end]))
        pos = end
    if pos != len(data):
        return DecodeError("trailing_bytes", f"{len(data) - pos} bytes after the {count} tags")
    return Inventory(status, epcs)
