"""Pure, incremental framers: bytes as they come off a serial port in, whole frames (or errors) out.

Every framer has ``feed(data) -> list[Frame | FrameError]`` and ``flush()`` (give up on what is buffered, for
example after a response timeout). None of them raises: bad bytes come out as :class:`FrameError` values,
at most one per contiguous run of garbage within one ``feed`` (its first bytes kept, its length counted), so
a flood of noise costs a few objects per read, not one per byte. Buffers are bounded by the largest frame
a framer accepts.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from drivers.errors import DecodeError
from drivers.serial.crc import CRC16, CrcName

GARBAGE_KEEP_BYTES: Final = 64
"""The first bytes of a garbage run kept for the quarantine; the rest is only counted."""

STX: Final = 0x02
ETX: Final = 0x03


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: ``payload`` is what the codec reads (delimiters, length field and CRC stripped as each
    framer documents); ``raw`` is the whole frame as it was on the wire."""

    payload: bytes
    raw: bytes


class FrameError(DecodeError):
    """Bytes that are not a frame: ``size`` of them were skipped, ``raw`` holds the first few."""

    def __init__(self, reason: str, detail: str, raw: bytes, size: int) -> None:
        super().__init__(reason, detail)
        self.raw = raw
        self.size = size


Output = list[Frame | FrameError]


class Framer(Protocol):
    def feed(self, data: bytes) -> Output: ...

    def flush(self) -> Output: ...


class _Garbage:
    """Accumulates skipped bytes into one FrameError per run."""

    __slots__ = ("_kept", "_reason", "_size")

    def __init__(self) -> None:
        self._kept = bytearray()
        self._size = 0
        self._reason = "garbage"

    def add(self, data: bytes | bytearray | memoryview, reason: str = "garbage") -> None:
        if not self._size:
            self._reason = reason
        room = GARBAGE_KEEP_BYTES - len(self._kept)
        if room > 0:
            self._kept += data[:room]
        self._size += len(data)

    def take(self, out: Output) -> None:
        if self._size:
            out.append(
                FrameError(
                    self._reason, f"{self._size} bytes that are not a frame", bytes(self._kept), self._size
                )
            )
            self._kept = bytearray()
            self._size = 0


class LineFramer:
    """Lines ended by CR, LF or CRLF (any of them; empty lines are skipped). ``payload`` is the line without
    its terminator. A line longer than ``max_line`` is reported as ``line_too_long`` and skipped up to the
    next terminator."""

    def __init__(self, max_line: int = 256) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._overlong = False
        self._garbage = _Garbage()

    def feed(self, data: bytes) -> Output:
        out: Output = []
        buf = self._buf
        buf += data
        start = 0
        end = len(buf)
        while start < end:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            stop = min(cr, lf) if cr >= 0 and lf >= 0 else max(cr, lf)
            if stop < 0:
                break
            if self._overlong:
                self._garbage.add(buf[start:stop], "line_too_long")
                self._garbage.take(out)
                self._overlong = False
            elif stop > start:
                if stop - start > self._max:
                    self._garbage.add(buf[start:stop], "line_too_long")
                    self._garbage.take(out)
                else:
                    line = bytes(buf[start:stop])
                    out.append(Frame(line, bytes(buf[start : stop + 1])))
            start = stop + 1
        del buf[:start]
        if len(buf) > self._max:
            self._garbage.add(buf, "line_too_long")
            self._overlong = True
            buf.clear()
        self._garbage.take(out)
        return out

    def flush(self) -> Output:
        out: Output = []
        if self._buf:
            self._garbage.add(self._buf, "line_too_long" if self._overlong else "incomplete")
            self._buf.clear()
        self._overlong = False
        self._garbage.take(out)
        return out


class StxEtxFramer:
    """``STX payload ETX [BCC]``, no DLE escaping: the payload (ASCII, as scales and scanners send it) may not
    contain STX or ETX. A second STX before the ETX restarts the frame (what came before is garbage). With
    ``bcc``, one byte after ETX is the XOR of the payload and ETX; ``payload`` excludes STX, ETX and BCC."""

    def __init__(self, max_payload: int = 256, bcc: bool = False) -> None:
        self._max = max_payload
        self._bcc = bcc
        self._buf = bytearray()
        self._garbage = _Garbage()

    def feed(self, data: bytes) -> Output:
        out: Output = []
        buf = self._buf
        buf += data
        pos = 0
        tail = 2 if self._bcc else 1
        while True:
            stx = buf.find(STX, pos)
            if stx < 0:
                self._garbage.add(buf[pos:])
                pos = len(buf)
                break
            if stx > pos:
                self._garbage.add(buf[pos:stx])
            pos = stx
            etx = buf.find(ETX, pos + 1, pos + 2 + self._max)
            restart = buf.find(STX, pos + 1, etx if etx >= 0 else pos + 2 + self._max)
            if restart >= 0:
                self._garbage.add(buf[pos:restart])
                pos = restart
                continue
            if etx < 0:
                if len(buf) - pos >= 2 + self._max:
                    self._garbage.add(buf[pos : pos + 1], "frame_too_long")
                    pos += 1
                    continue
                break
            if len(buf) < etx + tail:
                break
            end = etx + tail
            payload = bytes(buf[pos + 1 : etx])
            if self._bcc and _xor(payload) ^ ETX != buf[etx + 1]:
                self._garbage.add(buf[pos : pos + 1], "bad_bcc")
                pos += 1
                continue
            self._garbage.take(out)
            out.append(Frame(payload, bytes(buf[pos:end])))
            pos = end
        del buf[:pos]
        self._garbage.take(out)
        return out

    def flush(self) -> Output:
        out: Output = []
        self._garbage.add(self._buf, "incomplete")
        self._buf.clear()
        self._garbage.take(out)
        return out


class LengthCrcFramer:
    """Length-prefixed frames with a trailing CRC-16, found by sliding one byte at a time after garbage.

    The frame starts with ``header`` (may be empty); the length field is ``len_width`` bytes at
    ``len_offset`` (from the frame start); the whole frame is ``length + len_adjust`` bytes, its last two the
    CRC over everything before them (``crc_order`` byte order). ``payload`` is the frame without its CRC.
    Chafon/UHFReader18: offset 0, width 1, adjust 1 (Len counts the bytes after itself), CRC-16/MCRF4XX."""

    def __init__(
        self,
        crc: CrcName,
        *,
        header: bytes = b"",
        len_offset: int = 0,
        len_width: Literal[1, 2] = 1,
        len_order: Literal["big", "little"] = "big",
        len_adjust: int = 0,
        crc_order: Literal["big", "little"] = "little",
        min_frame: int = 4,
        max_frame: int = 256,
    ) -> None:
        self._crc = CRC16[crc]
        self._header = header
        self._len_at = len_offset
        self._len_end = len_offset + len_width
        self._len_order: Literal["big", "little"] = len_order
        self._adjust = len_adjust
        self._crc_order: Literal["big", "little"] = crc_order
        self._min = max(min_frame, self._len_end + 2, len(header) + 2)
        self._max = max_frame
        self._buf = bytearray()
        self._garbage = _Garbage()
        # The look-ahead's memory, in absolute stream offsets (buf[0] is at _base), so that bytes arriving one
        # at a time are each classified once: positions below _seen are classified; _pending holds
        # (end, start) of plausible frames not complete yet, _found the starts of complete frames with a
        # good CRC.
        self._base = 0
        self._seen = 0
        self._pending: list[tuple[int, int]] = []
        self._found: list[int] = []

    def feed(self, data: bytes) -> Output:
        out: Output = []
        buf = self._buf
        buf += data
        pos = 0
        header = self._header
        while len(buf) - pos >= self._len_end:
            if header and not buf.startswith(header, pos):
                nxt = buf.find(header, pos + 1)
                stop = nxt if nxt >= 0 else max(pos + 1, len(buf) - len(header) + 1)
                self._garbage.add(buf[pos:stop])
                pos = stop
                continue
            total = self._total_at(pos)
            if total is None:
                self._garbage.add(buf[pos : pos + 1], "bad_length")
                pos += 1
                continue
            if len(buf) - pos < total:
                # Either a frame still arriving or a garbage byte that looks like a long length: if a whole,
                # valid frame starts further on, the candidate was garbage (frames do not overlap).
                later = self._look_ahead(pos)
                if later is None:
                    break
                self._garbage.add(buf[pos:later], "bad_length")
                pos = later
                continue
            if not self._crc_ok(pos, total):
                self._garbage.add(buf[pos : pos + 1], "bad_crc")
                pos += 1
                continue
            self._garbage.take(out)
            out.append(Frame(bytes(buf[pos : pos + total - 2]), bytes(buf[pos : pos + total])))
            pos += total
        del buf[:pos]
        self._base += pos
        self._garbage.take(out)
        return out

    def _total_at(self, pos: int) -> int | None:
        """The size the frame starting at ``pos`` claims (None: no header there, or a size out of range);
        the length field must be in the buffer."""
        buf = self._buf
        if self._header and not buf.startswith(self._header, pos):
            return None
        total = int.from_bytes(buf[pos + self._len_at : pos + self._len_end], self._len_order) + self._adjust
        return total if self._min <= total <= self._max else None

    def _crc_ok(self, pos: int, total: int) -> bool:
        buf = self._buf
        body_end = pos + total - 2
        sent = int.from_bytes(buf[body_end : pos + total], self._crc_order)
        return self._crc(memoryview(buf)[pos:body_end]) == sent

    def _look_ahead(self, pos: int) -> int | None:
        """The first position after ``pos`` where a whole frame with a good CRC starts, if any. Each position
        is classified once (and checked once more when its claimed frame completes): linear, however the
        bytes are chunked."""
        buf, base = self._buf, self._base
        size = len(buf)
        for p in range(max(self._seen - base, pos + 1), size - self._min + 1):
            total = self._total_at(p)
            if total is None:
                continue
            if size - p >= total:
                if self._crc_ok(p, total):
                    heapq.heappush(self._found, base + p)
            else:
                heapq.heappush(self._pending, (base + p + total, base + p))
        self._seen = max(self._seen, base + size - self._min + 1)
        pending, found = self._pending, self._found
        while pending and pending[0][0] <= base + size:
            end, start = heapq.heappop(pending)
            if start > base + pos and self._crc_ok(start - base, end - start):
                heapq.heappush(found, start)
        while found and found[0] <= base + pos:
            heapq.heappop(found)
        return found[0] - base if found else None

    def flush(self) -> Output:
        out: Output = []
        self._garbage.add(self._buf, "incomplete")
        self._base += len(self._buf)
        self._seen = self._base
        self._pending.clear()
        self._found.clear()
        self._buf.clear()
        self._garbage.take(out)
        return out


class FixedFramer:
    """Frames of exactly ``size`` bytes, each starting with ``header`` (if given; without one there is no way
    to resync, so frames are cut every ``size`` bytes). ``payload`` is the frame without its header."""

    def __init__(self, size: int, header: bytes = b"") -> None:
        self._size = size
        self._header = header
        self._buf = bytearray()
        self._garbage = _Garbage()

    def feed(self, data: bytes) -> Output:
        out: Output = []
        buf = self._buf
        buf += data
        pos = 0
        header = self._header
        while len(buf) - pos >= max(self._size, len(header)):
            if header and not buf.startswith(header, pos):
                nxt = buf.find(header, pos + 1)
                stop = nxt if nxt >= 0 else max(pos + 1, len(buf) - len(header) + 1)
                self._garbage.add(buf[pos:stop])
                pos = stop
                continue
            if len(buf) - pos < self._size:
                break
            self._garbage.take(out)
            raw = bytes(buf[pos : pos + self._size])
            out.append(Frame(raw[len(header) :], raw))
            pos += self._size
        del buf[:pos]
        self._garbage.take(out)
        return out

    def flush(self) -> Output:
        out: Output = []
        self._garbage.add(self._buf, "incomplete")
        self._buf.clear()
        self._garbage.take(out)
        return out


def _xor(data: bytes) -> int:
    value = 0
    for byte in data:
        value ^= byte
    return value
