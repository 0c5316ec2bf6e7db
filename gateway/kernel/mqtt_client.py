"""A small asyncio adapter over paho-mqtt, for MQTT 3.1.1 and 5.

Why not aiomqtt: the gateway must send PUBACK only after an event is committed to disk, which needs paho's
``manual_ack`` mode; aiomqtt (which wraps paho the same way) does not expose it. This adapter drives one
paho client from the event loop (add_reader/add_writer, like aiomqtt), and gives:

- ``publish()`` returning a future that completes on PUBACK (QoS 1) or when queued (QoS 0);
- ``ack()`` for manual acknowledgement of received QoS 1 messages;
- ``wait_closed()``, which completes when the connection drops, with the reason.

One instance is one connection: on disconnect, create a new one (the supervisor does, with backoff).

What this needs from paho beyond its public API (a buffered reader, a fast path for inbound PUBLISH, batched
PUBACKs) is in :mod:`gateway.kernel.paho_compat`, with the paho versions it was tested with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.kernel.config import BrokerConfig
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.paho_compat import BufferedPaho, InboundMessage, Message
from gateway.kernel.tls_files import no_passphrase, tls_file_problems

__all__ = ["InboundMessage", "Message", "MqttClient", "MqttError", "TlsFilesError", "Will", "tls_context"]

_LOGGER = logging.getLogger(__name__)

MAX_PACKET_BYTES: Final = 16 * 1024 * 1024
"""Largest packet we accept (MQTT 5 Maximum Packet Size); the broker drops larger ones for us."""


class MqttError(StoreGatewayError):
    """Any MQTT failure: connect refused, connection lost, publish not acknowledged."""


class PublishRefusedError(MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5 PUBACK >= 0x80, e.g. 0x87 not
    authorised): sending it again gets the same answer. (On MQTT 3.1.1 a broker that refuses a publish says
    nothing: mosquitto acknowledges it and drops it.)"""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class PublishInvalidError(MqttError):
    """paho would not send the publish at all (a topic or payload MQTT does not allow)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class TlsFilesError(StoreGatewayError, ssl.SSLError):
    """The CA, certificate or key cannot be loaded; the message names each file and why (missing, unreadable,
    not PEM, the key does not match the certificate), as ``check-config`` does."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def tls_context(broker: BrokerConfig) -> ssl.SSLContext | None:
    """The TLS context for a broker config (CA, client certificate and key), or None for plain TCP.

    Raises :class:`TlsFilesError` (an ``ssl.SSLError``, so an ``OSError``) naming the file and the reason."""
    tls = broker.tls
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=no_passphrase)
    except (OSError, ValueError) as err:
        problems = tls_file_problems(tls.ca_file, tls.cert_file, tls.key_file)
        raise TlsFilesError(
            "; ".join(str(p) for p in problems) or f"cannot load the TLS files: {err}"
        ) from err
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


PACKETS_PER_WAKEUP: Final = 64
"""Parse at most this many packets per reader callback, then yield to the loop (fairness)."""


class MqttClient:
    """One MQTT connection driven by the running event loop."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        clean_start: bool,
        manual_ack: bool = False,
        will: Will | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self._broker = broker
        self._name = client_id
        self._loop = asyncio.get_running_loop()
        self._v5 = broker.protocol == "5"
        self._clean_start = clean_start
        self._client = BufferedPaho(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else clean_start,
            manual_ack=manual_ack,
            reconnect_on_failure=False,
        )
        self._client.max_inflight_messages_set(65535)
        self._client.max_queued_messages_set(0)
        if broker.username is not None:
            password = broker.password.get_secret_value() if broker.password else None
            self._client.username_pw_set(broker.username, password)
        ctx = tls_context(broker)
        if ctx is not None:
            self._client.tls_set_context(ctx)
            if broker.tls is not None and broker.tls.insecure_skip_verify:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._connected: asyncio.Future[bool] = self._loop.create_future()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._acks: list[int] = []
        self._paused = False
        self._subscribed: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.on_message = on_message
        self._wire_callbacks()

    # --- public API -------------------------------------------------------------------------------

    @property
    def session_present(self) -> bool:
        return self._connected.done() and not self._connected.exception() and self._connected.result()

    @property
    def is_connected(self) -> bool:
        return self._connected.done() and not self._closed.done()

    async def connect(self, within_s: float = 10.0) -> bool:
        """Connect and wait for CONNACK; returns whether the broker had a session for us."""
        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self._clean_start else self._broker.session_expiry_s
            props.ReceiveMaximum = self._broker.receive_maximum
            props.MaximumPacketSize = MAX_PACKET_BYTES
        try:
            async with asyncio.timeout(within_s):
                await self._loop.run_in_executor(None, self._blocking_connect, props)
                return await asyncio.shield(self._connected)
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as err:
            self._teardown(f"connect failed: {err!r}", force_close=True)
            raise MqttError(f"cannot connect to {self._broker.host}:{self._broker.port}: {err}") from err
        except MqttError:
            self._teardown("connect refused", force_close=True)
            raise

    async def subscribe(self, filters: list[tuple[str, int]], within_s: float = 10.0) -> None:
        result, mid = self._client.subscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"subscribe failed: {paho.error_string(result)}")
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subscribed[mid] = fut
        async with asyncio.timeout(within_s):
            codes = await fut
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            raise MqttError(f"subscription refused for {filters}: {bad}")

    async def unsubscribe(self, filters: list[str], within_s: float = 10.0) -> None:
        """UNSUBSCRIBE and wait for the broker's UNSUBACK; "no subscription existed" is not a failure."""
        result, mid = self._client.unsubscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"unsubscribe failed: {paho.error_string(result)}")
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subscribed[mid] = fut  # SUBACK and UNSUBACK share the packet-id space
        async with asyncio.timeout(within_s):
            codes = await fut
        bad = [str(c) for c in codes if c.is_failure]  # 0x11 "no subscription existed" is not one
        if bad:
            raise MqttError(f"unsubscribe refused for {filters}: {bad}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        message_expiry_s: int | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish; the future completes on PUBACK (QoS 1) and fails if the connection drops.
        ``message_expiry_s`` (MQTT 5 only; ignored on 3.1.1): the broker drops the message if it is still
        queued for a subscriber after that long."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._closed.done():
            fut.set_exception(MqttError(f"not connected: {self._closed.result()}"))
            return fut
        props: Properties | None = None
        if message_expiry_s is not None and self._v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = message_expiry_s
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as err:  # paho's own check: an empty or wildcard topic, a payload too large
            fut.set_exception(PublishInvalidError(f"publish failed: {err}"))
            return fut
        if info.rc in (MQTTErrorCode.MQTT_ERR_INVAL, MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE):
            fut.set_exception(PublishInvalidError(f"publish failed: {paho.error_string(info.rc)}"))
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            fut.set_exception(MqttError(f"publish failed: {paho.error_string(info.rc)}"))
        elif qos == 0:
            fut.set_result(None)
        else:
            self._pending[info.mid] = fut
        return fut

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK for a received message (manual-ack mode). A dead connection ignores it.

        Acknowledgements made in one loop turn go out together in one write (see ``queue_pubacks``)."""
        if self._closed.done() or qos != 1:
            return
        if not self._acks:
            self._loop.call_soon(self._flush_acks)
        self._acks.append(mid)

    def _flush_acks(self) -> None:
        mids, self._acks = self._acks, []
        if mids and not self._closed.done():
            self._client.queue_pubacks(mids)

    async def wait_closed(self) -> str:
        """Wait until the connection is gone; returns why."""
        return await asyncio.shield(self._closed)

    async def disconnect(self) -> None:
        if not self._closed.done() and self._connected.done():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(self._closed)
        self._teardown("disconnected by us", force_close=True)

    # --- paho plumbing --------------------------------------------------------------------------------

    def _blocking_connect(self, props: Properties | None) -> None:
        self._client.connect(
            self._broker.host,
            self._broker.port,
            keepalive=self._broker.keepalive_s,
            clean_start=self._clean_start if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )

    def _wire_callbacks(self) -> None:
        c = self._client
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_subscribe
        self._client.fast_on_message = self._on_message_fast

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """paho calls back from the executor thread during connect(); hop onto the loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_soon(self._attach, sock)

    def _attach(self, sock: socket.socket) -> None:
        if self._closed.done():
            # connect() gave up (timeout) but paho's thread finished later: this connection must not come to
            # life, or it would take over our persistent session behind the back of its successor.
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read)
        self._misc_task = self._loop.create_task(self._misc_loop(), name=f"mqtt-keepalive-{self._name}")

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_soon(self._detach, sock)

    def _detach(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_soon(self._add_writer, sock)

    def _add_writer(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_writer(sock, self._write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_soon(self._remove_writer, sock)

    def _remove_writer(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def pause_reading(self) -> None:
        """Stop taking packets (backpressure): TCP then holds further messages at the broker."""
        if not self._paused:
            self._paused = True
            if self._sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._sock is not None and not self._closed.done():
                self._loop.add_reader(self._sock, self._read)
                self._loop.call_soon(self._read)  # packets may already be buffered

    def _read(self) -> None:
        client = self._client
        if self._paused:
            return
        for _ in range(PACKETS_PER_WAKEUP):
            if self._paused:
                return
            try:
                rc = client.loop_read()
            except Exception as err:  # never let a parsing surprise escape into the event loop
                _LOGGER.exception("MQTT read failed; dropping the connection")
                self._teardown(f"read failed: {err!r}", force_close=True)
                return
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                self._teardown(f"read failed: {paho.error_string(rc)}")
                return
            if not client.has_buffered():
                return
        # More is buffered but the socket may not be readable again: come back on the next loop turn.
        self._loop.call_soon(self._read)

    def _write(self) -> None:
        rc = self._client.loop_write()
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            self._teardown(f"write failed: {paho.error_string(rc)}")

    async def _misc_loop(self) -> None:
        while not self._closed.done():
            # While we deliberately stop reading (backpressure), PINGRESPs wait unread: do not call that a dead
            # broker. The PUBACKs we keep sending show the broker we are alive.
            if not self._paused and self._client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._teardown("keepalive timeout: broker stopped answering", force_close=True)
                return
            await asyncio.sleep(1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._call_soon(self._connack, bool(flags.session_present), rc)

    def _connack(self, session_present: bool, rc: ReasonCode) -> None:
        if self._connected.done():
            return
        if rc.is_failure:
            self._connected.set_exception(MqttError(f"broker refused connection: {rc}"))
        else:
            self._connected.set_result(session_present)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._call_soon(self._teardown, f"disconnected: {rc}")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        # QoS 0 publishes (resolved when queued) report here too, unknown: nothing to do for them. A QoS 1
        # PUBACK cannot beat publish() registering its mid: paho writes only on a later loop turn.
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            if rc.is_failure:
                fut.set_exception(PublishRefusedError(f"broker refused publish: {rc}", int(rc.value)))
            else:
                fut.set_result(None)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        fut = self._subscribed.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _on_message_fast(self, message: Message) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception:  # a handler bug must not wedge paho's reader on the same packet forever
            _LOGGER.exception("message handler failed on %r; the message stays unacknowledged", message.topic)

    def _teardown(self, reason: str, force_close: bool = False) -> None:
        if self._closed.done():
            return
        self._closed.set_result(reason)
        if not self._connected.done():
            self._connected.set_exception(MqttError(reason))
            self._connected.exception()  # mark retrieved
        error = MqttError(f"connection lost before PUBACK: {reason}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for sub in self._subscribed.values():
            if not sub.done():
                sub.set_exception(MqttError(reason))
        self._subscribed.clear()
        if self._misc_task is not None and self._misc_task is not asyncio.current_task():
            self._misc_task.cancel()
        if self._sock is not None:
            self._detach(self._sock)
            if force_close:
                # Only outside paho callbacks: paho holds its callback lock while calling us.
                with contextlib.suppress(OSError):
                    self._sock.close()
