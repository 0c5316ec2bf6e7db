"""The command line of the HQ tools (``hq-receiver``, ``hq-receiver receipt``, ``hq-command``): option groups,
argument types, and what the options turn into (the broker settings, HQ's command signer, the database)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

from pydantic import SecretStr, ValidationError

from cloud_bridge.hq.model import LOST_GRACE_S, StoreUnavailableError
from cloud_bridge.hq.sql import SqlReceiverStore
from cloud_bridge.hq.sqlite import SqliteReceiverStore
from cloud_bridge.signing import CommandSigner, SigningKeyError, load_private_key
from gateway.kernel.config import BrokerConfig, TlsConfig
from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.model import ID_PATTERN

MAX_STORES_PER_RECEIVER: Final = 1000
"""``--stores`` entries: one subscription each (brokers cap the topics of one SUBSCRIBE packet and a client's
subscriptions); more stores per receiver means one receiver for all of them, without ``--stores``."""
_ID: Final = re.compile(ID_PATTERN)


class CliError(StoreGatewayError):
    """A receiver option that cannot be used; the message is the one line the user sees."""


def signing_options(parser: argparse.ArgumentParser) -> None:
    """``--signing-key FILE --key-id ID``: HQ's command key (hq-receiver --resend, hq-command)."""
    group = parser.add_argument_group("command signing (docs/OUTBOX.md, 'Signed commands')")
    group.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="HQ's Ed25519 command key, PEM (openssl genpkey -algorithm ed25519); never logged",
    )
    group.add_argument(
        "--key-id", metavar="ID", help="its id, as pinned in the gateways' hq.command_keys (e.g. hq-2026a)"
    )


def command_signer(args: argparse.Namespace, needed_by: str | None = None) -> CommandSigner | None:
    """The signer ``--signing-key``/``--key-id`` name (None when neither is given, unless an option that
    sends commands, ``needed_by``, needs it); raises :class:`CliError`."""
    if args.signing_key is None and args.key_id is None:
        if needed_by is not None:
            raise CliError(
                f"{needed_by} needs --signing-key FILE and --key-id ID: gateways refuse unsigned commands"
                " (docs/OUTBOX.md, 'Signed commands')"
            )
        return None
    if args.signing_key is None or args.key_id is None:
        raise CliError("--signing-key and --key-id go together")
    if not _ID.fullmatch(args.key_id):
        raise CliError(f"--key-id {args.key_id[:80]!r} is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
    try:
        return CommandSigner(args.key_id, load_private_key(args.signing_key))
    except SigningKeyError as err:
        raise CliError(f"--signing-key: {err}") from err


def database_options(parser: argparse.ArgumentParser) -> None:
    db = parser.add_argument_group("database").add_mutually_exclusive_group()
    db.add_argument("--db", type=Path, default=Path("hq.db"), help="SQLite file (default: ./%(default)s)")
    db.add_argument(
        "--postgres",
        metavar="DSN",
        help="PostgreSQL connection string, for several receivers sharing one database"
        " (keep the password in PGPASSFILE or PGPASSWORD)",
    )


def lost_grace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lost-grace",
        type=_not_negative,
        default=LOST_GRACE_S,
        metavar="SECONDS",
        help="call a missing seq lost only once the gateway's complete_through covering it is SECONDS old:"
        " another receiver may still hold the batch (default: %(default)s; 0 with a single receiver)",
    )


def store_list(text: str) -> list[str]:
    """``--stores a,b``: store ids (ID_PATTERN), at most MAX_STORES_PER_RECEIVER of them."""
    stores = [part.strip() for part in text.split(",") if part.strip()]
    if not stores or len(stores) > MAX_STORES_PER_RECEIVER:
        raise argparse.ArgumentTypeError(f"give 1 to {MAX_STORES_PER_RECEIVER} store ids, comma separated")
    for store in stores:
        if not _ID.fullmatch(store):
            raise argparse.ArgumentTypeError(
                f"{store[:80]!r} is not a store id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})"
            )
    return stores


def checked_id(text: str) -> str:
    """An argparse type: a store, device or gateway id (ID_PATTERN)."""
    if not _ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
    return text


def utc_time(text: str) -> datetime:
    """An argparse type: an ISO 8601 date or time, UTC unless it carries an offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text[:80]!r} (e.g. 2026-11-01, 2026-11-01T08:00 or 2026-11-01T08:00+08:00)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number {low}..{high}, not {text[:20]!r}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    """The HQ broker settings from the command line; raises :class:`CliError`."""
    if (
        not args.no_share
        and args.share_group is not None
        and (not args.share_group or any(c in args.share_group for c in "/+#"))
    ):
        raise CliError(f"--share-group {args.share_group!r}: a share group is one topic level (no / + #)")
    password: SecretStr | None = None
    if args.password_file is not None:
        if args.username is None:
            raise CliError("--password-file needs --username")
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as err:
            raise CliError(f"cannot read --password-file: {err.strerror} ({args.password_file})") from err
        password = SecretStr(text.rstrip("\r\n"))
        if not password.get_secret_value():
            raise CliError(f"--password-file {args.password_file} is empty")
    for option in ("ca_file", "cert_file", "key_file"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise CliError(f"--{option.replace('_', '-')} {path}: no such file")
    try:
        tls = None
        if args.ca_file or args.cert_file or args.key_file:
            tls = TlsConfig(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
        return BrokerConfig(
            host=args.host,
            port=args.port,
            protocol=args.protocol,
            username=args.username,
            password=password,
            tls=tls,
            session_expiry_s=args.session_expiry,
        )
    except ValidationError as err:
        raise CliError("; ".join(_problem(e["loc"], e["msg"]) for e in err.errors())) from err


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    """A pydantic error as "field: message" (a whole-model check has no field)."""
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(map(str, loc))}: {message}" if loc else message


T = TypeVar("T")


def read_store(args: argparse.Namespace, read: Callable[[SqlReceiverStore], T]) -> T | None:
    """Open the database the options name, ``read`` it, close it; None (said on stderr) when it cannot be
    opened or read: the HQ tools' exit status 1."""
    if not args.postgres and not args.db.exists():
        print(f"hq-receiver: no database at {args.db}", file=sys.stderr)
        return None
    try:
        store = open_store(args)
    except (CliError, StoreUnavailableError) as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return None
    try:
        return read(store)
    except StoreUnavailableError as err:
        print(f"hq-receiver: {err}", file=sys.stderr)
        return None
    finally:
        store.close()


def open_store(args: argparse.Namespace) -> SqlReceiverStore:
    """The database the options name; raises :class:`StoreUnavailableError`, or :class:`CliError` when
    ``--postgres`` is asked for without psycopg installed."""
    if args.postgres:
        try:
            from cloud_bridge.hq.postgres import PostgresReceiverStore  # psycopg only when asked for
        except ImportError as err:
            raise CliError(
                f"--postgres needs psycopg ({err}): install the postgres extra,"
                " pip install 'store-gateway[postgres]'"
            ) from err
        return PostgresReceiverStore(args.postgres, lost_grace_s=args.lost_grace)
    try:
        return SqliteReceiverStore(args.db, lost_grace_s=args.lost_grace)
    except OSError as err:
        raise StoreUnavailableError(f"cannot open {args.db}: {err}") from err
