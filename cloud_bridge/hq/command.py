"""``store-gateway hq-command``: sign one HQ command, send it to one gateway and show its answer.

For people at HQ (and scripts): the command is signed with HQ's command key (docs/OUTBOX.md, "Signed
commands"), published at QoS 1 on the gateway's commands topic, and the answer is read from its responses
topic (subscribed before publishing, so it cannot be missed). The exit status says what the gateway answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any, Final

import orjson

from cloud_bridge import topics
from cloud_bridge.commands import COMMANDS
from cloud_bridge.hq.options import (
    CliError,
    broker_config,
    checked_id,
    command_signer,
    signing_options,
    whole_number,
)
from cloud_bridge.signing import DEFAULT_VALIDITY_S, MAX_VALIDITY_S, CommandSigner
from gateway.kernel.config import BrokerConfig
from gateway.kernel.events import uuid7
from gateway.kernel.mqtt_client import Message, MqttClient, MqttError

EXIT_OK: Final = 0
EXIT_CANNOT_SEND: Final = 1
EXIT_ERROR: Final = 3
EXIT_DUPLICATE: Final = 4
EXIT_NO_ANSWER: Final = 5

_EPILOG: Final = f"""\
commands: {", ".join(COMMANDS)} (docs/OUTBOX.md, "Downlink commands").
ARGS is the command's args as one JSON object, e.g. '{{"sku": "SKU-1", "delta": 24, "reason": "receiving"}}';
'-' reads it from standard input.

exit status:
  0  the gateway answered ok
  1  the command could not be sent (options, key, broker)
  2  bad command line (argparse)
  3  the gateway answered error (refused or failed: see the printed answer)
  4  the gateway answered duplicate (this request id was carried out before; nothing done again)
  5  no answer within --timeout (the command waits at the broker until not_after, and may still run)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="store-gateway hq-command",
        description="Sign an HQ command with HQ's command key, send it to one gateway, print its answer.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    broker = parser.add_argument_group("HQ broker")
    broker.add_argument("--host", default="127.0.0.1", help="HQ broker host (default: %(default)s)")
    broker.add_argument("--port", type=int, default=1883, help="HQ broker port (default: %(default)s)")
    broker.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (default: 5)")
    broker.add_argument("--prefix", default="retail", help="HQ topic prefix (default: %(default)s)")
    broker.add_argument("--ca-file", type=Path, help="CA bundle that signed the broker's certificate (TLS)")
    broker.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS), with --key-file")
    broker.add_argument("--key-file", type=Path, help="client private key (mutual TLS), with --cert-file")
    broker.add_argument("--username", help="MQTT user name (the HQ command sender's account)")
    broker.add_argument("--password-file", type=Path, help="file holding the MQTT password (never logged)")
    parser.set_defaults(no_share=True, share_group=None, session_expiry=0)
    parser.add_argument("--store", required=True, type=checked_id, help="the gateway's store id")
    parser.add_argument("--gateway", required=True, type=checked_id, help="the gateway's id")
    signing_options(parser)
    parser.add_argument("--request-id", help="the command's request id (default: a new 'cli-<uuid7>')")
    parser.add_argument(
        "--valid-for",
        type=whole_number(1, MAX_VALIDITY_S),
        default=DEFAULT_VALIDITY_S,
        metavar="SECONDS",
        help=f"the command's validity, not_after - issued_at (default: %(default)s; at most {MAX_VALIDITY_S})",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long for the answer"
    )
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON line")
    parser.add_argument("command", metavar="COMMAND", help="the command, e.g. ping or stock.adjust")
    parser.add_argument("args", metavar="ARGS", nargs="?", help="its args, one JSON object ('-': stdin)")
    return parser


def _command_args(text: str | None) -> Any:
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise CliError(f"ARGS is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise CliError("ARGS must be one JSON object")
    return value


async def send_command(
    broker: BrokerConfig,
    signer: CommandSigner,
    prefix: str,
    store_id: str,
    gateway_id: str,
    command: str,
    args: Any = None,
    *,
    request_id: str | None = None,
    valid_for_s: int = DEFAULT_VALIDITY_S,
    timeout_s: float = 30.0,
) -> dict[str, Any] | None:
    """Sign and publish one command, and return the gateway's answer (None: none within ``timeout_s``).
    Raises :class:`MqttError` when the broker cannot be reached or refuses the publish."""
    request_id = request_id or f"cli-{uuid7()}"
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def receive(message: Message) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            answer = orjson.loads(message.payload)
            if isinstance(answer, dict) and answer.get("request_id") == request_id:
                answers.put_nowait(answer)

    client = MqttClient(broker, f"hq-command-{uuid7()}", clean_start=True, on_message=receive)
    topic = topics.commands_topic(prefix, store_id, gateway_id)
    try:
        await client.connect(within_s=min(timeout_s, 10.0))
        await client.subscribe([(topics.responses_topic(prefix, store_id, gateway_id), 1)])
        payload = signer.sign(topic, request_id, command, args, valid_for_s=valid_for_s)
        async with asyncio.timeout(10.0):
            await client.publish(topic, payload, qos=1, message_expiry_s=valid_for_s)
        try:
            async with asyncio.timeout(timeout_s):
                return await answers.get()
        except TimeoutError:
            return None
    finally:
        await client.disconnect()


def hq_command_main(argv: list[str]) -> int:
    """``store-gateway hq-command``: see the epilog for the exit status."""
    args = _parser().parse_args(argv)
    try:
        broker = broker_config(args)
        signer = command_signer(args, "hq-command")
        command_args = _command_args(args.args)
    except CliError as err:
        print(f"hq-command: {err}", file=sys.stderr)
        return EXIT_CANNOT_SEND
    assert signer is not None  # command_signer raises when it is needed and missing
    try:
        answer = asyncio.run(
            send_command(
                broker,
                signer,
                args.prefix,
                args.store,
                args.gateway,
                args.command,
                command_args,
                request_id=args.request_id,
                valid_for_s=args.valid_for,
                timeout_s=args.timeout,
            )
        )
    except (MqttError, TimeoutError, OSError) as err:
        print(f"hq-command: cannot send to {args.host}:{args.port}: {err}", file=sys.stderr)
        return EXIT_CANNOT_SEND
    if answer is None:
        print(
            f"hq-command: no answer within {args.timeout:g} s; the command waits at the broker and may still run"
            f" until its not_after ({args.valid_for} s)",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    if args.json:
        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_APPEND_NEWLINE).decode())
    else:
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.flush()
    status = answer.get("status")
    return {"ok": EXIT_OK, "duplicate": EXIT_DUPLICATE}.get(str(status), EXIT_ERROR)
