"""Every override of paho-mqtt's private methods, in one place: what the gateway changes in paho, and why.

paho-mqtt has no public hooks for these; :class:`BufferedPaho` subclasses ``paho.mqtt.client.Client`` and
replaces or extends these private methods (the MQTT adapter, :mod:`gateway.kernel.mqtt_client`, uses only
this subclass):

- ``_sock_recv``: paho reads a packet with 3-4 tiny ``recv()`` calls; at thousands of messages per second the
  syscalls dominate. The override reads 64 KiB at a time into one buffer kept for the connection and serves
  paho's reader from it (with paho's own error handling, for ``recv_into``).
- ``_packet_read``: before paho's generic reader, inbound PUBLISH packets (QoS 0/1, no MQTT 5 properties)
  complete in the buffer are parsed straight from it (:meth:`BufferedPaho._read_publishes`), the gateway's hot
  path; anything else is left to paho untouched. It keeps paho's keepalive bookkeeping
  (``_last_bytes_received``) and, for clients that do not ack by hand (``_manual_ack``), its automatic PUBACKs.
- ``_handle_on_message``: straight to one callback, without paho's topic matcher and its two locks per message.
- ``_ssl_wrap_socket``: paho's version leaks the TLS socket when the handshake fails.

It also calls paho's ``_packet_queue`` (many PUBACKs as one out-packet, in order with everything else paho
sends) and ``_call_socket_register_write``, and reads ``_sock``, ``_ssl_context``, ``_host``,
``_connect_timeout``, ``_in_packet``, ``_protocol``, ``_manual_ack`` and ``_last_bytes_received``.

Private methods change without notice: this was written against and tested with paho-mqtt 2.2.0
(:data:`TESTED_PAHO`; pyproject.toml pins the same range). paho 2.1 already differs (its keepalive clock is
``_last_msg_in``, so the fast path would let keepalive think the broker silent). tests/gateway/test_paho_compat.py
fails, saying so, when the installed paho is outside that range or a method or attribute used here is gone or
has another signature; check each override above against the new paho's source before widening the range.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

TESTED_PAHO: Final = ((2, 2), (2, 3))
"""paho-mqtt versions these overrides were tested with: from the first (inclusive) to the second (exclusive)."""


@dataclass(slots=True)
class InboundMessage:
    """A received PUBLISH: the fields the gateway uses of paho's MQTTMessage, without its per-message lock."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool = False
    dup: bool = False


Message = InboundMessage | paho.MQTTMessage
PUBACK: Final = 0x40
READ_CHUNK: Final = 65536


def _remaining_length(buf: bytearray, i: int, end: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at buf[i:]: (value, index after it), or None if incomplete or too long."""
    value, shift = 0, 0
    while i < end and shift <= 21:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
    return None


class BufferedPaho(paho.Client):
    """paho reads a packet with 3-4 tiny recv() calls and parses one packet per loop_read(); at thousands of
    messages per second the syscalls dominate. This reads 64 KiB at a time and serves paho from the buffer."""

    _rbuf: bytearray | None = None
    _rview: memoryview | None = None
    _rlen = 0
    _rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= self._rlen:
            if self._rview is None:
                # One buffer for the life of the connection: recv(64 KiB) per read, shrunk to what arrived,
                # fragments the C heap badly at high rates (measured: RSS +6 KB per message).
                self._rbuf = bytearray(READ_CHUNK)
                self._rview = memoryview(self._rbuf)
            self._rlen = self._recv_into(self._rview)
            self._rpos = 0
            if not self._rlen:
                return b""
        start = self._rpos
        self._rpos = min(start + bufsize, self._rlen)
        assert self._rview is not None
        return bytes(self._rview[start : self._rpos])

    def _recv_into(self, view: memoryview) -> int:
        """paho's _sock_recv error handling, for recv_into."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("socket closed")
        try:
            return int(cast(socket.socket, sock).recv_into(view))
        except ssl.SSLWantReadError as err:
            raise BlockingIOError from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError from err

    def queue_pubacks(self, mids: list[int]) -> None:
        """Queue many PUBACKs as ONE out-packet: one write instead of one syscall per acknowledgement.

        The bytes are exactly what paho's ``ack()`` would queue for each mid (0x40, length 2, mid), and paho's own
        out-queue keeps them in order with everything else it sends."""
        packet = b"".join(struct.pack("!BBH", PUBACK, 2, mid) for mid in mids)
        self._packet_queue(PUBACK, packet, mids[-1], 1)

    fast_on_message: Callable[[Message], None] | None = None

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """paho's version leaks the TLS socket when the handshake fails (a wrong CA, a refused client
        certificate). Our contexts always check the host name themselves (or are explicitly insecure), so the
        rest of paho's version, a second host-name check, never applies."""
        context = self._ssl_context
        if context is None:
            raise ValueError("TLS requested without a context")
        ssl_sock = context.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock

    def _packet_read(self) -> MQTTErrorCode:
        if self._in_packet["command"] == 0 and self._read_publishes() > 0:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._packet_read()

    def _read_publishes(self, budget: int = 64) -> int:
        """Parse complete inbound PUBLISH packets (QoS 0/1, no MQTT 5 properties) straight from the buffer.

        This is the hot path of the gateway: paho's generic reader costs ~38 us per MQTT 5 message (3-4
        reads per packet, Properties objects, a threading.Condition per message); this costs a few. Anything
        else, and any packet not complete in the buffer, is left to paho's reader untouched.
        """
        buf, pos, end = self._rbuf, self._rpos, self._rlen
        if buf is None:
            return 0
        callback = self.fast_on_message
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        auto_acks: list[int] = []
        done = 0
        while done < budget and end - pos >= 2:
            command = buf[pos]
            qos = (command >> 1) & 3
            if command & 0xF0 != 0x30 or qos == 2 or qos == 3:
                break
            header = _remaining_length(buf, pos + 1, end)
            if header is None:  # incomplete here, or malformed: paho's reader decides
                break
            length, i = header
            packet_end = i + length
            if packet_end > end:
                break
            topic_len = buf[i] << 8 | buf[i + 1] if length >= 2 else -1
            j = i + 2 + topic_len
            mid = 0
            if qos:
                mid = buf[j] << 8 | buf[j + 1]
                j += 2
            if v5:
                if j >= packet_end or buf[j] != 0:  # properties present: paho parses those
                    break
                j += 1
            if topic_len < 0 or j > packet_end:
                break
            view = self._rview
            assert view is not None
            message = InboundMessage(
                str(view[i + 2 : i + 2 + topic_len], "utf-8", "replace"),
                bytes(view[j:packet_end]),
                mid,
                qos,
                bool(command & 1),
                bool(command & 8),
            )
            pos = self._rpos = packet_end
            done += 1
            if callback is not None:
                callback(message)
            if qos and not self._manual_ack:
                auto_acks.append(mid)  # what paho's reader does for clients that do not ack by hand
        if done:
            self._last_bytes_received = time.monotonic()
        if auto_acks:
            self.queue_pubacks(auto_acks)
        return done

    def _handle_on_message(self, message: Message) -> None:
        """Straight to our one callback: paho's version runs a topic matcher and takes two locks per message,
        for per-topic callbacks and threaded loops we do not use."""
        callback = self.fast_on_message
        if callback is not None:
            callback(message)

    def has_buffered(self) -> bool:
        if self._rpos < self._rlen:
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
